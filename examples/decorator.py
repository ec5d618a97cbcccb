"""@scheduler.limit on an async function that calls the provider itself.

The decorator admits every call of `ask` through the scheduler, reserving tokens
computed from the call's own arguments, and settles with the usage the function's
result reports. Interactive calls (priority 10) go before batch ones (priority 0).
Runs against a strict local provider (Moonshot Tier1, a minute per second).
Exits 1 on any 429 or lost call.

    python examples/decorator.py
"""

from __future__ import annotations

import sys

import anyio
import openai
from openai.types.chat import ChatCompletion

import ratekit
from ratekit.testing.mock_provider import ProviderProcess

SPEED = 60
# A decorated function calls a plain client, which never says when its request leaves:
# each call counts from its end, when its request had arrived at the latest, however
# long a cold client took to send it. No margin to set (a client wrapped with
# `ratekit.wrap` counts from the moment each request is written, see openai_client.py).
BATCH = 240
INTERACTIVE = 40


def reserve(question: str, max_tokens: int) -> float:
    """Prompt + max output, from the call's arguments: about a token per 3 characters
    plus the message's overhead, on the safe side of the provider's count."""
    return len(question) / 3 + 8 + max_tokens


def used(response: ChatCompletion) -> float | None:
    return None if response.usage is None else response.usage.total_tokens


async def main() -> int:
    tier = ratekit.load_profile("moonshot").tier("tier1")
    # The provider in a process of its own, as a real one is: its arrival stamps never
    # wait for this process's event loop.
    async with ProviderProcess(tier.limits(), speed=SPEED, latency_s=1.2) as server:
        account = ratekit.Account("moonshot", tier="tier1", period_scale=1 / SPEED)
        scheduler = ratekit.Scheduler(account)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        # A plain client's first request is slow (the SDK's lazy imports and setup: up to
        # ~0.3 s here), longer than the margin: made outside the limits (listing models
        # counts in no window), it is not the first admitted call's.
        await client.models.list()

        async def ask(question: str, max_tokens: int) -> ChatCompletion:
            return await client.chat.completions.create(
                model="kimi-k2",
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
            )

        batch = scheduler.limit(tokens=reserve, usage=used, model="kimi-k2")(ask)
        interactive = scheduler.limit(tokens=reserve, usage=used, model="kimi-k2", priority=10)(ask)
        answers: list[ChatCompletion] = []

        async def run(call: object, question: str) -> None:
            answers.append(await call(question, max_tokens=64))  # type: ignore[operator]

        async with anyio.create_task_group() as group:
            for n in range(BATCH):
                group.start_soon(run, batch, f"Summarise document {n}.")
            await anyio.sleep(0.2)  # the batch fills the first window; then users arrive
            for n in range(INTERACTIVE):
                group.start_soon(run, interactive, f"Question {n} from a user?")
        await client.close()

        rejected = sum((await server.statistics()).rejected.values())
        stats = await scheduler.statistics()
        print(f"calls: {len(answers)}/{BATCH + INTERACTIVE}; provider 429s: {rejected}")
        for priority, waits in sorted(stats.priorities.items(), reverse=True):
            print(
                f"priority {priority}: {waits.admitted} admitted, "
                f"wait p50 {waits.wait_p50_s:.2f} s, p99 {waits.wait_p99_s:.2f} s"
            )
        if rejected or len(answers) != BATCH + INTERACTIVE:
            print("FAILED: a 429 or a lost call", file=sys.stderr)
            return 1
        print("ok: no 429")
        return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
