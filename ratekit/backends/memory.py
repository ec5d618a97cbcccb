"""The in-process backend: the window math in this process's memory, shared by nothing."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .._clock import Instant
from .._limits import UNITS, Limits
from .._window import _EPSILON, CalendarWindow, SlicedWindow, Window, new_window
from ._base import (
    HELD_SAFE,
    OUT,
    RECORDED,
    UNIT_POSITION,
    Demand,
    DimensionStatistics,
    Grant,
    Listeners,
    Refusal,
    take_kind,
    takes_no_slot,
)

_WindowKey = tuple[str, float, str | None, int]
_TOKENS = UNIT_POSITION["tokens"]


class FastPlan:
    """The rolling windows one set of limits takes from, flattened for the uncontended
    path (`MemoryBackend.admit_now`, and `settle_now` of its grants): an admission
    that every window has room for, and the settle of a held amount in the very
    slice it was admitted in, cost a few counter updates each.

    That path updates the windows' counters itself, in one frame, rather than
    through their methods: every change equals what `fits`, `record`, `hold_at`,
    `settle_safe` or `settle_usage` would make, and where they would do more (a
    window without room, a settle in a later slice) it changes nothing and the
    general path runs. No window may pace (`pacing` makes every admission move the
    schedule). `checked` holds (window, position of its amount in a demand) for
    every window, what an admission checks; `taken` the same with whether the
    amount is held until settle (else counted at admission), what it takes, in the
    order of the binding's `takes`; `held` holds (window, position, safe) for the
    windows that hold (`safe`: settled the ``safe`` way, else the ``usage`` way).
    """

    __slots__ = ("cap", "checked", "held", "slot", "taken")

    def __init__(
        self, taken: list[tuple[SlicedWindow, int, int]], concurrency: int | None, slot: bool
    ) -> None:
        assert not any(window.pacing for window, _, _ in taken), "a pacing window"
        # The calls in flight that leave no slot free (inf: no concurrency cap).
        self.cap = math.inf if concurrency is None else concurrency
        # Whether an admission takes a slot (see `takes_no_slot`).
        self.slot = slot
        self.checked = tuple((window, position) for window, position, _ in taken)
        self.taken = tuple((window, position, kind != RECORDED) for window, position, kind in taken)
        self.held = tuple(
            (window, position, kind == HELD_SAFE)
            for window, position, kind in taken
            if kind != RECORDED
        )


class _Binding:
    """The windows that enforce one `Limits` value, in the order of `limits.all_rates`."""

    __slots__ = ("calendars", "concurrency", "ends_timed", "limits", "plan", "slotless", "takes")

    def __init__(self, limits: Limits, windows: list[Window]) -> None:
        self.limits = limits
        self.concurrency = limits.concurrency
        # For each window: (window, unit position in a demand, how it is taken).
        self.takes = [
            (window, UNIT_POSITION[rate.unit], take_kind(rate, limits.token_counting))
            for window, rate in zip(windows, limits.all_rates, strict=True)
        ]
        # Admissions that take no slot (see `takes_no_slot`), as on Redis.
        self.slotless = takes_no_slot(limits)
        # Calendar-day windows: told the wall clock before each use.
        self.calendars = [window for window in windows if isinstance(window, CalendarWindow)]
        # The uncontended path (None: a calendar day or pacing, which take the general one).
        self.plan = self._plan()
        # Whether `end_now` needs the instant of the end: a window that holds an amount
        # until settle (`FastPlan.held`) records it then, and what a window recorded at
        # admission counts from the end when the request was never said to leave
        # (`MemoryGrant.sent`).
        self.ends_timed = self.plan is not None and bool(self.plan.taken)

    def _plan(self) -> FastPlan | None:
        taken: list[tuple[SlicedWindow, int, int]] = []
        for window, position, kind in self.takes:
            if not isinstance(window, SlicedWindow) or window.pacing:
                return None
            taken.append((window, position, kind))
        return FastPlan(taken, self.concurrency, not self.slotless)


class MemoryGrant:
    """What one admission took.

    `entries` holds, per window it touched: (window, unit position, kind, slice
    index, amount). A grant of the uncontended path (`FastPlan`) keeps only its
    admission instant, demand and binding, from which `entries` is derived the
    first time it is needed: the same tuples the general path would have kept.
    """

    __slots__ = ("_entries", "admitted_s", "binding", "demand", "sent", "settled", "slot")

    def __init__(
        self,
        entries: list[tuple[Window, int, int, int, float]] | None,
        slot: bool,
        admitted_s: float = math.nan,
        demand: Demand | None = None,
        binding: _Binding | None = None,
    ) -> None:
        self._entries = entries
        # Settled or refunded: a second settle of the same grant changes nothing.
        self.settled = False
        # Whether its request was said to leave (`restamp_now`): what it recorded counts
        # from then. One never said to counts from its end: the request had arrived by
        # then at the latest.
        self.sent = False
        # Whether it counts as a call in flight (see `takes_no_slot`).
        self.slot = slot
        # For a grant of the uncontended path (`entries` None until derived): when it
        # was admitted, what it took, and the windows it took from.
        self.admitted_s = admitted_s
        self.demand = demand
        self.binding = binding

    @property
    def entries(self) -> list[tuple[Window, int, int, int, float]]:
        entries = self._entries
        if entries is None:
            binding, demand, now = self.binding, self.demand, self.admitted_s
            assert binding is not None, "a grant of the uncontended path"
            assert demand is not None, "a grant of the uncontended path"
            entries = self._entries = [
                (window, position, kind, window.slice_index(now), demand[position])
                for window, position, kind in binding.takes
                if demand[position] or kind != RECORDED
            ]
        return entries


LaneGrant = tuple[_Binding, float, Demand]
"""A grant of the uncontended path (`MemoryBackend.admit_now`): the binding it was
admitted under, its instant and its demand; a plain tuple, since its holder (a
limiter's admission) ends it once. `MemoryBackend.grant_of` makes it the
`MemoryGrant` the general path would have kept, for anything else."""


class MemoryBackend:
    """Keeps usage in this process; the default backend of a `Limiter`.

    One instance is one account. It may be shared by several limiters of one event
    loop (they then share the account's usage); it is not thread-safe and not
    shared across processes (use the Redis backend for that). It reads no clock:
    every operation takes the instant its limiter hands it (`now`: monotonic
    seconds; `wall`: Unix seconds, read only for calendar-day windows).
    """

    __slots__ = ("_binding", "_in_flight", "_listeners", "_out", "_paused_until", "_windows")

    def __init__(self) -> None:
        # Every window ever bound, by (unit, period, calendar zone, slices).
        self._windows: dict[_WindowKey, Window] = {}
        # The binding of the limits seen last (usually the only ones).
        self._binding: _Binding | None = None
        # Admitted calls not yet settled that took a slot: what a concurrency cap
        # counts, whether or not one was in force when they were admitted (calls under
        # requests alone take none, see `takes_no_slot`).
        self._in_flight = 0
        self._listeners = Listeners()
        # Until when every admission is refused (a provider's 429 cooldown).
        self._paused_until = -math.inf
        # Whether that pause is an account taken out (its quota spent), not a cooldown.
        self._out = False

    def _bind(self, limits: Limits) -> _Binding:
        binding = self._binding
        if binding is not None and binding.limits is limits:
            return binding
        windows = []
        for rate in limits.all_rates:
            key = (*rate.key, rate.slices)
            pacing = limits.pacing and rate.unit == "requests"
            window = self._windows.get(key)
            if window is None:
                window = new_window(rate, margin_s=limits.margin_s, pacing=pacing)
                self._windows[key] = window
            else:
                window.configure(rate.limit, margin_s=limits.margin_s, pacing=pacing)
            windows.append(window)
        self._binding = binding = _Binding(limits, windows)
        return binding

    def admit_now(self, limits: Limits, demand: Demand, now: float) -> LaneGrant | None:
        """`reserve_now`'s uncontended path alone, for a limiter's hot path: a `LaneGrant`
        when `limits` are the ones bound last, with a plan (`FastPlan`), no pause, a
        free slot and room in every window; None, with nothing taken, otherwise (then
        `reserve_now` answers). `now` is monotonic seconds. The grant is ended with
        `end_now`, or made a `MemoryGrant` with `grant_of` for any other use."""
        binding = self._binding
        if binding is None or binding.limits is not limits:
            return None
        plan = binding.plan
        if plan is None or now < self._paused_until or self._in_flight >= plan.cap:
            return None
        # `fits` of every window, then `record` or `hold_at`, as counter updates.
        for window, position in plan.checked:
            amount = demand[position]
            if amount:
                if now >= window._first_expiry_s:
                    window.expire(now)
                if window._total + window._held + amount > window._ceiling:
                    return None
        for window, position, held in plan.taken:
            amount = demand[position]
            if held:
                window._held += amount
            elif not amount:
                continue
            elif window._last_start_s <= now < window._last_end_s:
                window._slices[-1][1] += amount
                window._total += amount
            else:
                window._add(math.floor(now / window.slice_s), amount)
        if plan.slot:
            self._in_flight += 1
        return (binding, now, demand)

    def end_now(self, grant: LaneGrant, actual: Demand | None, now: float) -> bool:
        """End a grant of `admit_now` with the real usage `actual` at `now` in a few counter
        updates, as `settle_now` would: when the limits it was admitted under are the
        ones bound now (no other limits changed its windows since), `actual` counts no
        tokens of the provider's (`counted` NaN), and `now` is still in the admission's
        slice, the newest, of each window it took from (or, for a window that holds,
        nothing is recorded at the end). False, with nothing changed, otherwise
        (a refund included): then `settle_now(grant_of(grant), ...)` ends it. `now` may
        be NaN (the clock not read) when the grant's binding does not `ends_timed`."""
        binding, admitted_s, demand = grant
        if binding is not self._binding or actual is None or actual[3] == actual[3]:
            return False
        plan = binding.plan
        assert plan is not None, "a grant of the uncontended path"
        # Never said to leave (a grant of this path is not restamped), what it recorded
        # counts from the end: nothing to do while the end is in the admission's slice.
        for window, position, holds in plan.taken:
            if (
                not holds
                and demand[position]
                and not window._last_start_s <= admitted_s <= now < window._last_end_s
            ):
                return False
        held = plan.held
        if held:
            for window, position, safe in held:
                if not window._last_start_s <= admitted_s <= now < window._last_end_s and (
                    actual[position] or (safe and demand[position])
                ):
                    return False  # something to record in a slice other than the newest
            # `settle_safe` or `settle_usage` in the admission's slice.
            for window, position, safe in held:
                amount = demand[position]
                real = actual[position]
                window._held -= amount
                if window._held < window.limit * _EPSILON:
                    window._held = 0.0
                if safe and amount > real:
                    real = amount
                if real:
                    window._slices[-1][1] += real
                    window._total += real
        if plan.slot:
            self._in_flight -= 1
        if self._listeners:
            self._listeners.notify()
        return True

    @staticmethod
    def grant_of(grant: LaneGrant) -> MemoryGrant:
        """The `MemoryGrant` the general path keeps for a grant of `admit_now`."""
        binding, admitted_s, demand = grant
        return MemoryGrant(None, not binding.slotless, admitted_s, demand, binding)

    def reserve_now(
        self, limits: Limits, demand: Demand, now: float, wall: float = math.nan
    ) -> MemoryGrant | Refusal:
        """`reserve` at an explicit instant: the synchronous core.

        `now` is monotonic seconds; `wall` (Unix seconds) is needed only when
        `limits` has a calendar-day rate.
        """
        binding = self._binding
        if binding is None or binding.limits is not limits:
            binding = self._bind(limits)
        if binding.plan is not None:
            lane = self.admit_now(limits, demand, now)
            if lane is not None:
                return self.grant_of(lane)
        if binding.calendars:
            self._sync_calendars(binding, now, wall)
        if now < self._paused_until:
            return Refusal(self._paused_until - now, OUT if self._out else "cooldown")
        if binding.concurrency is not None and self._in_flight >= binding.concurrency:
            return Refusal(math.inf, "concurrency")
        takes = binding.takes
        for window, position, _ in takes:
            amount = demand[position]
            if amount and not window.fits(now, amount):
                return self._refusal(takes, demand, now)
        entries = []
        for window, position, kind in takes:
            amount = demand[position]
            if not amount and kind == RECORDED:
                continue  # a held amount of 0 is kept: its settle records the real usage
            take = window.record if kind == RECORDED else window.hold_at
            index = take(now, amount)
            entries.append((window, position, kind, index, amount))
        if binding.slotless:
            return MemoryGrant(entries, False)
        self._in_flight += 1
        return MemoryGrant(entries, True)

    @staticmethod
    def _refusal(takes: list[tuple[Window, int, int]], demand: Demand, now: float) -> Refusal:
        worst_s, worst_name = 0.0, ""
        for window, position, _ in takes:
            amount = demand[position]
            if amount:
                wait_s = window.wait_s(now, amount)
                if wait_s > worst_s:
                    worst_s, worst_name = wait_s, window.name
        return Refusal(worst_s, worst_name)

    @staticmethod
    def _sync_calendars(binding: _Binding, now: float, wall: float) -> None:
        if math.isnan(wall):
            raise ValueError("a calendar-day rate needs the wall clock: pass `wall`")
        for window in binding.calendars:
            window.sync(now, wall)

    def settle_now(
        self, grant: MemoryGrant, actual: Demand | None, now: float, wall: float = math.nan
    ) -> None:
        """`settle` at an explicit instant; only the first settle of a grant counts."""
        if grant.settled:
            return
        binding = grant.binding
        if binding is not None and grant._entries is None:
            # A grant of the uncontended path, its entries not derived (so never
            # restamped): ended as one of `admit_now`'s when it can be (its end in the
            # admission's slice: nothing to count from the end).
            assert grant.demand is not None, "a grant of the uncontended path"
            if self.end_now((binding, grant.admitted_s, grant.demand), actual, now):
                grant.settled = True
                return
        if actual is not None and not grant.sent:
            # Never said to leave: the request had arrived by its end, counted from then.
            self.restamp_now(grant, now)
        grant.settled = True
        binding = self._binding
        if binding is not None and binding.calendars and not math.isnan(wall):
            self._sync_calendars(binding, now, wall)
        if actual is None:
            for window, _, kind, index, amount in grant.entries:
                if kind == RECORDED:
                    window.refund(now, index, amount)
                else:
                    window.unhold(amount)
        else:
            counted = actual.counted
            known = not math.isnan(counted)
            for window, position, kind, index, amount in grant.entries:
                reserved = counted if known and position == _TOKENS else amount
                if kind == HELD_SAFE:
                    window.settle_safe(now, index, amount, actual[position], reserved)
                elif kind != RECORDED:
                    window.settle_usage(now, amount, actual[position])
                elif reserved < amount:
                    # Counted at admission, as the provider does, with an estimate the
                    # provider's own count corrects.
                    window.refund(now, index, amount - reserved)
                elif reserved > amount:
                    window.add_to_slice(now, index, reserved - amount)
        if grant.slot:
            self._in_flight -= 1
        if self._listeners:
            self._listeners.notify()

    def restamp_now(self, grant: MemoryGrant, now: float) -> None:
        """The call of `grant` left the process at `now`: what it recorded at its
        admission counts from now, as the provider counts it from arrival."""
        if grant.settled:
            return
        grant.sent = True
        entries = grant.entries
        for i, (window, position, kind, index, amount) in enumerate(entries):
            if kind == RECORDED:
                moved = window.move(now, index, amount)
            elif kind == HELD_SAFE and not isinstance(window, CalendarWindow):
                # Where its remainder counts. A calendar day keeps the admission's day, as
                # a recorded amount does (see `CalendarWindow.move`).
                moved = max(window.slice_index(now), index)
            else:
                continue
            if moved != index:
                entries[i] = (window, position, kind, moved, amount)

    async def restamp(self, limits: Limits, grant: Grant, now: Instant) -> None:
        assert isinstance(grant, MemoryGrant), "a grant of another backend"
        self.restamp_now(grant, now.mono)

    def statistics_now(
        self, limits: Limits, now: float, wall: float = math.nan
    ) -> tuple[DimensionStatistics, ...]:
        """`statistics` at an explicit instant."""
        binding = self._bind(limits)
        if binding.calendars:
            self._sync_calendars(binding, now, wall)
        stats = []
        if binding.concurrency is not None:
            stats.append(
                DimensionStatistics(
                    "concurrency",
                    "slots",
                    binding.concurrency,
                    self._in_flight,
                    self._in_flight,
                )
            )
        for window, position, _ in binding.takes:
            used = window.used(now)
            unit = UNITS[position]
            stats.append(DimensionStatistics(window.name, unit, window.limit, used, window.held))
        return tuple(stats)

    def live_slices(self) -> int:
        """Slices kept over every window: memory is O(slices) whatever the traffic."""
        return sum(window.live_slices() for window in self._windows.values())

    def pause_now(self, seconds: float, now: float, *, out: bool = False) -> float:
        """`pause` at an explicit instant."""
        # An account out stays out while its pause lasts, however it is lengthened.
        self._out = out or (self._out and now < self._paused_until)
        if now + seconds > self._paused_until:
            self._paused_until = now + seconds
        return self._paused_until - now

    # -- the Backend protocol ----------------------------------------------------

    async def pause(self, seconds: float, now: Instant, *, out: bool = False) -> float:
        return self.pause_now(seconds, now.mono, out=out)

    async def reserve(self, limits: Limits, demand: Demand, now: Instant) -> MemoryGrant | Refusal:
        return self.reserve_now(limits, demand, now.mono, now.wall)

    async def reserve_many(
        self, limits: Limits, demands: Sequence[Demand], now: Instant
    ) -> tuple[list[Grant], Refusal | None]:
        grants: list[Grant] = []
        for demand in demands:
            outcome = self.reserve_now(limits, demand, now.mono, now.wall)
            if isinstance(outcome, Refusal):
                return grants, outcome
            grants.append(outcome)
        return grants, None

    async def settle(
        self, limits: Limits, grant: Grant, actual: Demand | None, now: Instant
    ) -> None:
        self.abandon(limits, grant, actual, now)

    def abandon(self, limits: Limits, grant: Grant, actual: Demand | None, now: Instant) -> None:
        assert isinstance(grant, MemoryGrant), "a grant of another backend"
        self.settle_now(grant, actual, now.mono, now.wall)

    async def statistics(self, limits: Limits, now: Instant) -> tuple[DimensionStatistics, ...]:
        return self.statistics_now(limits, now.mono, now.wall)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        return self._listeners.add(listener)

    async def aclose(self) -> None:
        """Nothing to close: the memory backend holds no connection or task."""
