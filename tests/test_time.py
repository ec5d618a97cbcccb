"""Time has one owner, the limiter's clock: monotonic for windows, wall for calendar days."""

from __future__ import annotations

import math
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
import anyio.lowlevel
import pytest

import ratekit
from ratekit import Limiter, Limits
from ratekit.clock import FakeClock

pytestmark = pytest.mark.anyio


async def test_a_wall_clock_step_back_never_stalls_pacing() -> None:
    """An hour's step back of the wall clock leaves paced admissions on schedule."""
    clock = FakeClock()
    limiter = Limiter(Limits(rpm=60, pacing=True), clock=clock)
    await (await limiter.acquire()).release()
    clock.step_wall(-3600)
    clock.advance(1.0)  # one spacing of a paced rpm of 60
    admission = await limiter.try_acquire()
    assert admission is not None
    await admission.release()


async def test_a_wall_clock_step_forward_admits_no_new_window() -> None:
    """A 120 s step forward of the wall clock does not expire a full rolling window."""
    clock = FakeClock()
    limiter = Limiter(Limits(rpm=3), clock=clock)
    for _ in range(3):
        await (await limiter.acquire()).release()
    clock.step_wall(120)
    assert await limiter.try_acquire() is None
    stats = await limiter.statistics()
    assert stats.dimension("rpm").used == 3


async def test_the_system_clock_reads_monotonic_time_for_windows() -> None:
    """SystemClock's `now` is the monotonic clock and `wall` the Unix time."""
    clock = ratekit.clock.SystemClock()
    assert abs(clock.now() - time.monotonic()) < 1.0
    assert abs(clock.wall() - time.time()) < 1.0


@pytest.mark.parametrize(
    ("zone", "wall_iso", "hours_to_midnight"),
    [
        # The night clocks go forward: 23 h that day, so from 01:00 local 22 h remain.
        ("America/New_York", "2026-03-08T01:00:00-05:00", 22.0),
        # The night clocks go back: 25 h that day, so from 01:00 local 24 h remain.
        ("Europe/Berlin", "2026-10-25T01:00:00+02:00", 24.0),
        ("Asia/Shanghai", "2026-11-25T20:00:00+08:00", 4.0),
    ],
)
async def test_a_calendar_day_ends_at_local_midnight_with_the_offset_of_that_instant(
    zone: str, wall_iso: str, hours_to_midnight: float
) -> None:
    """A full calendar TPD waits exactly until midnight in its zone, daylight saving
    included, and the next day admits again."""
    wall_s = datetime.fromisoformat(wall_iso).timestamp()
    local_hour = datetime.fromtimestamp(wall_s, ZoneInfo(zone)).hour
    assert local_hour == 24 - hours_to_midnight or hours_to_midnight >= 22
    clock = FakeClock(5_000.0, wall_start_s=wall_s)
    limiter = Limiter(Limits(tpd=1000, tpd_calendar_tz=zone), clock=clock)
    await (await limiter.acquire(tokens=1000)).release()
    with pytest.raises(ratekit.AcquireTimeout) as caught:
        await limiter.acquire(tokens=1, timeout=1)
    assert caught.value.retry_after_s == pytest.approx(hours_to_midnight * 3600, abs=1e-6)
    clock.advance(hours_to_midnight * 3600)
    admission = await limiter.try_acquire(tokens=1)
    assert admission is not None
    await admission.release()


async def test_a_wall_step_back_across_midnight_keeps_the_day_counted() -> None:
    """Stepping the wall clock back into yesterday neither forgets nor double-counts today."""
    wall_s = datetime.fromisoformat("2026-11-25T00:30:00+08:00").timestamp()
    clock = FakeClock(wall_start_s=wall_s)
    limiter = Limiter(Limits(tpd=1000, tpd_calendar_tz="Asia/Shanghai"), clock=clock)
    await (await limiter.acquire(tokens=800)).release()
    clock.step_wall(-3600)  # 23:30 yesterday
    assert await limiter.try_acquire(tokens=300) is None
    stats = await limiter.statistics()
    assert stats.dimension("tpd").used == 800


async def test_a_deadline_runs_on_the_monotonic_clock() -> None:
    """A wall-clock step does not shorten or lengthen an acquire's timeout."""
    clock = FakeClock()
    limiter = Limiter(Limits(concurrency=1), clock=clock)
    held = await limiter.acquire()
    outcome: list[str] = []

    async def waiter() -> None:
        try:
            async with limiter.acquire(timeout=10):
                outcome.append("admitted")
        except ratekit.AcquireTimeout:
            outcome.append("timed out")

    async with anyio.create_task_group() as group:
        group.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        clock.step_wall(3600)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []
        clock.advance(5)
        await held.release()
    assert outcome == ["admitted"]
    assert not math.isnan(clock.wall())


# -- `within`: the real-time bound on a wait (SystemClock.wait, a round trip's bound) --


async def test_within_returns_the_result_of_what_ends_in_time() -> None:
    from ratekit._clock import within

    async def answer() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    assert await within(answer(), 5.0) == 42


async def test_within_gives_up_at_its_time_and_cancels_what_it_waited_for() -> None:
    from ratekit._clock import EXPIRED, within

    cancelled = anyio.Event()

    async def forever() -> None:
        try:
            await anyio.sleep(math.inf)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    started = time.monotonic()
    assert await within(forever(), 0.05) is EXPIRED
    assert time.monotonic() - started < 5.0
    assert cancelled.is_set()


async def test_within_lets_a_timeout_error_of_the_awaited_through() -> None:
    """A TimeoutError raised by what is awaited (a client's own) is not the bound's."""
    from ratekit._clock import within

    async def times_out() -> None:
        await anyio.lowlevel.checkpoint()
        raise TimeoutError("the awaited's own")

    with pytest.raises(TimeoutError, match="the awaited's own"):
        await within(times_out(), 5.0)


async def test_within_lets_an_outer_cancellation_through() -> None:
    """A cancel scope around the bound (the caller's own deadline) ends the wait as a
    cancellation, not as the bound's expiry."""
    from ratekit._clock import within

    after: list[str] = []
    with anyio.move_on_after(0.05) as outer:
        await within(anyio.sleep(math.inf), 60.0)
        after.append("went on")
    assert outer.cancelled_caught
    assert after == []


async def test_a_waiting_caller_times_out_and_a_later_one_is_still_served() -> None:
    """On the real clock: a caller whose timeout passes while it waits for a slot gets
    AcquireTimeout, and the slot, once released, goes to the next caller."""
    limiter = Limiter(Limits(concurrency=1))
    held = await limiter.acquire()
    with pytest.raises(ratekit.AcquireTimeout):
        async with limiter.acquire(timeout=0.05):
            pass
    served: list[str] = []

    async def later() -> None:
        async with limiter.acquire(timeout=5):
            served.append("admitted")

    async with anyio.create_task_group() as group:
        group.start_soon(later)
        await anyio.wait_all_tasks_blocked()
        await held.release()
    assert served == ["admitted"]


async def test_a_cancel_scope_that_ends_with_the_acquires_timeout_still_cancels() -> None:
    """The caller's own scope and its acquire's timeout pass in the same turn of a busy
    loop: the scope's cancellation wins (the caller leaves the scope as cancelled), it
    is never taken for the acquire's timeout, and nothing is held afterwards."""
    limiter = Limiter(Limits(concurrency=1))
    held = await limiter.acquire()
    for inner_s, outer_s in [(0.04, 0.05), (0.05, 0.04)]:
        outcome: list[str] = []

        async def caller(
            inner_s: float = inner_s, outer_s: float = outer_s, outcome: list[str] = outcome
        ) -> None:
            try:
                with anyio.move_on_after(outer_s) as scope:
                    async with limiter.acquire(timeout=inner_s):
                        outcome.append("admitted")
                outcome.append(f"cancelled_caught={scope.cancelled_caught}")
            except ratekit.AcquireTimeout:
                outcome.append("AcquireTimeout")

        async with anyio.create_task_group() as group:
            group.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            time.sleep(0.1)  # noqa: ASYNC251  # the loop is busy past both deadlines
        assert outcome == ["cancelled_caught=True"], (inner_s, outer_s)
    await held.release()
    stats = await limiter.statistics()
    assert stats.dimension("concurrency").used == 0
    assert stats.waiting == 0
