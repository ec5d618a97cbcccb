"""Several OS processes sharing one account through Redis, against a strict provider.

Starts a redis-server on a free loopback port (``redis-server`` must be on PATH;
`ratekit.testing.RedisServer`) and a strict local provider enforcing Moonshot's Tier1
(50 in flight, 200 RPM, a minute per second), then runs worker processes that each wrap their own
``openai.AsyncOpenAI`` with a scheduler on one `RedisBackend` namespace: together
they keep to the tier. Exits 1 on any 429 or lost call, 2 without redis-server.

    python examples/redis_processes.py
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
import uuid
from typing import Any

import openai
from anyio.from_thread import start_blocking_portal

import ratekit
from ratekit.backends.redis import RedisBackend
from ratekit.testing import SERVER_HINT, MockProvider, RedisServer, redis_server_binary

SPEED = 60  # a minute of the provider's limits lasts a second
# The local provider here runs in a thread of this process, on the same cores as four
# busy client processes and Redis: under load its loop stamps an arrival up to
# ~0.1 s after the request reached it, later than a real provider's gateway does
# (the default margin, 50 ms, was not always enough on 2 cores at a load of 4).
MARGIN_S = 0.25
PROCESSES = 4
TASKS_PER_PROCESS = 20
CALLS_PER_TASK = 5


async def work(redis_url: str, namespace: str, base_url: str) -> dict[str, int]:
    """One process: TASKS_PER_PROCESS tasks, each making CALLS_PER_TASK calls."""
    account = ratekit.Account("moonshot", tier="tier1", period_scale=1 / SPEED, margin_s=MARGIN_S)
    backend = RedisBackend(redis_url, namespace=namespace)
    scheduler = ratekit.Scheduler(account, backend=backend)
    raw = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    client = ratekit.wrap(raw, scheduler)
    done = 0

    async def task() -> None:
        nonlocal done
        for _ in range(CALLS_PER_TASK):
            await client.chat.completions.create(
                model="kimi-k2",
                messages=[{"role": "user", "content": "Say something short."}],
                max_tokens=32,
            )
            done += 1

    try:
        await asyncio.gather(*(task() for _ in range(TASKS_PER_PROCESS)))
        stats = await scheduler.statistics()
    finally:
        await raw.close()
        await backend.aclose()
    return {"done": done, "admitted": stats.admitted, "rate_limited": stats.rate_limited}


def worker(args: tuple[str, str, str]) -> dict[str, int]:
    return asyncio.run(work(*args))


def main() -> int:
    binary = redis_server_binary()
    if binary is None:
        print(f"redis-server is not on PATH: install it ({SERVER_HINT})", file=sys.stderr)
        return 2
    tier = ratekit.load_profile("moonshot").tier("tier1")
    with RedisServer(binary) as redis, start_blocking_portal() as provider_loop:
        server = MockProvider(tier.limits(), speed=SPEED, latency_s=1.2)
        provider_loop.call(server.start)
        try:
            jobs = [(redis.url, uuid.uuid4().hex, server.base_url)]
            started = time.monotonic()
            context = multiprocessing.get_context("spawn")
            with context.Pool(PROCESSES) as pool:
                results: list[dict[str, Any]] = pool.map(worker, jobs * PROCESSES)
            elapsed_s = time.monotonic() - started
        finally:
            provider_loop.call(server.close)

    expected = PROCESSES * TASKS_PER_PROCESS * CALLS_PER_TASK
    done = sum(result["done"] for result in results)
    admitted = sum(result["admitted"] for result in results)
    rejected = sum(server.statistics().rejected.values())
    print(f"processes: {PROCESSES}, one account in Redis; {elapsed_s:.2f} s")
    print(f"calls: {done}/{expected}; total admitted: {admitted}")
    print(f"provider 429s: {rejected}; peak in flight: {server.statistics().max_concurrency}")
    if rejected or done != expected:
        print("FAILED: a 429 or a lost call", file=sys.stderr)
        return 1
    print("ok: no 429")
    return 0


if __name__ == "__main__":
    sys.exit(main())
