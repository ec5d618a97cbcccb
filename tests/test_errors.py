"""Bad input: typed errors with exact messages, raised before anything is taken."""

from __future__ import annotations

import math

import anyio
import pytest

import ratekit
from ratekit import Limiter, Limits, Rate
from ratekit.clock import FakeClock

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("demand", "message"),
    [
        ({"tokens": -1}, "tokens must be non-negative, got -1"),
        ({"tokens": math.nan}, "tokens must be finite, got nan"),
        ({"tokens": -0.5}, "tokens must be non-negative, got -0.5"),
        ({"requests": 1e16}, "requests must be at most 1e+15, got 1e+16"),
        ({"cost": math.inf}, "cost must be finite, got inf"),
        ({"requests": True}, "requests must be a number, got True"),
        ({"tokens": "100"}, "tokens must be a number, got '100'"),
    ],
)
async def test_bad_amounts_are_typed_errors(demand: dict[str, object], message: str) -> None:
    """Negative, NaN, infinite or non-numeric amounts raise InvalidCostError, taking nothing."""
    limiter = Limiter(Limits(concurrency=1, rpm=5, tpm=1000), backend=None, clock=None)
    with pytest.raises(ratekit.errors.InvalidCostError) as caught:
        await limiter.acquire(**demand)  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert all(d.used == 0 for d in (await limiter.statistics()).dimensions)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (-1, "settle tokens must be non-negative, got -1"),
        (-0.5, "settle tokens must be non-negative, got -0.5"),
        (math.nan, "settle tokens must be finite, got nan"),
        (math.inf, "settle tokens must be finite, got inf"),
        (True, "settle tokens must be a number, got True"),
        ("80", "settle tokens must be a number, got '80'"),
    ],
)
async def test_a_bad_settle_is_a_typed_error_and_settles_nothing(
    tokens: object, message: str
) -> None:
    """A settle with a bad token count raises InvalidCostError; the admission stays
    unsettled, and a good settle after it counts."""
    limiter = Limiter(Limits(tpm=1000), backend=None, clock=None)
    async with limiter.acquire(tokens=100) as admission:
        with pytest.raises(ratekit.errors.InvalidCostError) as caught:
            admission.settle(tokens=tokens)  # type: ignore[arg-type]
        assert str(caught.value) == message
        assert admission.usage == admission.demand
        admission.settle(tokens=150.5)
    (tpm,) = (await limiter.statistics()).dimensions
    assert tpm.used == 150.5


async def test_a_cost_above_a_whole_limit_fails_at_once() -> None:
    """A demand no window could ever admit raises CostExceedsLimitError instead of waiting."""
    clock = FakeClock()
    limiter = Limiter(Limits(tpm=1000), backend=ratekit.MemoryBackend(), clock=clock)
    with anyio.fail_after(1):
        with pytest.raises(ratekit.CostExceedsLimitError) as caught:
            await limiter.acquire(tokens=1001)
    assert str(caught.value) == "tpm: a cost of 1001 can never be admitted, the whole limit is 1000"
    assert (caught.value.dimension, caught.value.cost, caught.value.limit) == ("tpm", 1001, 1000)
    with pytest.raises(ratekit.CostExceedsLimitError):
        await limiter.try_acquire(tokens=5000)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Limits(rpm=0), "Limits.rpm must be positive, got 0 (None means unlimited)"),
        (lambda: Limits(tpm=-5), "Limits.tpm must be positive, got -5 (None means unlimited)"),
        (
            lambda: Limits(concurrency=2.5),
            "Limits.concurrency must be a positive int or None, got 2.5",
        ),
        (lambda: Limits(margin_s=math.nan), "Limits.margin_s must be finite, got nan"),
        (lambda: Limits(pacing="yes"), "Limits.pacing must be True or False, got 'yes'"),
        (
            lambda: Limits(token_counting="later"),
            "Limits.token_counting must be one of reserve, usage, safe, got 'later'",
        ),
        (
            lambda: Limits(rpm=5, rates=(Rate(10, 60),)),
            "Limits: requests/60s and rpm are both requests per 60 s; keep one",
        ),
        (
            lambda: Limits(rates=(Rate(1, 1, name="x"), Rate(1, 2, name="x"))),
            "Limits: two rates are named 'x'; names must be unique",
        ),
        (lambda: Rate(10, 0), "Rate.period_s must be positive, got 0"),
        (
            lambda: Rate(10, 60, "calls"),  # type: ignore[arg-type]
            "Rate.unit must be one of requests, tokens, money, got 'calls'",
        ),
        (
            lambda: Rate(10, 3600, calendar_tz="Asia/Shanghai"),
            "Rate.calendar_tz needs period_s == 86400, got 3600",
        ),
        (
            lambda: Rate(10, 86400, calendar_tz="Mars/Olympus"),
            "Rate.calendar_tz: unknown time zone 'Mars/Olympus'",
        ),
    ],
)
def test_bad_limits_are_typed_errors(build: object, message: str) -> None:
    """Limits and rates are validated at construction, with the field and value named."""
    with pytest.raises(ratekit.errors.LimitsError) as caught:
        build()  # type: ignore[operator]
    assert str(caught.value) == message
