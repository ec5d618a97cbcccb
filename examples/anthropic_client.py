"""ratekit.wrap around anthropic.AsyncAnthropic: plain, streamed and stream-helper calls
from many tasks, with a cached system prompt.

Runs against a strict local provider started in this process, on this event loop,
enforcing Moonshot's Tier1 (50 in flight, 200 RPM) with a minute compressed into a
second; no API key, no network. The provider serves Anthropic's Messages API with a
prompt cache: the system prompt carries ``cache_control``, so the first call writes it
and the later ones read it (cache reads count toward TPM, as Moonshot's profile says).
The client keeps the SDK's default ``max_retries``: wrap retries itself, each try
admitted. ``messages.count_tokens`` is not a call against the limits and passes through.
Exits 1 if the provider answered any 429, a call was lost, or the provider saw a
request that was not admitted.

    pip install -e '.[anthropic]'
    python examples/anthropic_client.py
"""

from __future__ import annotations

import sys
from collections import Counter

import anthropic
import anyio

import ratekit
from ratekit.testing.mock_provider import MockProvider

SPEED = 60  # a minute of the provider's limits lasts a second
TASKS = 60
CALLS_PER_TASK = 5
MODEL = "kimi-k2"
MAX_TOKENS = 32
# A long shared instruction, the same for every call: cached after its first use.
SYSTEM: list[anthropic.types.TextBlockParam] = [
    {
        "type": "text",
        "text": "You are a terse assistant for a support desk. " * 40,
        "cache_control": {"type": "ephemeral"},
    }
]
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say something short."}]
KINDS = ("plain", "streamed", "stream helper")


def add_prompt(tokens: Counter[str], usage: anthropic.types.Usage) -> None:
    """Count a message's prompt, in the API's three parts: input outside the cache,
    cache writes and cache reads."""
    tokens["input"] += usage.input_tokens
    tokens["cache writes"] += usage.cache_creation_input_tokens or 0
    tokens["cache reads"] += usage.cache_read_input_tokens or 0


async def main() -> int:
    tier = ratekit.load_profile("moonshot").tier("tier1")
    async with MockProvider(tier.limits(), speed=SPEED, latency_s=1.2) as server:
        # The account's periods compressed like the provider's; nothing else to set: a
        # wrapped call counts from the moment its request is written.
        account = ratekit.Account("moonshot", tier="tier1", period_scale=1 / SPEED)
        scheduler = ratekit.Scheduler(account)
        raw = anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key="not-needed")
        client = ratekit.wrap(raw, scheduler)
        done: Counter[str] = Counter()
        tokens: Counter[str] = Counter()

        counted = await client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=MESSAGES)

        async def plain() -> None:
            message = await client.messages.create(
                model=MODEL, max_tokens=MAX_TOKENS, system=SYSTEM, messages=MESSAGES
            )
            add_prompt(tokens, message.usage)
            tokens["output"] += message.usage.output_tokens
            done["plain"] += bool(message.content)

        async def streamed() -> None:
            stream = await client.messages.create(
                model=MODEL, max_tokens=MAX_TOKENS, system=SYSTEM, messages=MESSAGES, stream=True
            )
            text = []
            async with stream:  # the slot is held until the stream ends or is closed
                async for event in stream:
                    if event.type == "message_start":
                        # The prompt's usage; the output's comes in message_delta.
                        add_prompt(tokens, event.message.usage)
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text.append(event.delta.text)
                    elif event.type == "message_delta":
                        tokens["output"] += event.usage.output_tokens
            done["streamed"] += bool(text)

        async def helper() -> None:
            async with client.messages.stream(
                model=MODEL, max_tokens=MAX_TOKENS, system=SYSTEM, messages=MESSAGES
            ) as stream:
                text = "".join([chunk async for chunk in stream.text_stream])
                message = await stream.get_final_message()
            add_prompt(tokens, message.usage)
            tokens["output"] += message.usage.output_tokens
            done["stream helper"] += bool(text)

        calls = (plain, streamed, helper)

        async def worker(index: int) -> None:
            for call in range(CALLS_PER_TASK):
                await calls[(index + call) % len(calls)]()

        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            for index in range(TASKS):
                group.start_soon(worker, index)
        elapsed_s = anyio.current_time() - started
        await raw.close()

        provider = server.statistics()
        stats = await scheduler.statistics()

    expected = TASKS * CALLS_PER_TASK
    answered = sum(done.values())
    rejected = sum(provider.rejected.values())
    requests = provider.served + rejected + provider.overloaded
    split = ", ".join(f"{done[kind]} {kind}" for kind in KINDS)
    print(f"calls: {answered}/{expected} ({split}) in {elapsed_s:.2f} s")
    print(f"provider 429s: {rejected}; 529s: {provider.overloaded}; admitted: {stats.admitted}")
    print(f"requests at the provider: {requests}, each admitted once")
    print(f"count_tokens (not admitted): {counted.input_tokens} input tokens a call")
    parts = ("input", "cache writes", "cache reads", "output")
    print("tokens: " + ", ".join(f"{tokens[part]:,} {part}" for part in parts))
    for name, (peak, limit) in sorted(provider.peak_use.items()):
        print(f"peak use of {name}: {peak:,.0f}/{limit:,.0f} ({peak / limit:.0%})")
    if rejected or answered != expected:
        print("FAILED: a 429 or a lost call", file=sys.stderr)
        return 1
    if requests != stats.admitted:
        print("FAILED: the provider saw a request that was not admitted", file=sys.stderr)
        return 1
    print("ok: no 429")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
