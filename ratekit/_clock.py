"""Clocks: the only place ratekit reads time or sleeps.

The window math takes `now` as an argument; a limiter reads its `Clock` and
hands the instant to its backend. Two readings, for two purposes:

- `now()` is monotonic: rolling windows, pacing, wait hints and deadlines run
  on it, so that a step of the wall clock (NTP, a suspended laptop, an operator)
  neither stalls admissions nor admits a burst.
- `wall()` is Unix time: only calendar days (a TPD that resets at midnight in a
  zone) and providers' absolute reset timestamps read it.

`SystemClock` is the real one. `FakeClock` moves only when a test calls
`advance` (both readings) or `step_wall` (the wall clock alone), so limiter
behaviour is tested at exact instants without sleeping.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import math
import sys
import time
from collections.abc import Awaitable
from typing import Final, Literal, NamedTuple, Protocol, TypeVar

import anyio
import anyio.lowlevel
import sniffio

_T = TypeVar("_T")

# asyncio.timeout converts its own expiry to TimeoutError in a task already being
# cancelled only from 3.11.3 on (CPython gh-102780).
_NATIVE_TIMEOUT = sys.version_info >= (3, 11, 3)


class _Expired(enum.Enum):
    """What `within` returns when its time ran out."""

    EXPIRED = "expired"


EXPIRED: Final = _Expired.EXPIRED


async def within(awaitable: Awaitable[_T], timeout_s: float) -> _T | Literal[_Expired.EXPIRED]:
    """`awaitable`'s result, or `EXPIRED` once `timeout_s` seconds of the event loop's
    own clock have passed (the awaitable is then cancelled).

    In an asyncio task this is one timer (`asyncio.timeout`): anyio's cancel scope,
    which other event loops need, costs several objects per waiting caller, and
    with ten thousand callers waiting its timers and cancellations made up a third
    of the process's time. Python before 3.11.3 takes the scope: its
    `asyncio.timeout` turned its own expiry into a cancellation in a task already
    being cancelled.
    """
    if _NATIVE_TIMEOUT and sniffio.current_async_library() == "asyncio":
        scope = asyncio.timeout(timeout_s)
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if not scope.expired():
                raise  # raised by the awaitable itself
        # An anyio scope's cancellation that came in the same step as the expiry was
        # swallowed with it (anyio skips a task whose wait has just ended): a cancelled
        # caller leaves here as cancelled, not as timed out.
        await anyio.lowlevel.checkpoint_if_cancelled()
        return EXPIRED
    with anyio.move_on_after(timeout_s):
        return await awaitable
    return EXPIRED


class Instant(NamedTuple):
    """One reading of a clock: `mono` (monotonic seconds) and `wall` (Unix seconds)."""

    mono: float
    wall: float


class Clock(Protocol):
    """Where a limiter reads the time and waits."""

    def now(self) -> float:
        """Monotonic seconds (an arbitrary origin): never steps back or jumps."""
        ...

    def wall(self) -> float:
        """Unix time in seconds: for calendar days and absolute timestamps only."""
        ...

    async def wait(self, event: anyio.Event, timeout_s: float) -> None:
        """Return when `event` is set or `timeout_s` seconds have passed (`inf`: no timer)."""
        ...


class SystemClock:
    """The real clock: `time.monotonic()`, `time.time()` and the event loop's timers.

    Stateless; share freely.
    """

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def wait(self, event: anyio.Event, timeout_s: float) -> None:
        if math.isinf(timeout_s):
            await event.wait()
            return
        await within(event.wait(), max(timeout_s, 0.0))


class FakeClock:
    """A clock that stands still until `advance` moves it; for tests.

    `now()` starts at `start_s` and `wall()` at `wall_start_s`; `advance` moves
    both, `step_wall` only the wall clock (an NTP step). Waits registered with
    `wait` end when `advance` reaches their deadline. Use one FakeClock per event
    loop.
    """

    def __init__(self, start_s: float = 1_000_000.0, *, wall_start_s: float | None = None) -> None:
        self._now = start_s
        # The wall clock's offset from `now`; moved by `step_wall`.
        self._wall_offset_s = (start_s if wall_start_s is None else wall_start_s) - start_s
        # (deadline, sequence, event) of pending waits, earliest first.
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._sequence = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset_s

    def advance(self, seconds: float) -> None:
        """Move time forward and end every wait whose deadline is reached."""
        if not seconds >= 0 or math.isinf(seconds):
            raise ValueError(f"FakeClock.advance: seconds must be finite and >= 0, got {seconds!r}")
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            heapq.heappop(self._timers)[2].set()

    def instant(self) -> Instant:
        """Both readings at once: the instant a limiter on this clock hands its backend."""
        return Instant(self._now, self._now + self._wall_offset_s)

    def set(self, now_s: float) -> None:
        """Jump to an absolute instant (not earlier than now)."""
        self.advance(now_s - self._now)

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock alone by `seconds` (negative: back), as NTP or an operator
        would; the monotonic reading and pending waits are untouched."""
        self._wall_offset_s += seconds

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
