"""The shared table of window cases, run on every backend at fixed instants.

The memory backend runs the Python window math; fakeredis and a real
redis-server run the Lua scripts. Both pass the very same table, so they cannot
drift.
"""

from __future__ import annotations

import math

import pytest

from ratekit.backends import Backend, Demand, Refusal
from ratekit.backends.redis import RedisBackend
from ratekit.clock import FakeClock, Instant

from .conftest import BackendFactory
from .window_cases import BASE_S, CASES, Case, Pause, Refund, Reserve, Sent, Settle, Used

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _actual(estimate: Demand, step: Settle) -> Demand:
    return Demand(
        estimate.requests,
        estimate.tokens if step.tokens is None else step.tokens,
        estimate.cost if step.cost is None else step.cost,
    )


def _check_wait(backend: Backend, step: Reserve, refusal: Refusal, where: str) -> None:
    assert refusal.dimension == step.dimension, where
    if math.isinf(step.wait_s or 0.0) and isinstance(backend, RedisBackend):
        # A shared backend cannot wait for ever on a release: a holder may have
        # died. Its hint is when the oldest lease lapses unless renewed.
        assert 0 < refusal.wait_s <= backend._lease_ttl_s, where
    elif math.isinf(step.wait_s or 0.0):
        assert math.isinf(refusal.wait_s), f"{where}: waits {refusal.wait_s}"
    else:
        assert refusal.wait_s == pytest.approx(step.wait_s, abs=1e-6), where


async def run_case(case: Case, backend: Backend, clock: FakeClock) -> None:
    grants: dict[str, object] = {}
    demands: dict[str, Demand] = {}
    for number, step in enumerate(case.steps):
        clock.set(BASE_S + step.t)
        now = Instant(clock.now(), clock.wall())
        where = f"step {number} ({step})"
        if isinstance(step, Reserve):
            demand = Demand(step.requests, step.tokens, step.cost)
            outcome = await backend.reserve(case.limits, demand, now)
            if step.wait_s is None:
                assert not isinstance(outcome, Refusal), f"{where}: refused {outcome}"
                grants[step.grant], demands[step.grant] = outcome, demand
            else:
                assert isinstance(outcome, Refusal), f"{where}: admitted"
                _check_wait(backend, step, outcome, where)
        elif isinstance(step, Sent):
            await backend.restamp(case.limits, grants[step.grant], now)
        elif isinstance(step, Settle):
            actual = _actual(demands[step.grant], step)
            await backend.settle(case.limits, grants[step.grant], actual, now)
        elif isinstance(step, Refund):
            await backend.settle(case.limits, grants[step.grant], None, now)
        elif isinstance(step, Pause):
            lasts_s = await backend.pause(step.seconds, now, out=step.out)
            assert lasts_s == pytest.approx(step.lasts_s, abs=1e-6), where
        elif isinstance(step, Used):
            stats = {d.name: d for d in await backend.statistics(case.limits, now)}
            assert stats[step.dimension].used == pytest.approx(step.amount), where
            assert stats[step.dimension].in_flight == pytest.approx(step.in_flight), where


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_every_backend_passes_the_shared_table(
    case: Case, make_backend: BackendFactory
) -> None:
    """Every case of the shared table holds on every backend, to the microsecond."""
    clock = FakeClock(BASE_S)
    await run_case(case, make_backend(), clock)
