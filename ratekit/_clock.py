"""Clocks: the only place the async layer reads time or sleeps.

The window math takes `now` as an argument; limiters and the memory backend get
it from a `Clock`. `SystemClock` is the real one. `FakeClock` moves only when a
test calls `advance`, so limiter behaviour is tested at exact instants without
sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where a limiter reads the time and waits.

    `now` is Unix time in seconds (calendar-day windows need wall-clock days).
    """

    def now(self) -> float:
        """The current time in seconds since the epoch."""
        ...

    async def wait(self, event: anyio.Event, timeout_s: float) -> None:
        """Return when `event` is set or `timeout_s` seconds have passed (`inf`: no timer)."""
        ...


class SystemClock:
    """The real clock: `time.time()` and the event loop's timers. Stateless; share freely."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    async def wait(self, event: anyio.Event, timeout_s: float) -> None:
        if math.isinf(timeout_s):
            await event.wait()
            return
        with anyio.move_on_after(max(timeout_s, 0.0)):
            await event.wait()


class FakeClock:
    """A clock that stands still until `advance` moves it; for tests.

    Waits registered with `wait` end when `advance` reaches their deadline. Use one
    FakeClock per event loop.
    """

    def __init__(self, start_s: float = 1_000_000.0) -> None:
        self._now = start_s
        # (deadline, sequence, event) of pending waits, earliest first.
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._sequence = itertools.count()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and end every wait whose deadline is reached."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance: seconds must be >= 0, got {seconds!r}")
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            heapq.heappop(self._timers)[2].set()

    def set(self, now_s: float) -> None:
        """Jump to an absolute instant (not earlier than now)."""
        self.advance(now_s - self._now)

    @property
    def pending_timers(self) -> int:
        """How many waits are sleeping on a deadline."""
        return sum(1 for _, _, event in self._timers if not event.is_set())

    async def wait(self, event: anyio.Event, timeout_s: float) -> None:
        if math.isinf(timeout_s):
            await event.wait()
            return
        if timeout_s <= 0:
            await anyio.lowlevel.checkpoint()
            return
        timer = anyio.Event()
        heapq.heappush(self._timers, (self._now + timeout_s, next(self._sequence), timer))
        try:
            async with anyio.create_task_group() as group:

                async def first_of(source: anyio.Event) -> None:
                    await source.wait()
                    group.cancel_scope.cancel()

                group.start_soon(first_of, event)
                group.start_soon(first_of, timer)
        finally:
            timer.set()  # a cancelled wait leaves no live timer behind
