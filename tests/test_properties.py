"""Property tests of the window math: the memory backend and the Lua scripts.

For any arrivals, costs, settlements, refunds and limits: no window of any rate
ever holds more than its limit (as the provider would count it), the concurrency
cap holds, wait hints are exact, and nothing is leaked or given back twice.
"""

from __future__ import annotations

import asyncio
import copy
import math
import uuid
from dataclasses import dataclass

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ratekit import Limits, Rate, TokenCounting
from ratekit.backends import Backend, Demand, Refusal
from ratekit.backends.memory import MemoryBackend
from ratekit.backends.redis import RedisBackend
from ratekit.clock import FakeClock

from .redis_server import RedisServer
from .window_cases import BASE_S

TOLERANCE = 1e-9


@dataclass
class Admitted:
    at: float
    demand: Demand
    grant: object
    settled_at: float | None = None
    actual: Demand | None = None
    refunded: bool = False


@st.composite
def limits_strategy(draw: st.DrawFn) -> Limits:
    period_s = draw(st.sampled_from([1.0, 2.5, 10.0, 60.0]))
    slices = draw(st.sampled_from([1, 3, 10, 60]))
    rates = [Rate(draw(st.integers(1, 6)), period_s, "requests", name="req", slices=slices)]
    if draw(st.booleans()):
        rates.append(Rate(draw(st.integers(60, 150)), period_s * 2, "tokens", name="tok"))
    if draw(st.booleans()):
        rates.append(Rate(draw(st.sampled_from([1.0, 2.5])), period_s, "money", name="usd"))
    return Limits(
        concurrency=draw(st.none() | st.integers(1, 4)),
        rates=tuple(rates),
        margin_s=draw(st.sampled_from([0.0, 0.5])),
        pacing=draw(st.booleans()),
        token_counting=draw(st.sampled_from(list(TokenCounting))),
    )


operation = st.one_of(
    st.tuples(
        st.just("reserve"),
        st.integers(0, 2),  # requests
        st.integers(0, 60),  # tokens
        st.sampled_from([0.0, 0.125, 0.5, 1.0]),  # cost
    ),
    st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("refund"), st.integers(0, 30), st.just(0.0), st.just(0.0)),
)
# Mostly short steps, so that windows fill up and slice boundaries get crossed.
delay = st.one_of(st.just(0.0), st.floats(0, 1.5), st.floats(0, 40)).map(lambda x: round(x, 3))
steps = st.lists(st.tuples(delay, operation), max_size=80)


def max_window_sum(events: list[tuple[float, float]], period_s: float) -> float:
    """The largest total of `events` (time, amount) inside any half-open window of `period_s`."""
    events = sorted(events)
    best = 0.0
    for start, _ in events:
        best = max(best, sum(a for t, a in events if start <= t < start + period_s))
    return best


def provider_views(rate: Rate, counting: TokenCounting, log: list[Admitted]) -> list[list]:
    """How a provider could count `rate`: one list of (time, amount) events per view."""
    sent = [entry for entry in log if not entry.refunded]
    if rate.unit == "requests":
        return [[(e.at, e.demand.requests) for e in sent]]
    settled = [e for e in sent if e.actual is not None and e.settled_at is not None]
    if rate.unit == "money":
        return [[(e.settled_at, e.actual.cost) for e in settled]]  # type: ignore[union-attr]
    at_arrival = [(e.at, e.demand.tokens) for e in sent]
    at_usage = [(e.settled_at, e.actual.tokens) for e in settled]  # type: ignore[union-attr]
    if counting is TokenCounting.RESERVE:
        return [at_arrival]
    if counting is TokenCounting.USAGE:
        return [at_usage]
    return [at_arrival, at_usage]


def check_hint_is_exact(
    backend: MemoryBackend, limits: Limits, demand: Demand, now: float, wait_s: float
) -> None:
    """At the hinted instant the demand is admitted; one float step before, refused."""
    at = now + wait_s
    if math.isinf(wait_s):
        # Only a release helps: however long nothing else happens, still refused.
        later = copy.deepcopy(backend)
        far = now + 10 * max(rate.period_s for rate in limits.all_rates)
        assert isinstance(later.reserve_now(limits, demand, far), Refusal)
        return
    later = copy.deepcopy(backend)
    assert not isinstance(later.reserve_now(limits, demand, at), Refusal)
    sooner = copy.deepcopy(backend)
    assert isinstance(sooner.reserve_now(limits, demand, math.nextafter(at, -math.inf)), Refusal)


def expected_in_flight(rate: Rate, counting: TokenCounting, log: list[Admitted]) -> float:
    """What calls not yet settled hold on `rate`, by an independent ledger."""
    outstanding = [e for e in log if e.settled_at is None and not e.refunded]
    if rate.unit == "money":
        return sum(e.demand.cost for e in outstanding)
    if rate.unit == "tokens" and counting is not TokenCounting.RESERVE:
        return sum(e.demand.tokens for e in outstanding)
    return 0.0


def check_pacing(limits: Limits, log: list[Admitted]) -> None:
    """With pacing, admissions keep to a schedule of one every ``period / limit`` that may
    lag by one spacing: between any two, ``t_j - t_i >= spacing * (amounts from i up
    to j) - spacing``."""
    if not limits.pacing:
        return
    for rate in limits.all_rates:
        if rate.unit != "requests":
            continue
        paced = [e for e in log if e.demand.requests]
        spacing_s = rate.period_s / rate.limit
        slack_s = spacing_s
        for i, first in enumerate(paced):
            owed = 0.0
            for later in paced[i + 1 :]:
                owed += paced[paced.index(later) - 1].demand.requests * spacing_s
                assert later.at - first.at >= owed - slack_s - 1e-9, (first, later)


async def run_script(
    backend: Backend, clock: FakeClock, limits: Limits, script: list, *, check_hints: bool
) -> None:
    """Play `script` on `backend` and check every invariant (see the module docstring)."""
    log: list[Admitted] = []
    for dt, (kind, a, b, c) in script:
        clock.advance(dt)
        if kind == "reserve":
            demand = Demand(a, b, c)
            outcome = await backend.reserve(limits, demand, clock.instant())
            if isinstance(outcome, Refusal):
                if check_hints:
                    assert isinstance(backend, MemoryBackend)
                    check_hint_is_exact(backend, limits, demand, clock.now(), outcome.wait_s)
                continue
            log.append(Admitted(clock.now(), demand, outcome))
            if limits.concurrency is not None:
                in_flight = sum(1 for e in log if e.settled_at is None and not e.refunded)
                assert in_flight <= limits.concurrency
        elif log:
            entry = log[a % len(log)]
            if entry.refunded or entry.settled_at is not None:
                # A second settle or refund of one grant must change nothing.
                before = await backend.statistics(limits, clock.instant())
                await backend.settle(limits, entry.grant, None, clock.instant())
                assert await backend.statistics(limits, clock.instant()) == before
            elif kind == "refund":
                await backend.settle(limits, entry.grant, None, clock.instant())
                entry.refunded = True
            else:
                # Real usage at most the estimate: the provider never counts more.
                estimate = entry.demand
                actual = Demand(estimate.requests, estimate.tokens * b, estimate.cost * c)
                await backend.settle(limits, entry.grant, actual, clock.instant())
                entry.settled_at, entry.actual = clock.now(), actual
        holds = {d.name: d.in_flight for d in await backend.statistics(limits, clock.instant())}
        for rate in limits.all_rates:
            ledger = expected_in_flight(rate, limits.token_counting, log)
            assert holds[rate.name] == pytest.approx(ledger, abs=1e-9), rate.name
    check_pacing(limits, log)
    for rate in limits.all_rates:
        for view in provider_views(rate, limits.token_counting, log):
            assert max_window_sum(view, rate.period_s) <= rate.limit * (1 + TOLERANCE) + 1e-9

    # Nothing leaks: once every grant is settled and every period has passed, all is zero.
    for entry in log:
        await backend.settle(limits, entry.grant, entry.demand, clock.instant())
    clock.advance(max(rate.period_s for rate in limits.all_rates) * 2 + limits.margin_s + 1)
    for dimension in await backend.statistics(limits, clock.instant()):
        assert dimension.used == 0, dimension
        assert dimension.in_flight == 0, dimension


def examples(count: int) -> settings:
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@examples(1500)
@given(limits=limits_strategy(), script=steps)
def test_no_window_ever_admits_more_than_its_limit(limits: Limits, script: list) -> None:
    """Every provider view of every rate stays within its limit, and wait hints are exact."""
    clock = FakeClock(BASE_S)
    backend = MemoryBackend()
    asyncio.run(run_script(backend, clock, limits, script, check_hints=True))


def _redis_backend(client: Redis) -> RedisBackend:
    # Leases that never lapse in fake time: the memory backend has no lapses either.
    return RedisBackend(client, namespace=uuid.uuid4().hex, server_time=False, lease_ttl_s=1e6)


@examples(150)
@given(limits=limits_strategy(), script=steps)
def test_the_lua_scripts_keep_every_window_within_its_limit(limits: Limits, script: list) -> None:
    """The same invariants hold on the Lua scripts, on fakeredis."""
    clock = FakeClock(BASE_S)

    async def run() -> None:
        backend = _redis_backend(fakeredis.FakeAsyncRedis())
        await run_script(backend, clock, limits, script, check_hints=False)

    asyncio.run(run())


@examples(100)
@given(limits=limits_strategy(), script=steps)
def test_a_real_redis_keeps_every_window_within_its_limit(
    redis_server: RedisServer, limits: Limits, script: list
) -> None:
    """The same invariants hold on the Lua scripts in a real redis-server."""
    clock = FakeClock(BASE_S)

    async def run() -> None:
        backend = _redis_backend(Redis.from_url(redis_server.url))
        try:
            await run_script(backend, clock, limits, script, check_hints=False)
        finally:
            await backend.aclose()

    asyncio.run(run())
