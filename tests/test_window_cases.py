"""The shared table of window cases, run on the memory backend at fixed instants."""

from __future__ import annotations

import math

import pytest

from ratekit.backends import Demand, Refusal
from ratekit.backends.memory import MemoryBackend, MemoryGrant

from .window_cases import BASE_S, CASES, Case, Refund, Reserve, Settle, Used


def _actual(estimate: Demand, step: Settle) -> Demand:
    return Demand(
        estimate.requests,
        estimate.tokens if step.tokens is None else step.tokens,
        estimate.cost if step.cost is None else step.cost,
    )


def run_case(case: Case) -> None:
    backend = MemoryBackend()
    grants: dict[str, MemoryGrant] = {}
    demands: dict[str, Demand] = {}
    for number, step in enumerate(case.steps):
        now = BASE_S + step.t
        where = f"step {number} ({step})"
        if isinstance(step, Reserve):
            demand = Demand(step.requests, step.tokens, step.cost)
            outcome = backend.reserve_now(case.limits, demand, now)
            if step.wait_s is None:
                assert not isinstance(outcome, Refusal), f"{where}: refused {outcome}"
                grants[step.grant] = outcome
                demands[step.grant] = demand
            else:
                assert isinstance(outcome, Refusal), f"{where}: admitted"
                assert outcome.dimension == step.dimension, where
                if math.isinf(step.wait_s):
                    assert math.isinf(outcome.wait_s), f"{where}: waits {outcome.wait_s}"
                else:
                    assert outcome.wait_s == pytest.approx(step.wait_s, abs=1e-6), where
        elif isinstance(step, Settle):
            actual = _actual(demands[step.grant], step)
            backend.settle_now(grants[step.grant], actual, now)
        elif isinstance(step, Refund):
            backend.settle_now(grants[step.grant], None, now)
        elif isinstance(step, Used):
            stats = {d.name: d for d in backend.statistics_now(case.limits, now)}
            assert stats[step.dimension].used == pytest.approx(step.amount), where
            assert stats[step.dimension].in_flight == pytest.approx(step.in_flight), where


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_memory_backend_passes_the_shared_table(case: Case) -> None:
    """Every case of the shared table holds on the memory backend, to the microsecond."""
    run_case(case)
