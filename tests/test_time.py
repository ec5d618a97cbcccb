"""Time has one owner, the limiter's clock: monotonic for windows, wall for calendar days."""

from __future__ import annotations

import math
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
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
