"""ratekit.SyncScheduler: a decorated sync function called from a thread pool.

The function calls the provider with the synchronous ``openai.OpenAI`` client in
its own worker thread; its admission runs in the scheduler's event loop, in a
thread of its own, so every worker shares one set of limits. Runs against a
strict local provider (Moonshot Tier1, a minute per second; served from another
thread of this process). Exits 1 on any 429 or lost call.

    python examples/sync_threads.py
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import anyio.from_thread
import openai
from anyio.from_thread import start_blocking_portal
from openai.types.chat import ChatCompletion

import ratekit
from ratekit.testing.mock_provider import MockProvider

SPEED = 60  # a minute of the provider's limits lasts a second
THREADS = 64
CALLS = 300


def used(response: ChatCompletion) -> float | None:
    return None if response.usage is None else response.usage.total_tokens


def main() -> int:
    tier = ratekit.load_profile("moonshot").tier("tier1")
    with start_blocking_portal() as provider_loop:
        server = MockProvider(tier.limits(), speed=SPEED, latency_s=1.2)
        provider_loop.call(server.start)
        account = ratekit.Account("moonshot", tier="tier1", period_scale=1 / SPEED)
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        try:
            with ratekit.SyncScheduler(account) as sync:

                @sync.limit(tokens=lambda question: len(question) / 3 + 8 + 32, usage=used)
                def ask(question: str) -> ChatCompletion:
                    return client.chat.completions.create(
                        model="kimi-k2",
                        messages=[{"role": "user", "content": question}],
                        max_tokens=32,
                    )

                started = time.monotonic()
                with ThreadPoolExecutor(max_workers=THREADS) as pool:
                    answers = list(pool.map(ask, [f"Question {n}?" for n in range(CALLS)]))
                elapsed_s = time.monotonic() - started
                # The scheduler's own statistics, read in its loop.
                token = sync.scheduler.loop_token
                stats = anyio.from_thread.run(sync.scheduler.statistics, token=token)
        finally:
            client.close()
            provider_loop.call(server.close)

    provider = server.statistics()
    rejected = sum(provider.rejected.values())
    answered = sum(1 for answer in answers if answer.choices[0].message.content)
    print(f"calls: {answered}/{CALLS} from {THREADS} threads in {elapsed_s:.2f} s")
    print(f"provider 429s: {rejected}; admitted: {stats.admitted}; 429s seen: {stats.rate_limited}")
    if rejected or answered != CALLS:
        print("FAILED: a 429 or a lost call", file=sys.stderr)
        return 1
    print("ok: no 429")
    return 0


if __name__ == "__main__":
    sys.exit(main())
