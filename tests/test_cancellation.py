"""Cancellation at any point of an acquire, a call or a release leaks nothing."""

from __future__ import annotations

import random

import anyio
import pytest

from ratekit import Limiter, Limits, TokenCounting
from ratekit.clock import FakeClock

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("counting", list(TokenCounting))
async def test_a_cancellation_storm_leaves_every_counter_at_zero(counting: TokenCounting) -> None:
    """Thousands of acquires cancelled at random points: no slot, hold or waiter survives."""
    clock = FakeClock()
    limits = Limits(concurrency=8, rpm=120, tpm=20_000, token_counting=counting)
    limiter = Limiter(limits, clock=clock)
    rng = random.Random(20261125)
    scopes: list[anyio.CancelScope] = []
    outcomes = {"admitted": 0, "cancelled": 0, "completed": 0}

    async def caller() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            try:
                async with limiter.acquire(tokens=rng.randint(1, 400)) as permit:
                    outcomes["admitted"] += 1
                    await clock.wait(anyio.Event(), rng.uniform(0.0, 3.0))
                    permit.settle(tokens=rng.randint(0, 400))
                outcomes["completed"] += 1
            except anyio.get_cancelled_exc_class():
                outcomes["cancelled"] += 1
                raise

    async with anyio.create_task_group() as group:
        for _ in range(3000):
            group.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        for _ in range(300):
            # Cancel a random handful (waiting in the queue, at the head, or mid-call).
            for scope in rng.sample(scopes, k=min(len(scopes), rng.randint(0, 50))):
                scope.cancel()
            clock.advance(rng.uniform(0.0, 3.0))
            # Let woken tasks run a while; exact quiescence is not needed here
            # (and asyncio's wait_all_tasks_blocked polls every 0.1 s).
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
        for scope in scopes:
            scope.cancel()

    assert outcomes["cancelled"] > 1000
    assert outcomes["completed"] > 100
    stats = await limiter.statistics()
    assert stats.waiting == 0
    assert stats.dimension("concurrency").used == 0
    assert stats.dimension("tpm").in_flight == 0
    # Once the windows have passed, nothing counts any more either.
    clock.advance(120)
    stats = await limiter.statistics()
    assert [d.used for d in stats.dimensions] == [0, 0, 0]
    assert clock.pending_timers == 0
