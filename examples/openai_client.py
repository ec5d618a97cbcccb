"""ratekit.wrap around openai.AsyncOpenAI: plain and streaming calls from many tasks.

Runs against a strict local provider enforcing Moonshot's Tier1 (50 in flight,
200 RPM) with a minute compressed into a second; no API key, no network. The
client keeps the SDK's default ``max_retries``: wrap turns the SDK's own retries
off on a copy and retries itself, so every request the provider sees was
admitted. Exits 1 if the provider answered any 429, a call was lost, or the
provider saw a request that was not admitted.

    python examples/openai_client.py
"""

from __future__ import annotations

import sys

import anyio
import openai

import ratekit
from ratekit.testing.mock_provider import ProviderProcess

SPEED = 60  # a minute of the provider's limits lasts a second
TASKS = 60
CALLS_PER_TASK = 5
MESSAGES = [{"role": "user", "content": "Say something short."}]


async def main() -> int:
    tier = ratekit.load_profile("moonshot").tier("tier1")
    # The provider in a process of its own, as a real one is.
    async with ProviderProcess(tier.limits(), speed=SPEED, latency_s=1.2) as server:
        # The account's periods compressed like the provider's; nothing else to set: a
        # wrapped call counts from the moment its request is written.
        account = ratekit.Account("moonshot", tier="tier1", period_scale=1 / SPEED)
        scheduler = ratekit.Scheduler(account)
        raw = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed")
        client = ratekit.wrap(raw, scheduler)
        plain = streamed = 0

        async def worker(index: int) -> None:
            nonlocal plain, streamed
            for call in range(CALLS_PER_TASK):
                if (index + call) % 2:
                    stream = await client.chat.completions.create(
                        model="kimi-k2", messages=MESSAGES, max_tokens=32, stream=True
                    )
                    async with stream:
                        text = "".join([c.choices[0].delta.content or "" async for c in stream])
                    streamed += bool(text)
                else:
                    response = await client.chat.completions.create(
                        model="kimi-k2", messages=MESSAGES, max_tokens=32
                    )
                    plain += bool(response.choices[0].message.content)

        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            for index in range(TASKS):
                group.start_soon(worker, index)
        elapsed_s = anyio.current_time() - started
        await raw.close()

        provider = await server.statistics()
        stats = await scheduler.statistics()
        expected = TASKS * CALLS_PER_TASK
        rejected = sum(provider.rejected.values())
        requests = provider.served + rejected
        print(f"calls: {plain + streamed}/{expected} ({plain} plain, {streamed} streamed)")
        print(f"provider 429s: {rejected}; admitted: {stats.admitted}; {elapsed_s:.2f} s")
        print(f"requests at the provider: {requests}, each admitted once")
        print(f"peak in flight: {provider.max_concurrency}/{account.limits().concurrency}")
        if rejected or plain + streamed != expected:
            print("FAILED: a 429 or a lost call", file=sys.stderr)
            return 1
        if requests != stats.admitted:
            print("FAILED: the provider saw a request that was not admitted", file=sys.stderr)
            return 1
        print("ok: no 429")
        return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
