"""ratekit.wrap around the sync clients, openai.OpenAI and anthropic.Anthropic, called
from a thread pool that shares one SyncScheduler.

32 threads call both SDKs, plain and streamed (Anthropic's ``messages.stream``
helper too), through two clients wrapped once and shared by every thread. The
scheduler's event loop runs in a thread of its own; each call waits for its
admission in its own thread. Runs against a strict local provider (Moonshot Tier1:
50 in flight, 200 RPM, a minute per second; served from another thread of this
process), which counts both APIs' calls against one account. The clients keep the
SDKs' default ``max_retries``: wrap retries itself, each try admitted. Exits 1 on
any 429 or lost call.

    pip install -e '.[openai,anthropic]'
    python examples/sync_clients.py
"""

from __future__ import annotations

import functools
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anthropic
import anyio.from_thread
import openai
from anyio.from_thread import start_blocking_portal

import ratekit
from ratekit.testing.mock_provider import MockProvider

SPEED = 60  # a minute of the provider's limits lasts a second
# A wrapped call counts from the moment its request is written, and a provider in
# another process needs no margin. This one shares the process, and its event loop
# waits for the GIL behind 32 busy threads before it stamps an arrival: up to ~0.1 s.
MARGIN_S = 0.25
THREADS = 32
ROUNDS = 60  # each round: one call of each kind
MODEL = "kimi-k2"
CHAT: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say something short."}
]
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say something short."}]


def openai_plain(client: openai.OpenAI) -> bool:
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32)
    return bool(answer.choices[0].message.content)


def openai_streamed(client: openai.OpenAI) -> bool:
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, stream=True)
    with stream:  # the slot is held until the stream ends or is closed
        return bool("".join(chunk.choices[0].delta.content or "" for chunk in stream))


def anthropic_plain(client: anthropic.Anthropic) -> bool:
    message = client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
    return bool(message.content)


def anthropic_helper(client: anthropic.Anthropic) -> bool:
    with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
        return bool("".join(stream.text_stream))


def main() -> int:
    tier = ratekit.load_profile("moonshot").tier("tier1")
    with start_blocking_portal() as provider_loop:
        server = MockProvider(tier.limits(), speed=SPEED, latency_s=1.2)
        provider_loop.call(server.start)
        account = ratekit.Account(
            "moonshot", tier="tier1", period_scale=1 / SPEED, margin_s=MARGIN_S
        )
        raw_chat = openai.OpenAI(base_url=server.base_url, api_key="not-needed")
        raw_messages = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="not-needed")
        try:
            with ratekit.SyncScheduler(account) as sync:
                chat = ratekit.wrap(raw_chat, sync)
                messages = ratekit.wrap(raw_messages, sync)
                calls: dict[str, Callable[[], bool]] = {
                    "openai plain": functools.partial(openai_plain, chat),
                    "openai streamed": functools.partial(openai_streamed, chat),
                    "anthropic plain": functools.partial(anthropic_plain, messages),
                    "anthropic stream helper": functools.partial(anthropic_helper, messages),
                }

                def call(kind: str) -> tuple[str, bool]:
                    return kind, calls[kind]()

                started = time.monotonic()
                with ThreadPoolExecutor(max_workers=THREADS) as pool:
                    results = list(pool.map(call, [kind for _ in range(ROUNDS) for kind in calls]))
                elapsed_s = time.monotonic() - started
                # The scheduler's own statistics, read in its loop.
                token = sync.scheduler.loop_token
                stats = anyio.from_thread.run(sync.scheduler.statistics, token=token)
        finally:
            raw_chat.close()
            raw_messages.close()
            provider_loop.call(server.close)

    provider = server.statistics()
    rejected = sum(provider.rejected.values())
    done = Counter(kind for kind, answered in results if answered)
    expected = ROUNDS * len(calls)
    answered = sum(done.values())
    print(f"calls: {answered}/{expected} from {THREADS} threads in {elapsed_s:.2f} s")
    print("; ".join(f"{kind}: {done[kind]}" for kind in calls))
    print(f"provider 429s: {rejected}; admitted: {stats.admitted}; 429s seen: {stats.rate_limited}")
    served = ", ".join(f"{n} {name}" for name, n in sorted(provider.served_by_endpoint.items()))
    print(f"served by the provider, one account for both APIs: {served}")
    for name, (peak, limit) in sorted(provider.peak_use.items()):
        print(f"peak use of {name}: {peak:,.0f}/{limit:,.0f} ({peak / limit:.0%})")
    if rejected or answered != expected:
        print("FAILED: a 429 or a lost call", file=sys.stderr)
        return 1
    print("ok: no 429")
    return 0


if __name__ == "__main__":
    sys.exit(main())
