"""Token estimates that learn how the provider counts (`ratekit._calibration`)."""

from __future__ import annotations

import math
import uuid

import anyio
import openai
import pytest
from redis.asyncio import Redis

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
from ratekit.testing.mock_provider import MockProvider

from .redis_server import RedisServer


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


class _Fleet:
    """The account's pods' learned factors, as a shared backend keeps them: the largest
    per model comes back to whoever sends."""

    def __init__(self) -> None:
        self.factors: dict[str, float] = {}
        self.sent: list[dict[str, float]] = []

    def pod(self) -> Calibration:
        calibration: Calibration

        def share(factors: dict[str, float]) -> None:
            self.sent.append(dict(factors))
            for model, factor in factors.items():
                self.factors[model] = max(self.factors.get(model, 0.0), factor)
            calibration.fleet_learned(self.factors)

        calibration = Calibration(share)
        return calibration


def test_pods_scale_by_the_largest_factor_any_pod_learned() -> None:
    fleet = _Fleet()
    first, second = fleet.pod(), fleet.pod()
    for _ in range(WARM_CALLS):
        first.observe("m", 100, 300, counted(100, 1.4))
    # The first pod shared what it learned once warm; a new pod starts from it, not the prior.
    assert fleet.factors["m"] == pytest.approx(1.4 * HEADROOM)
    assert second.factor("m") == pytest.approx(1.4 * HEADROOM)
    # The second pod sees smaller ratios: it still scales by the fleet's largest.
    for _ in range(WARM_CALLS):
        second.observe("m", 100, 300, counted(100, 1.1))
    assert second.factor("m") == pytest.approx(1.4 * HEADROOM)
    # A pod shares again only when its factor moves (or after SHARE_EVERY answers).
    before = len(fleet.sent)
    for _ in range(10):
        first.observe("m", 100, 300, counted(100, 1.4))
    assert len(fleet.sent) == before


@pytest.mark.redis
@pytest.mark.anyio
async def test_pods_share_learned_estimates_through_redis(redis_server: RedisServer) -> None:
    """Two schedulers on one Redis account: what one learned reaches the other."""
    namespace = f"estimates-{uuid.uuid4().hex[:8]}"
    pods = [
        ratekit.Scheduler(
            ratekit.Account("moonshot", tier="tier1"),
            backend=ratekit.RedisBackend(redis_server.url, namespace=namespace),
        )
        for _ in range(2)
    ]
    try:
        for pod in pods:
            await pod.limiter().statistics()  # the backends are in use on this loop
        # Garbage in the store (an old version's, an operator's) is dropped, not fatal.
        store = Redis.from_url(redis_server.url)
        key = f"{pods[0].limiter().backend._prefix}:estimates"  # type: ignore[attr-defined]
        await store.hset(key, mapping={"kimi-k2\nold": "not numbers", "no newline": "1 2"})
        for _ in range(WARM_CALLS):
            pods[0].estimates.observe("kimi-k2", 100, 300, counted(100, 1.3))
        # The second pod asks when it meets the model, and again every ASK_EVERY
        # reservations until it knows: each reservation here is one more chance.
        with anyio.fail_after(10):
            while pods[1].estimates.factor("kimi-k2") != pytest.approx(1.3 * HEADROOM):
                pods[1].estimates.reserve("kimi-k2", 100)
                await anyio.sleep(0.01)
        # Another namespace is another account: it keeps its prior.
        other = ratekit.RedisBackend(redis_server.url, namespace=namespace + "-other")
        stranger = ratekit.Scheduler(ratekit.Account("moonshot", tier="tier1"), backend=other)
        await stranger.limiter().statistics()
        assert stranger.estimates.factor("kimi-k2") == PRIOR_FACTOR
        await anyio.sleep(0.1)
        assert stranger.estimates.factor("kimi-k2") == PRIOR_FACTOR
        await other.aclose()
        assert (
            sorted(await store.hkeys(key))
            == sorted(
                f"kimi-k2\n{pod.limiter().backend._instance}".encode()  # type: ignore[attr-defined]
                for pod in pods[:1]
            )
        )
        await store.aclose()
    finally:
        for pod in pods:
            backend = pod.limiter().backend
            assert isinstance(backend, ratekit.RedisBackend)
            await backend.aclose()


def test_a_factor_no_pod_sends_any_more_stops_counting() -> None:
    fleet = _Fleet()
    pod = fleet.pod()
    pod.fleet_learned({"m": 1.8})
    assert pod.factor("m") == pytest.approx(1.8)
    # The fleet's answer no longer has it (its pod went quiet and the entry expired).
    pod.fleet_learned({})
    assert pod.factor("m") == PRIOR_FACTOR
    # Garbage from the store is ignored.
    pod.fleet_learned({"m": math.nan, "n": -1.0, "o": 1e9})
    assert pod.factor("m") == PRIOR_FACTOR
    assert pod.factor("n") == PRIOR_FACTOR


def test_a_short_prompt_reserves_at_least_one_token_under_a_factor_below_one() -> None:
    """A model whose prompts count about half the estimate: a 1-token embedding input
    still reserves 1 token, never a negative amount."""
    calibration = Calibration()
    for _ in range(40):
        calibration.observe("m", 100, calibration.reserve("m", 100), 50)
    assert calibration.factor("m") < 0.7
    assert calibration.reserve("m", 1) == 1
    assert calibration.reserve("m", 2) == 1
