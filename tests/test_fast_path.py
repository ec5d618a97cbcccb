"""The memory backend's uncontended path (`FastPlan`) against its general path.

The fast path admits and settles with a few counter updates where the windows' own
methods would do the same; these tests play one random operation sequence on a
backend with the fast path and on one without it, on a fake clock, and require the
same outcomes and the very same window state after every operation.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratekit import Limits, Rate, TokenCounting
from ratekit._clock import Instant
from ratekit._window import SlicedWindow, _first_instant
from ratekit.backends import Demand, Grant, Refusal
from ratekit.backends.memory import MemoryBackend, MemoryGrant
from ratekit.backends.memory import _WindowKey as WindowKey

from .window_cases import BASE_S


class GeneralOnly:
    """A memory backend that never takes the uncontended path: the reference.

    It wraps one rather than subclass it (a compiled backend cannot be subclassed from
    Python): every admission goes through `reserve_now` here, which first takes the plan
    off the wrapped backend's binding of the limits (binding them, as its own
    `reserve_now` would). A limiter does not take its lane with it: not a MemoryBackend.
    """

    def __init__(self) -> None:
        self.inner = MemoryBackend()

    def reserve_now(
        self, limits: Limits, demand: Demand, now: float, wall: float = math.nan
    ) -> MemoryGrant | Refusal:
        self.inner._bind(limits).plan = None
        return self.inner.reserve_now(limits, demand, now, wall)

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def window_state(backend: MemoryBackend) -> dict[WindowKey, tuple[object, ...]]:
    """Everything a window keeps, per window, and the calls in flight."""
    state: dict[WindowKey, tuple[object, ...]] = {}
    for key, window in backend._windows.items():
        assert isinstance(window, SlicedWindow)
        state[key] = (
            [tuple(entry) for entry in window._slices],
            window._total,
            window.held,
            window._first_expiry_s,
            window._last_start_s,
            window._last_end_s,
            window._pace_next_s,
        )
    return state


def outcome_of(outcome: MemoryGrant | Refusal) -> object:
    if isinstance(outcome, Refusal):
        return outcome
    if outcome._entries is None:
        # Derived on a copy: deriving them on the grant itself would send its settle
        # down the general path.
        copy = MemoryGrant(None, outcome.slot, outcome.admitted_s, outcome.demand, outcome.binding)
        entries = copy.entries
    else:
        entries = outcome.entries
    return ("granted", outcome.slot, [(window.name, *rest) for window, *rest in entries])


@st.composite
def limits_pair(draw: st.DrawFn) -> tuple[Limits, Limits]:
    """Two limits over the same windows (a tier change back and forth)."""
    period_s = draw(st.sampled_from([1.0, 2.5, 10.0, 60.0]))
    slices = draw(st.sampled_from([1, 3, 10, 60]))
    tokens_slices = draw(st.sampled_from([1, 7, 60]))
    counting = draw(st.sampled_from(list(TokenCounting)))

    def one() -> Limits:
        requests = draw(st.sampled_from([2, 8, 40]))
        rates = [Rate(requests, period_s, "requests", name="req", slices=slices)]
        tokens = draw(st.sampled_from([60, 200, 2000]))
        if draw(st.integers(0, 3)):  # else requests alone: no slot without a cap
            rates.append(Rate(tokens, period_s * 2, "tokens", "tok", slices=tokens_slices))
        if draw(st.booleans()):
            rates.append(Rate(draw(st.sampled_from([1.0, 2.5])), period_s, "money", name="usd"))
        return Limits(
            concurrency=draw(st.none() | st.integers(1, 12)),
            rates=tuple(rates),
            margin_s=draw(st.sampled_from([0.0, 0.5])),
            pacing=draw(st.booleans()) and draw(st.booleans()),
            token_counting=counting,
        )

    return one(), one()


reserve = st.tuples(
    st.just("reserve"),
    st.integers(0, 2),
    st.integers(0, 60),
    st.sampled_from([0.0, 0.125, 0.5, 1.0]),
)
settle = st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0, 1.5), st.floats(0, 1))
release = st.tuples(st.just("release"), st.integers(0, 30), st.just(0), st.just(0.0))
# Admissions and their ends most of the time; now and then anything else that a
# backend is asked.
operation = st.one_of(
    reserve,
    reserve,
    reserve,
    settle,
    settle,
    release,
    st.tuples(st.just("settle_counted"), st.integers(0, 30), st.integers(0, 80), st.just(0.0)),
    st.tuples(st.just("refund"), st.integers(0, 30), st.just(0), st.just(0.0)),
    st.tuples(st.just("sent"), st.integers(0, 30), st.just(0), st.just(0.0)),
    st.tuples(st.just("pause"), st.integers(0, 3), st.just(0), st.just(0.0)),
    st.tuples(st.just("switch"), st.just(0), st.just(0), st.just(0.0)),
)
# Mostly no time or a short step, so that an admission and its end often share a
# slice; now and then a long step, an exact slice edge or the float just before one.
delay = st.one_of(
    st.just(0.0),
    st.just(0.0),
    st.just(0.0),
    st.just(0.001),
    st.floats(0, 0.3).map(lambda x: round(x, 3)),
    st.floats(0, 1.5).map(lambda x: round(x, 3)),
    st.floats(0, 40).map(lambda x: round(x, 1)),
    st.sampled_from(["edge", "before edge"]),
)
steps = st.lists(st.tuples(delay, operation), min_size=10, max_size=120)


def next_instant(now: float, step: object, slice_s: float) -> float:
    if step == "edge":
        return _first_instant(math.floor(now / slice_s) + 1, slice_s)
    if step == "before edge":
        edge = _first_instant(math.floor(now / slice_s) + 1, slice_s)
        return max(now, math.nextafter(edge, -math.inf))
    assert isinstance(step, float)
    return now + step


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=limits_pair(), script=steps)
def test_the_fast_path_keeps_the_windows_as_the_general_path_does(
    pair: tuple[Limits, Limits], script: list
) -> None:
    """Same outcomes and the same state of every window after every operation."""
    fast, general = MemoryBackend(), GeneralOnly()
    limits = pair[0]
    slice_s = limits.all_rates[0].period_s / limits.all_rates[0].slices
    now = BASE_S
    admitted: list[tuple[Demand, MemoryGrant, MemoryGrant]] = []
    for step, (kind, a, b, c) in script:
        now = next_instant(now, step, slice_s)
        if kind == "reserve":
            demand = Demand(a, b, c)
            one = fast.reserve_now(limits, demand, now)
            other = general.reserve_now(limits, demand, now)
            assert outcome_of(one) == outcome_of(other), (kind, demand, now)
            if isinstance(one, MemoryGrant):
                assert isinstance(other, MemoryGrant)
                admitted.append((demand, one, other))
        elif kind == "pause":
            assert fast.pause_now(a, now) == general.pause_now(a, now)
        elif kind == "switch":
            limits = pair[1] if limits is pair[0] else pair[0]
        elif admitted:
            # A grant not yet ended, counted from the newest; once all are, a second end.
            live = [entry for entry in admitted if not entry[1].settled] or admitted
            demand, one, other = live[-1 - a % len(live)]
            actual: Demand | None
            if kind == "sent":
                fast.restamp_now(one, now)
                general.restamp_now(other, now)
                continue
            if kind == "settle":
                actual = Demand(demand.requests, demand.tokens * b, demand.cost * c)
            elif kind == "settle_counted":
                actual = Demand(demand.requests, demand.tokens, demand.cost, counted=b)
            elif kind == "release":
                actual = demand
            else:
                actual = None
            fast.settle_now(one, actual, now)
            general.settle_now(other, actual, now)
        assert fast._in_flight == general._in_flight
        assert window_state(fast) == window_state(general), (kind, now)
        assert fast.statistics_now(limits, now) == general.statistics_now(limits, now)


def test_an_uncontended_admission_takes_the_fast_path() -> None:
    """A grant under every-dimension limits keeps no entries until asked for them."""
    backend = MemoryBackend()
    limits = Limits(concurrency=2, rpm=10, tpm=1000, tpd=10_000)
    grant = backend.reserve_now(limits, Demand(1, 100), BASE_S)
    assert isinstance(grant, MemoryGrant)
    assert grant._entries is None
    backend.settle_now(grant, Demand(1, 80), BASE_S + 0.5)
    assert grant.settled
    assert backend._in_flight == 0
    rpm, tpm, tpd = backend.statistics_now(limits, BASE_S + 0.5)[1:]
    assert (rpm.used, tpm.used, tpd.used) == (1, 100, 100)  # "safe": max(reserved, real)
    assert (tpm.in_flight, tpd.in_flight) == (0, 0)


def test_pacing_and_calendar_days_take_the_general_path() -> None:
    """No plan where every admission moves a schedule or a day is read off the wall."""
    backend = MemoryBackend()
    assert backend._bind(Limits(rpm=10, pacing=True)).plan is None
    assert backend._bind(Limits(rpm=10, tpd=100, tpd_calendar_tz="UTC")).plan is None
    assert backend._bind(Limits(rpm=10, tpd=100)).plan is not None


@given(
    index=st.integers(-(10**9), 10**12),
    slice_s=st.sampled_from([0.001, 0.1, 0.3, 1.0, 1 / 3, 2.5, 7.0, 1440.0]),
)
def test_a_slice_starts_exactly_where_the_floor_of_its_instants_changes(
    index: int, slice_s: float
) -> None:
    """The first instant of a slice is in it, and the float before it is not."""
    start = _first_instant(index, slice_s)
    assert math.floor(start / slice_s) == index
    assert math.floor(math.nextafter(start, -math.inf) / slice_s) == index - 1


@given(
    times=st.lists(st.floats(0, 1e7, allow_nan=False), min_size=1, max_size=20),
    slice_s=st.sampled_from([0.1, 1 / 3, 1.0, 2.5]),
)
def test_the_slice_of_an_instant_is_the_floor_whatever_was_recorded_before(
    times: list[float], slice_s: float
) -> None:
    """`slice_index` and `record` agree with ``floor(now / slice_s)`` at every instant."""
    window = SlicedWindow(Rate(10**9, slice_s * 60, "requests", slices=60))
    for now in sorted(times):
        expected = math.floor(now / slice_s)
        assert window.slice_index(now) == expected
        assert window.record(now, 1) == expected
        for edge in (math.nextafter(now, -math.inf), math.nextafter(now, math.inf)):
            assert window.slice_index(edge) == math.floor(edge / slice_s)


@pytest.mark.parametrize("counting", list(TokenCounting))
@pytest.mark.parametrize("step_s", [0.0, 0.01, 0.13])
def test_a_burst_settled_in_its_slices_keeps_the_windows_as_the_general_path_does(
    counting: TokenCounting, step_s: float
) -> None:
    """Calls admitted one after another, two in flight, ended with real usage below, at
    and above the estimate: the same windows, call by call, slice edges crossed now
    and then."""
    limits = Limits(
        concurrency=50,
        rates=(
            Rate(1000, 1.0, "requests", name="req", slices=10),
            Rate(10**6, 2.0, "tokens", name="tok", slices=4),
            Rate(100.0, 1.0, "money", name="usd", slices=10),
        ),
        token_counting=counting,
    )
    fast, general = MemoryBackend(), GeneralOnly()
    now = BASE_S
    in_flight: list[tuple[Demand, MemoryGrant, MemoryGrant]] = []
    for call in range(80):
        demand = Demand(1, 100 + call, (0.1, 0.2, 0.3)[call % 3])
        one = fast.reserve_now(limits, demand, now)
        other = general.reserve_now(limits, demand, now)
        assert isinstance(one, MemoryGrant)
        assert isinstance(other, MemoryGrant)
        in_flight.append((demand, one, other))
        now += step_s
        if len(in_flight) > 2:
            _, one, other = in_flight.pop(0)
            real = Demand(1, (50, 100 + call, 180, 0)[call % 4], (0.1, 0.3, 0.0)[call % 3])
            fast.settle_now(one, real, now)
            general.settle_now(other, real, now)
        assert window_state(fast) == window_state(general), call
        now += step_s
    for demand, one, other in in_flight:
        fast.settle_now(one, demand, now)
        general.settle_now(other, demand, now)
        assert window_state(fast) == window_state(general)
    assert fast.statistics_now(limits, now) == general.statistics_now(limits, now)


# -- through a limiter: the lane of `Limiter` and `MemoryBackend.admit_now` ---------------

# What a caller does with a limiter: try to admit (requests, tokens, cost), end or touch
# the admission held at a place counted from the newest, pause, change the limits.
call = st.one_of(
    st.tuples(
        st.just("try"),
        st.integers(0, 2),
        st.integers(0, 60),
        st.sampled_from([0.0, 0.125, 0.5]),
    ),
    st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0, 1.5), st.floats(0, 1)),
    st.tuples(st.just("counted"), st.integers(0, 30), st.integers(0, 80), st.just(0.0)),
    st.tuples(
        st.sampled_from(["release", "refund", "sent", "drop"]),
        st.integers(0, 30),
        st.just(0),
        st.just(0.0),
    ),
    st.tuples(st.just("pause"), st.integers(0, 3), st.just(0), st.just(0.0)),
    st.tuples(st.just("switch"), st.just(0), st.just(0), st.just(0.0)),
)
short_delay = st.one_of(
    st.just(0.0),
    st.just(0.0),
    st.floats(0, 0.3).map(lambda x: round(x, 3)),
    st.floats(0, 40).map(lambda x: round(x, 1)),
)


async def play_on_limiters(pair: tuple[Limits, Limits], script: list) -> None:
    """One script on a limiter over the memory backend (its lane taken) and on one over
    `GeneralOnly`, step by step: the same admissions and the same windows."""
    from ratekit import Admission, Limiter
    from ratekit.clock import FakeClock

    fast_clock, general_clock = FakeClock(BASE_S), FakeClock(BASE_S)
    fast_backend, general_backend = MemoryBackend(), GeneralOnly()
    fast = Limiter(pair[0], backend=fast_backend, clock=fast_clock)
    general = Limiter(pair[0], backend=general_backend, clock=general_clock)
    held: list[tuple[Admission, Admission, bool]] = []  # and whether it was settled
    for step, (kind, a, b, c) in script:
        fast_clock.advance(step)
        general_clock.advance(step)
        if kind == "try":
            one = await fast.try_acquire(a, tokens=b, cost=c)
            other = await general.try_acquire(a, tokens=b, cost=c)
            assert (one is None) == (other is None), (kind, a, b, c)
            if one is not None and other is not None:
                held.append((one, other, False))
        elif kind == "pause":
            assert await fast.pause(a) == await general.pause(a)
        elif kind == "switch":
            limits = pair[1] if fast.limits is pair[0] else pair[0]
            fast.limits = general.limits = limits
        elif held:
            index = len(held) - 1 - a % len(held)
            one, other, settled = held[index]
            if kind == "sent":
                await one.sent()
                await other.sent()
                continue
            if kind in ("settle", "counted") and not settled:
                demand = one.demand
                if kind == "settle":
                    tokens, cost = demand.tokens * b, demand.cost * c
                    one.settle(tokens=tokens, cost=cost)
                    other.settle(tokens=tokens, cost=cost)
                else:
                    one.settle(counted_tokens=b)
                    other.settle(counted_tokens=b)
                held[index] = (one, other, True)
                continue
            del held[index]
            if kind == "refund" and not settled:
                await one.refund()
                await other.refund()
            elif kind == "drop":
                with pytest.warns(ResourceWarning, match="dropped without release"):  # noqa: PT031
                    del one, other
                    gc.collect()
                await asyncio.sleep(0)  # the limiters' loop ends them
            else:
                await one.release()
                await other.release()
        assert fast_backend._in_flight == general_backend._in_flight
        assert window_state(fast_backend) == window_state(general_backend), kind
        assert await fast.statistics() == await general.statistics()
    for one, other, _ in held:
        await one.release()
        await other.release()
    assert window_state(fast_backend) == window_state(general_backend)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=limits_pair(), script=st.lists(st.tuples(short_delay, call), min_size=5, max_size=80))
def test_a_limiter_on_the_lane_keeps_the_windows_as_the_general_path_does(
    pair: tuple[Limits, Limits], script: list
) -> None:
    """Admissions tried, settled, counted, sent, released, refunded and dropped through a
    limiter: the same outcomes and window state as on a backend with no fast path."""
    asyncio.run(play_on_limiters(pair, script))


def test_an_uncontended_admission_of_a_limiter_takes_the_lane() -> None:
    """A limiter over the memory backend admits with `admit_now` (its grant a plain tuple)
    and ends there; one over a subclass of it asks the subclass's `reserve_now`."""
    from ratekit import Limiter

    limits = Limits(concurrency=2, rpm=10, tpm=1000, tpd=10_000)

    async def run() -> None:
        backend = MemoryBackend()
        limiter = Limiter(limits, backend=backend)
        async with limiter.acquire(tokens=100):  # the first binds the limits
            pass
        async with limiter.acquire(tokens=100) as admission:
            assert admission._grant.__class__ is tuple
            assert backend._in_flight == 1
            admission.settle(tokens=80)
        assert backend._in_flight == 0
        async with Limiter(limits, backend=GeneralOnly()).acquire(tokens=100) as admission:
            assert isinstance(admission._grant, MemoryGrant)

    asyncio.run(run())
