"""Real time, compressed: a limiter in front of a strict provider sees no 429."""

from __future__ import annotations

import anyio
import pytest

import ratekit
from ratekit.testing.simulation import ProviderRefusedError, StrictProvider, simulate

pytestmark = pytest.mark.anyio


async def test_the_strict_provider_answers_429_beyond_its_limits() -> None:
    """Without a limiter, the strict provider refuses what exceeds a window or the cap."""
    provider = StrictProvider(ratekit.Limits(concurrency=2, rpm=3, tpm=1000).compressed(60))
    await provider.call(600, 0)
    with pytest.raises(ProviderRefusedError, match="429: tpm exceeded"):
        await provider.call(500, 0)
    await provider.call(100, 0)
    await provider.call(100, 0)
    with pytest.raises(ProviderRefusedError, match="429: rpm exceeded"):
        await provider.call(1, 0)
    assert provider.rejected == {"tpm": 1, "rpm": 1}
    assert provider.served == 3


async def test_concurrency_beyond_the_cap_is_refused() -> None:
    """The strict provider counts calls in flight."""
    provider = StrictProvider(ratekit.Limits(concurrency=1))
    async with anyio.create_task_group() as group:
        group.start_soon(provider.call, 1, 0.2)
        await anyio.sleep(0.05)
        with pytest.raises(ProviderRefusedError, match="429: concurrency exceeded"):
            await provider.call(1, 0)


@pytest.mark.parametrize("counting", list(ratekit.TokenCounting))
async def test_a_limited_batch_gets_no_429_and_uses_the_binding_limit(
    counting: ratekit.TokenCounting,
) -> None:
    """900 calls from 100 tasks, a minute per second: zero 429s, the binding rate well used
    in the steady state (three periods' worth: a run of two has none to measure)."""
    limits = ratekit.Limits(
        concurrency=40, rpm=300, tpm=150_000, margin_s=0.005, token_counting=counting
    ).compressed(60)
    report = await simulate(limits, calls=900, workers=100, tokens=(100, 500))
    assert report.rate_limited == {}
    assert report.served == 900
    for name, (peak, limit) in report.peak_use.items():
        assert peak <= limit, name
    # Timing is the point here, so the bound is generous: the machine may be busy.
    assert report.binding == "rpm"
    assert report.binding_utilisation >= 0.6
