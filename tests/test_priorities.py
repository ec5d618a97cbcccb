"""Priorities in a limiter's queue: order, a share kept for lower ones, a bound."""

from __future__ import annotations

import anyio
import pytest

import ratekit
from ratekit import Limiter, Limits
from ratekit._queue import WaitQueue
from ratekit.clock import FakeClock

from .test_limiter import Recorder

pytestmark = pytest.mark.anyio


def make(**kwargs: object) -> tuple[Limiter, FakeClock]:
    clock = FakeClock()
    backend = ratekit.MemoryBackend()
    return Limiter(Limits(rpm=1), backend=backend, clock=clock, **kwargs), clock  # type: ignore[arg-type]


async def test_higher_priorities_go_first_and_fifo_within_one() -> None:
    """Waiting callers are admitted by priority, then in arrival order."""
    limiter, clock = make(lower_share=0.0)
    await (await limiter.acquire()).release()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("batch-1", priority=0)
        await rec.start("batch-2", priority=0)
        await rec.start("chat-1", priority=10)
        await rec.start("chat-2", priority=10)
        await rec.start("mid", priority=5)
        stats = await limiter.statistics()
        assert stats.waiting_by_priority == {0: 2, 10: 2, 5: 1}
        for _ in range(5):
            clock.advance(61)
            await anyio.wait_all_tasks_blocked()
    assert rec.order == ["chat-1", "chat-2", "mid", "batch-1", "batch-2"]


async def test_a_higher_priority_arrival_displaces_a_waiting_head() -> None:
    """A head waiting on its hint steps back for a higher priority that arrives."""
    limiter, clock = make(lower_share=0.0)
    await (await limiter.acquire()).release()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("batch", priority=0)
        await rec.start("chat", priority=1)
        assert clock.pending_timers == 1  # only the head sleeps on a timer
        clock.advance(61)
        await anyio.wait_all_tasks_blocked()
        assert rec.order == ["chat"]
        clock.advance(61)
    assert rec.order == ["chat", "batch"]


def test_lower_priorities_keep_their_share() -> None:
    """With a share of 0.25, a waiting lower priority gets one admission in four."""
    queue = WaitQueue(lower_share=0.25)
    batch = [queue.push(0) for _ in range(10)]
    chat = [queue.push(9) for _ in range(30)]
    served = []
    for _ in range(20):
        head = queue.head()
        assert head is not None
        served.append(head.priority)
        queue.admitted(head)
        queue.remove(head)
    assert served.count(0) == 5
    assert served[:4] == [9, 9, 9, 0]
    assert len(queue) == 20
    assert batch[0] not in [w for w in chat]


def test_credit_is_not_banked_while_nobody_waits() -> None:
    """A lower priority earns turns only while it has callers waiting."""
    queue = WaitQueue(lower_share=0.5)
    for _ in range(10):
        head = queue.push(9)
        queue.admitted(head)
        queue.remove(head)
    low = queue.push(0)
    high = queue.push(9)
    assert queue.head() is high
    assert queue.head() is not low


async def test_a_full_queue_refuses_at_once() -> None:
    """Beyond max_queue waiting callers, acquire raises QueueFullError."""
    limiter, clock = make(max_queue=2)
    await (await limiter.acquire()).release()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("a")
        await rec.start("b")
        with pytest.raises(
            ratekit.QueueFullError, match="the queue is full: 2 callers already wait"
        ):
            await limiter.acquire()
        group.cancel_scope.cancel()


def test_queue_settings_are_validated() -> None:
    """A share outside [0, 1) or a negative bound is a typed error."""
    with pytest.raises(
        ratekit.errors.LimitsError, match=r"lower_share must be a number in \[0, 1\), got 1"
    ):
        WaitQueue(lower_share=1)
    with pytest.raises(ratekit.errors.LimitsError, match="max_queue must be a non-negative int"):
        WaitQueue(max_size=-1)


def test_callers_queue_in_the_order_they_came_whatever_order_they_are_pushed() -> None:
    """A caller pushed late with an early ticket (its try's reply came back after those of
    callers that came later) takes its place by arrival, within its priority."""
    queue = WaitQueue(lower_share=0)
    order = [3, 0, 4, 1, 2, 6, 5]
    waiters = {ticket: queue.push(0, ticket=ticket) for ticket in order}
    served = []
    while (head := queue.head()) is not None:
        served.append(next(t for t, w in waiters.items() if w is head))
        queue.admitted(head)
        queue.remove(head)
    assert served == sorted(order)
