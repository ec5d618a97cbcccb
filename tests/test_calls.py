"""Decorated call sites and threaded code, on the scheduler's async core."""

from __future__ import annotations

import threading
import time

import anyio
import fakeredis
import pytest

import ratekit
from ratekit import Account, Scheduler, SyncScheduler
from ratekit.backends.redis import RedisBackend
from ratekit.errors import NoEventLoopError
from ratekit.integrations._calls import submit_sync

from .test_scheduler import TooManyRequests, classify


def compressed(tier: str = "tier0") -> Account:
    # Moonshot Tier0 with a minute of 0.5 s: 3 requests per 0.5 s, 1 at a time.
    return Account("moonshot", tier=tier, period_scale=0.5 / 60)


@pytest.mark.anyio
async def test_a_decorated_async_function_is_admitted_with_tokens_from_its_arguments() -> None:
    """@scheduler.limit reserves the tokens its function computes from the call's arguments."""
    clock = ratekit.clock.FakeClock()
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, classify=classify)

    @scheduler.limit(tokens=lambda prompt, max_tokens: len(prompt) + max_tokens)
    async def ask(prompt: str, max_tokens: int) -> str:
        return prompt.upper()

    assert await ask("hello", max_tokens=100) == "HELLO"
    stats = await scheduler.limiter().statistics()
    assert stats.dimension("tpm").used == 105
    assert stats.dimension("rpm").used == 1


def test_sync_threads_share_one_scheduler() -> None:
    """Eight threads calling a decorated sync function keep to 3 requests per window."""
    with SyncScheduler(compressed(), classify=classify) as sync:
        starts: list[float] = []
        lock = threading.Lock()

        @sync.limit(tokens=10)
        def work(n: int) -> int:
            with lock:
                starts.append(time.monotonic())
            return n * n

        results: list[int] = []

        def run(n: int) -> None:
            results.append(work(n))

        threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        elapsed = time.monotonic() - began
    assert sorted(results) == [n * n for n in range(8)]
    # 8 calls at 3 per 0.5 s need two more windows after the first burst.
    assert elapsed >= 1.0
    starts.sort()
    for first, fourth in zip(starts, starts[3:], strict=False):
        assert fourth - first >= 0.5 - 0.02


def test_a_sync_429_is_answered_and_retried() -> None:
    """A sync call raising a 429 pauses the account and is retried until it succeeds."""
    with SyncScheduler(Account("moonshot", tier="tier1"), classify=classify) as sync:
        calls: list[float] = []

        def flaky() -> str:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise TooManyRequests(retry_after_s=0.3)
            return "ok"

        assert sync.submit(flaky) == "ok"
        assert calls[1] - calls[0] >= 0.3 - 0.02
        stats = sync._portal.call(sync.scheduler.statistics)
        assert stats.rate_limited == 1


def test_the_sync_facade_works_with_the_redis_backend() -> None:
    """A SyncScheduler builds its Redis backend in its own loop and shares the account."""
    server = fakeredis.FakeServer()

    def backend() -> RedisBackend:
        return RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="sync-1")

    account = Account("moonshot", tier="tier1", token_counting="usage")
    with SyncScheduler(account, backend=backend, classify=classify) as sync:
        with sync.slot(tokens=50) as permit:
            permit.settle(tokens=20)
        stats = sync._portal.call(sync.scheduler.limiter().statistics)
    assert stats.dimension("tpm").used == 20


def test_sync_calls_without_a_loop_fail_clearly() -> None:
    """A plain Scheduler used from a thread before it ever ran says what to do."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"))
    with pytest.raises(NoEventLoopError, match=r"use ratekit\.SyncScheduler"):
        submit_sync(scheduler, lambda: None)


@pytest.mark.anyio
async def test_worker_threads_of_the_loop_can_use_the_async_scheduler() -> None:
    """Sync code run with anyio.to_thread reaches its loop's scheduler."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"), classify=classify)

    @scheduler.limit(tokens=7)
    def blocking(x: int) -> int:
        return x + 1

    async with scheduler.slot():  # the scheduler learns its loop
        pass
    assert await anyio.to_thread.run_sync(blocking, 41) == 42
    assert (await scheduler.limiter().statistics()).dimension("rpm").used == 2


@pytest.mark.anyio
async def test_a_sync_admitted_call_on_the_loop_thread_fails_instead_of_hanging() -> None:
    """A decorated sync function called on the event loop's own thread raises at once
    (waiting there for an admission would block the loop for good)."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"), classify=classify)

    @scheduler.limit(tokens=7)
    def blocking(x: int) -> int:
        return x + 1

    async with scheduler.slot():  # the scheduler learns its loop
        pass
    with pytest.raises(NoEventLoopError, match="event loop's own thread"):
        blocking(41)  # a regression hangs: pytest-timeout ends it
    assert await anyio.to_thread.run_sync(blocking, 41) == 42
