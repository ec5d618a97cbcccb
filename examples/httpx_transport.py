"""RateLimitedTransport: a plain httpx.AsyncClient whose LLM calls are admitted.

For OpenAI-compatible clients other than the `openai` package: the transport
admits every POST to .../chat/completions, .../completions, .../embeddings and
.../responses (each request sent, one admission), settles it with the answer's
usage (a stream's from its last usage event, the admission held until the stream
is read or closed) and passes anything else through. Runs against a strict local
provider (Moonshot Tier1, a minute per second). Exits 1 on any 429 or lost call.

    python examples/httpx_transport.py
"""

from __future__ import annotations

import json
import sys

import anyio
import httpx

import ratekit
from ratekit import RateLimitedTransport
from ratekit.testing.mock_provider import MockProvider

SPEED = 60  # a minute of the provider's limits lasts a second
TASKS = 60
CALLS_PER_TASK = 5


def chat(question: str, **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": question}]
    return {"model": "kimi-k2", "messages": messages, "max_tokens": 32, **extra}


async def main() -> int:
    tier = ratekit.load_profile("moonshot").tier("tier1")
    async with MockProvider(tier.limits(), speed=SPEED, latency_s=1.2) as server:
        account = ratekit.Account("moonshot", tier="tier1", period_scale=1 / SPEED)
        settled: list[float] = []

        def on_event(event: ratekit.Event) -> None:
            if isinstance(event, ratekit.events.Settled):
                settled.append(event.tokens)

        scheduler = ratekit.Scheduler(account, hooks=[on_event])
        transport = RateLimitedTransport(scheduler)
        answered = refused = 0

        async def worker(client: httpx.AsyncClient, index: int) -> None:
            nonlocal answered, refused
            for call in range(CALLS_PER_TASK):
                question = f"Question {index}.{call}?"
                if call % 2:
                    body = chat(question, stream=True, stream_options={"include_usage": True})
                    async with client.stream("POST", "/chat/completions", json=body) as response:
                        events = [
                            json.loads(line[5:])
                            async for line in response.aiter_lines()
                            if line.startswith("data: {")
                        ]
                    ok = response.status_code == 200 and any(e.get("usage") for e in events)
                else:
                    response = await client.post("/chat/completions", json=chat(question))
                    ok = response.status_code == 200
                answered += ok
                refused += response.status_code == 429

        async with httpx.AsyncClient(base_url=server.base_url, transport=transport) as client:
            models = (await client.get("/models")).json()  # passes through, not admitted
            async with anyio.create_task_group() as group:
                for index in range(TASKS):
                    group.start_soon(worker, client, index)

        stats = await scheduler.statistics()
        provider_tokens = sum(c.prompt_tokens + c.completion_tokens for c in server.calls)
        expected = TASKS * CALLS_PER_TASK
        print(f"models listed: {len(models['data'])} (not admitted)")
        print(f"calls: {answered}/{expected}; admitted: {stats.admitted}; 429s: {refused}")
        print(f"tokens settled: {sum(settled):g}; counted by the provider: {provider_tokens}")
        if refused or answered != expected or stats.admitted != expected:
            print("FAILED: a 429 or a lost call", file=sys.stderr)
            return 1
        if sum(settled) != provider_tokens:
            print("FAILED: the settled usage differs from the provider's", file=sys.stderr)
            return 1
        print("ok: no 429")
        return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
