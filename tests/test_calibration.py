"""Token estimates that learn how the provider counts (`ratekit._calibration`)."""

from __future__ import annotations

import math

import anyio
import openai
import pytest

import ratekit
from ratekit._calibration import (
    HEADROOM,
    KEPT_RATIOS,
    OFFSET,
    PRIOR_FACTOR,
    WARM_CALLS,
    Calibration,
    EstimateStatistics,
    PromptEstimate,
)
from ratekit.mock_provider import MockProvider


def counted(estimate: float, ratio: float) -> float:
    """What a provider whose tokenizer counts `ratio` times ours reports."""
    return (estimate + OFFSET) * ratio - OFFSET


def test_first_calls_err_safe() -> None:
    calibration = Calibration()
    assert calibration.factor("m") == PRIOR_FACTOR
    assert calibration.reserve("m", 100) == math.ceil(108 * PRIOR_FACTOR - 8)
    assert calibration.reserve("m", 0) == 0
    # A few answers that count less do not lift the prior before WARM_CALLS of them.
    for _ in range(WARM_CALLS - 1):
        calibration.observe("m", 100, calibration.reserve("m", 100), counted(100, 0.7))
    assert calibration.factor("m") == PRIOR_FACTOR
    calibration.observe("m", 100, calibration.reserve("m", 100), counted(100, 0.7))
    assert calibration.factor("m") == pytest.approx(0.7 * HEADROOM)


def test_a_tokenizer_that_counts_more_is_covered_after_it_is_seen() -> None:
    calibration = Calibration()
    for estimate in range(50, 50 + WARM_CALLS):
        calibration.observe(
            "m", estimate, calibration.reserve("m", estimate), counted(estimate, 1.3)
        )
    assert calibration.factor("m") == pytest.approx(1.3 * HEADROOM)
    for estimate in (10, 500, 20_000):
        assert calibration.reserve("m", estimate) >= counted(estimate, 1.3)
    # One prompt counted 1.6 times raises the factor at once (and was short).
    reserved = calibration.reserve("m", 100)
    calibration.observe("m", 100, reserved, counted(100, 1.6))
    assert calibration.factor("m") == pytest.approx(1.6 * HEADROOM)
    stats = calibration.statistics()["m"]
    assert stats.calls == WARM_CALLS + 1
    assert stats.short == 1
    assert stats.max_ratio == pytest.approx(1.6)
    assert stats.min_ratio == pytest.approx(1.3)


def test_models_learn_apart_and_old_ratios_age_out() -> None:
    calibration = Calibration()
    for _ in range(WARM_CALLS):
        calibration.observe("a", 100, 100, counted(100, 1.4))
    assert calibration.factor("b") == PRIOR_FACTOR
    assert calibration.factor(None) == PRIOR_FACTOR
    # KEPT_RATIOS answers at 1.1 push the 1.4s out: the factor follows the workload.
    for _ in range(KEPT_RATIOS):
        calibration.observe("a", 100, 200, counted(100, 1.1))
    assert calibration.factor("a") == pytest.approx(1.1 * HEADROOM)
    assert calibration.statistics()["a"].short == WARM_CALLS


def test_garbage_counts_are_ignored() -> None:
    calibration = Calibration()
    for reported in (math.nan, math.inf, -1.0):
        calibration.observe("m", 100, 150, reported)
    assert calibration.statistics() == {}
    estimate = PromptEstimate(calibration, "m", 100)
    estimate.learn(None)
    estimate.learn(120)
    estimate.learn(500)  # one answer, learned from once
    assert calibration.statistics()["m"].calls == 1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the mock provider runs on asyncio


async def _learned(tokenizer_factor: float) -> EstimateStatistics:
    """60 wrapped calls to a provider whose tokenizer counts `tokenizer_factor` times the
    mock's own; what the scheduler learned."""
    async with MockProvider(
        ratekit.Limits(rpm=10_000), tokenizer_factor=tokenizer_factor
    ) as server:
        scheduler = ratekit.Scheduler(ratekit.Account("moonshot", tier="tier1"))
        raw = openai.AsyncOpenAI(base_url=server.base_url, api_key="x")
        client = ratekit.wrap(raw, scheduler)
        try:
            with anyio.fail_after(30):
                for words in range(20, 80):
                    await client.chat.completions.create(
                        model="kimi-k2",
                        messages=[{"role": "user", "content": "tokens " * words}],
                        max_tokens=5,
                    )
        finally:
            await raw.close()
    return (await scheduler.statistics()).estimates["kimi-k2"]


@pytest.mark.anyio
async def test_wrapped_reservations_cover_the_providers_counts() -> None:
    """Providers whose tokenizers count 30 % more and 30 % less than the mock's (itself
    unlike ratekit's estimator): no reservation falls short of the provider's count, and
    the statistics say how far the raw estimates were off."""
    above = await _learned(1.3)
    below = await _learned(0.7)
    for stats in (above, below):
        assert stats.calls == 60
        assert stats.factor >= stats.max_ratio
        # The first reservations were scaled by the prior, later ones by what the answers
        # said: none fell short.
        assert stats.short == 0
    # Ratios are (count + 8) / (estimate + 8) of whole tokens: near, not equal, to 1.3 / 0.7.
    assert above.mean_ratio / below.mean_ratio == pytest.approx(1.3 / 0.7, rel=0.1)
    assert above.factor > 1.3 > below.factor
