"""Window math: how much of a rate is in use at an instant, and when more frees up.

Pure state machines with no I/O and no clock reads: every method that depends on
time takes `now` (seconds, on the clock of whoever owns the window). The Redis
backend runs the same rules in Lua; both are checked against one table of cases.

A rolling rate of ``limit`` per ``period_s`` is kept as slices of
``slice_s = period_s / slices``. An amount recorded at `now` lands in slice
``k = floor(now / slice_s)`` and counts until ``(k + 1) * slice_s + period_s +
margin_s``: never early, so any window of length `period_s` holds at most `limit`.
Amounts *held* (tokens of a call in flight, under the ``usage`` and ``safe`` token
counting modes) count until they are released, whatever the time.
"""

from __future__ import annotations

import math
import zoneinfo
from collections import deque
from datetime import datetime, timedelta
from typing import Final

from ._limits import Rate

# Relative slack when comparing sums of floats against a limit (money amounts).
_EPSILON: Final = 1e-12


def _first_instant(index: int, slice_s: float) -> float:
    """The smallest float `now` with ``floor(now / slice_s) >= index``: where slice
    `index` starts, exactly as `SlicedWindow.slice_index` rounds (a float product
    ``index * slice_s`` may be an ulp or two off either way)."""
    now = index * slice_s
    while math.floor(now / slice_s) >= index:
        now = math.nextafter(now, -math.inf)
    while math.floor(now / slice_s) < index:
        now = math.nextafter(now, math.inf)
    return now


class _Holding:
    """What both windows do alike with the amounts of calls in flight (held): they count
    until released, whatever the time."""

    __slots__ = ("_held", "limit")

    _held: float  # amounts of calls in flight; they never expire on their own
    limit: float

    @property
    def held(self) -> float:
        """The amount held by calls in flight."""
        return self._held

    def record(self, now: float, amount: float) -> int:
        """Count `amount` at `now`; returns the slice index it landed in."""
        raise NotImplementedError

    def settle_usage(self, now: float, reserved: float, real: float) -> None:
        """Settle a held call the ``usage`` way: drop the hold, count `real` from now."""
        self.unhold(reserved)
        self.record(now, real)

    def unhold(self, amount: float) -> None:
        """Stop counting a held amount."""
        self._held -= amount
        if self._held < self.limit * _EPSILON:
            self._held = 0.0


class SlicedWindow(_Holding):
    """The in-use amount of one rolling rate, as a ring of live slices.

    At most ``slices + 1 + ceil(margin_s / slice_s)`` slices are live at once.

    Not thread-safe; owned by one backend. `limit`, `margin_s` and `pacing` may be
    changed in place with `configure` (a tier upgrade keeps what was used so far).
    The memory backend's uncontended path (`ratekit.backends.memory.FastPlan`)
    updates `_total`, `_held` and the newest slice itself, as `record`, `hold_at`,
    `settle_safe` and `settle_usage` do in the cases it takes.
    """

    __slots__ = (
        "_ceiling",
        "_first_expiry_s",
        "_last_end_s",
        "_last_start_s",
        "_pace_next_s",
        "_slices",
        "_total",
        "margin_s",
        "name",
        "pacing",
        "period_s",
        "slice_s",
    )

    def __init__(self, rate: Rate, *, margin_s: float = 0.0, pacing: bool = False) -> None:
        self.name = rate.name
        self.period_s = rate.period_s
        self.slice_s = rate.period_s / rate.slices
        # [slice index, amount] pairs, oldest first; indexes strictly increase.
        self._slices: deque[list[float]] = deque()
        # Sum of the amounts in `_slices`.
        self._total = 0.0
        # Amounts of calls in flight; they never expire on their own.
        self._held = 0.0
        # With pacing: the earliest instant of the next admission.
        self._pace_next_s = -math.inf
        # When the oldest slice stops counting (inf: no slice), so that `expire`
        # is one comparison while nothing is due.
        self._first_expiry_s = math.inf
        # The instants the newest slice spans, [start, end): exactly the floats `now`
        # with ``floor(now / slice_s)`` its index, so that finding the slice of an
        # instant in it (the usual case) takes two comparisons and no division.
        self._last_start_s = math.inf
        self._last_end_s = -math.inf
        self.configure(rate.limit, margin_s=margin_s, pacing=pacing)

    def configure(self, limit: float, *, margin_s: float, pacing: bool) -> None:
        """Change the limit, margin and pacing; what was used so far keeps counting."""
        self.limit = float(limit)
        # The largest total that still fits, with slack for float sums of money.
        self._ceiling = self.limit * (1 + _EPSILON)
        self.margin_s = margin_s
        self.pacing = pacing
        self._first_expiry_s = self.expiry_s(self._slices[0][0]) if self._slices else math.inf

    # -- reading ---------------------------------------------------------------

    def slice_index(self, now: float) -> int:
        """The slice an amount recorded at `now` lands in: ``floor(now / slice_s)``."""
        if self._last_start_s <= now < self._last_end_s:
            return int(self._slices[-1][0])
        return math.floor(now / self.slice_s)

    def expiry_s(self, index: float) -> float:
        """The instant at which slice `index` stops counting."""
        return (index + 1) * self.slice_s + self.period_s + self.margin_s

    def expire(self, now: float) -> None:
        """Drop the slices that no longer count at `now`."""
        if now < self._first_expiry_s:
            return
        slices = self._slices
        while slices and self.expiry_s(slices[0][0]) <= now:
            self._total -= slices.popleft()[1]
        if slices:
            self._first_expiry_s = self.expiry_s(slices[0][0])
        else:
            self._total = 0.0  # no float residue once empty
            self._first_expiry_s = math.inf
            self._last_start_s, self._last_end_s = math.inf, -math.inf

    def fits(self, now: float, amount: float) -> bool:
        """Whether `amount` can be admitted at `now` (the fast half of `wait_s`)."""
        if now >= self._first_expiry_s:
            self.expire(now)
        if self._total + self._held + amount > self._ceiling:
            return False
        return not self.pacing or now >= self._pace_next_s

    def used(self, now: float) -> float:
        """The amount counting against the limit at `now`: live slices plus holds."""
        self.expire(now)
        return self._total + self._held

    def wait_s(self, now: float, amount: float) -> float:
        """Seconds from `now` until `amount` fits; 0 when it fits now.

        `math.inf` when only a release of held amounts could make room. The caller
        has checked ``amount <= limit``.
        """
        self.expire(now)
        pace_wait = self._pace_next_s - now if self.pacing else 0.0
        used = self._total + self._held
        # The same test as `fits`, so that a hint never disagrees with an admission.
        if used + amount <= self._ceiling:
            return max(pace_wait, 0.0)
        excess = used + amount - self._ceiling
        if excess > self._total:
            return math.inf
        freed = 0.0
        for index, slice_amount in self._slices:
            freed += slice_amount
            if freed >= excess:
                return max(self.expiry_s(index) - now, pace_wait)
        # Only float drift of `_total` above the slices' sum lands here: by the
        # newest slice's expiry everything recorded so far is gone.
        return max(self.expiry_s(self._slices[-1][0]) - now, pace_wait)

    def live_slices(self) -> int:
        """How many slices are kept (memory is O(slices) whatever the traffic)."""
        return len(self._slices)

    # -- writing ---------------------------------------------------------------

    def record(self, now: float, amount: float) -> int:
        """Count `amount` at `now`; returns the slice index it landed in."""
        if self.pacing and amount:
            # The schedule may lag `now` by one request's spacing: a caller woken a
            # little late catches up instead of losing the time for good, and no burst
            # is longer than two.
            one_s = self.period_s / self.limit
            self._pace_next_s = max(self._pace_next_s, now - one_s) + amount * one_s
        if self._last_start_s <= now < self._last_end_s:
            newest = self._slices[-1]
            newest[1] += amount
            self._total += amount
            return int(newest[0])
        index = math.floor(now / self.slice_s)
        if amount:
            self._add(index, amount)
        return index

    def _add(self, index: int, amount: float) -> None:
        slices = self._slices
        if slices and slices[-1][0] == index:
            slices[-1][1] += amount
        elif not slices or slices[-1][0] < index:
            slices.append([index, amount])
            self._last_start_s = _first_instant(index, self.slice_s)
            self._last_end_s = _first_instant(index + 1, self.slice_s)
            if len(slices) == 1:
                self._first_expiry_s = self.expiry_s(index)
        else:
            self._add_to_past(index, amount)
        self._total += amount

    def _add_to_past(self, index: int, amount: float) -> None:
        # A recording into an older live slice (the safe mode's remainder); the
        # caller checked the slice has not expired.
        for position, entry in enumerate(self._slices):
            if entry[0] == index:
                entry[1] += amount
                return
            if entry[0] > index:
                self._slices.insert(position, [index, amount])
                if position == 0:
                    self._first_expiry_s = self.expiry_s(index)
                return

    def hold_at(self, now: float, amount: float) -> int:
        """Hold `amount` for a call admitted at `now`; returns the admission's slice."""
        self._held += amount
        return self.slice_index(now)

    def settle_safe(
        self, now: float, index: int, held: float, real: float, reserved: float | None = None
    ) -> None:
        """Settle a held call admitted in slice `index` the ``safe`` way.

        Until slice `index` expires, count max(reserved, real): the remainder of the
        reservation there, the real usage now; afterwards only the real usage.
        `reserved` is what the provider counted at arrival when the answer told
        (default: `held`, ratekit's estimate).
        """
        self._held -= held
        if self._held < self.limit * _EPSILON:
            self._held = 0.0
        if reserved is None:
            reserved = held
        if self._last_start_s <= now < self._last_end_s and self._slices[-1][0] == index:
            self.record(now, max(reserved, real))  # admitted in this very slice
            return
        if reserved > real:
            self.add_to_slice(now, index, reserved - real)
        self.record(now, real)

    def add_to_slice(self, now: float, index: int, amount: float) -> bool:
        """Count `amount` in the older slice `index` if it still counts at `now`.

        Returns whether it was counted (an expired slice takes nothing).
        """
        if amount <= 0 or self.expiry_s(index) <= now:
            return False
        self.expire(now)
        self._add(index, amount)
        return True

    def refund(self, now: float, index: int, amount: float) -> float:
        """Take back `amount` recorded in slice `index`; returns what was taken back.

        An expired slice gives back nothing (it no longer counts anyway).
        """
        self.expire(now)
        for entry in reversed(self._slices):
            if entry[0] == index:
                taken = min(entry[1], amount)
                entry[1] -= taken
                self._total -= taken
                return taken
            if entry[0] < index:
                break
        return 0.0

    def move(self, now: float, index: int, amount: float) -> int:
        """Count `amount`, recorded in slice `index`, from `now` instead (the request it
        stands for left the process now); returns the slice it counts in.

        The amount is counted in the slice of `now` even when slice `index` has
        expired since: the provider counts the request from its arrival.
        """
        new = self.slice_index(now)
        if new <= index or amount <= 0:
            return index
        self.refund(now, index, amount)
        self._add(new, amount)
        return new


class CalendarWindow(_Holding):
    """The in-use amount of a daily rate that resets at midnight in a time zone.

    The day is a wall-clock matter, everything else is not: `sync(now, wall)`
    tells the window both readings of the clock (monotonic `now`, Unix `wall`)
    before each use, and the day's boundaries are found from `wall` with the
    zone's offset for that very instant (daylight saving included). The end of
    the day is then kept as a monotonic instant, so wait hints are durations on
    the same clock as every other window's. Same interface as `SlicedWindow`;
    the "slice" is the day's start (Unix seconds).
    """

    __slots__ = (
        "_day_end_s",
        "_day_end_wall_s",
        "_day_start_wall_s",
        "_total",
        "_zone",
        "name",
    )

    def __init__(self, rate: Rate) -> None:
        assert rate.calendar_tz is not None
        self.name = rate.name
        self.limit = float(rate.limit)
        self._zone = zoneinfo.ZoneInfo(rate.calendar_tz)
        # The current day, as Unix instants, and its end on the monotonic clock.
        self._day_start_wall_s = -math.inf
        self._day_end_wall_s = -math.inf
        self._day_end_s = -math.inf
        self._total = 0.0
        self._held = 0.0

    def sync(self, now: float, wall: float) -> None:
        """Read the clock: roll to a new day when `wall` reached the current one's end."""
        if wall >= self._day_end_wall_s:
            local = datetime.fromtimestamp(math.floor(wall), self._zone)
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=1)).replace(tzinfo=self._zone)
            self._day_start_wall_s = start.timestamp()
            self._day_end_wall_s = end.timestamp()
            self._total = 0.0
        # A wall clock stepped back stays on the current day (its count is all we
        # have); the end is as far away as the wall clock says.
        self._day_end_s = now + (self._day_end_wall_s - wall)

    def configure(self, limit: float, *, margin_s: float, pacing: bool) -> None:
        """Change the limit (margin and pacing do not apply to calendar days)."""
        self.limit = float(limit)

    def slice_index(self, now: float) -> int:
        return int(self._day_start_wall_s)

    def fits(self, now: float, amount: float) -> bool:
        return self.wait_s(now, amount) == 0.0

    def used(self, now: float) -> float:
        return self._total + self._held

    def wait_s(self, now: float, amount: float) -> float:
        ceiling = self.limit * (1 + _EPSILON)
        used = self._total + self._held
        if used + amount <= ceiling:
            return 0.0
        if used + amount - ceiling > self._total:
            return math.inf
        return max(self._day_end_s - now, 0.0)

    def live_slices(self) -> int:
        return 1

    def record(self, now: float, amount: float) -> int:
        self._total += amount
        return int(self._day_start_wall_s)

    def hold_at(self, now: float, amount: float) -> int:
        self._held += amount
        return int(self._day_start_wall_s)

    def settle_safe(
        self, now: float, index: int, held: float, real: float, reserved: float | None = None
    ) -> None:
        self.unhold(held)
        if reserved is None:
            reserved = held
        if reserved > real:
            self.add_to_slice(now, index, reserved - real)
        self.record(now, real)

    def add_to_slice(self, now: float, index: int, amount: float) -> bool:
        if amount <= 0 or index != int(self._day_start_wall_s):
            return False
        self._total += amount
        return True

    def refund(self, now: float, index: int, amount: float) -> float:
        if index != int(self._day_start_wall_s):
            return 0.0
        taken = min(self._total, amount)
        self._total -= taken
        return taken

    def move(self, now: float, index: int, amount: float) -> int:
        """A request's day does not change when it is sent a moment after its admission."""
        return index


Window = SlicedWindow | CalendarWindow


def new_window(rate: Rate, *, margin_s: float = 0.0, pacing: bool = False) -> Window:
    """The window that enforces `rate`: calendar-day when `rate.calendar_tz` is set."""
    if rate.calendar_tz is not None:
        return CalendarWindow(rate)
    return SlicedWindow(rate, margin_s=margin_s, pacing=pacing and rate.unit == "requests")
