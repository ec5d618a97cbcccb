"""The scheduler on a fake clock: admission, tiers, 429s, adaptation, timeouts, statistics."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest

import ratekit
from ratekit import Account, Scheduler
from ratekit._limits import DEFAULT_MARGIN_S
from ratekit.clock import FakeClock

pytestmark = pytest.mark.anyio


class TooManyRequests(Exception):
    """What a provider client raises on a 429, in these tests."""

    def __init__(self, retry_after_s: float | None = None, *, retryable: bool = True) -> None:
        super().__init__("429")
        self.retry_after_s = retry_after_s
        self.retryable = retryable


@dataclass(frozen=True)
class Signal:
    retry_after_s: float | None
    retryable: bool
    message: str = "429"


def classify(error: BaseException) -> Signal | None:
    if isinstance(error, TooManyRequests):
        return Signal(error.retry_after_s, error.retryable)
    return None


def make(
    tier: str = "tier0", provider: str = "moonshot", **kwargs: object
) -> tuple[Scheduler, FakeClock, list[ratekit.Event]]:
    clock = FakeClock()
    events: list[ratekit.Event] = []
    account = Account(provider, tier=tier)
    scheduler = Scheduler(
        account,
        clock=clock,
        classify=classify,
        hooks=[events.append],
        **kwargs,  # type: ignore[arg-type]
    )
    return scheduler, clock, events


async def run_clock(clock: FakeClock, seconds: float, step_s: float = 0.5) -> None:
    """Let time pass in steps, letting woken tasks run at each."""
    elapsed = 0.0
    while elapsed < seconds:
        await anyio.wait_all_tasks_blocked()
        clock.advance(step_s)
        elapsed += step_s
    await anyio.wait_all_tasks_blocked()


async def test_submit_runs_calls_at_the_tiers_rate() -> None:
    """Moonshot Tier0 (3 RPM, 1 concurrent): six calls take two windows, one at a time."""
    scheduler, clock, _ = make()
    start = clock.now()
    done: list[float] = []

    async def call(n: int) -> int:
        done.append(clock.now() - start)
        return n * 2

    results: list[int] = []

    async def one(n: int) -> None:
        results.append(await scheduler.submit(call, n, tokens=1000))

    async with anyio.create_task_group() as group:
        for n in range(6):
            group.start_soon(one, n)
        await run_clock(clock, 130)
    assert sorted(results) == [0, 2, 4, 6, 8, 10]
    assert done[:3] == [0.0, 0.0, 0.0]
    assert all(61.0 <= t <= 61.5 for t in done[3:])
    stats = await scheduler.statistics()
    assert stats.admitted == 6
    assert stats.tier == "Tier0"


async def test_a_tier_upgrade_applies_to_the_next_admission() -> None:
    """A top-up that unlocks Tier1 lets waiting calls through without waiting out Tier0."""
    scheduler, clock, events = make()
    admitted: list[float] = []

    async def call() -> None:
        admitted.append(clock.now())

    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(scheduler.submit, call)
        await anyio.wait_all_tasks_blocked()
        assert len(admitted) == 3
        assert scheduler.account.add_top_up(10).name == "Tier1"
        await run_clock(clock, 1)
    assert len(admitted) == 5
    assert ratekit.events.TierChanged("Tier0", "Tier1") in events


async def test_a_429_pauses_the_account_then_the_call_is_retried() -> None:
    """A 429 with Retry-After 10 s: no call is admitted for 10 s, then the retry succeeds."""
    scheduler, clock, events = make("tier1")
    attempts: list[float] = []
    start = clock.now()

    async def flaky() -> str:
        attempts.append(clock.now() - start)
        if len(attempts) == 1:
            raise TooManyRequests(retry_after_s=10)
        return "ok"

    async with anyio.create_task_group() as group:
        result: list[str] = []

        async def run() -> None:
            result.append(await scheduler.submit(flaky))

        group.start_soon(run)
        await run_clock(clock, 12, step_s=0.25)
    assert result == ["ok"]
    assert attempts[0] == 0.0
    assert 10.0 <= attempts[1] <= 10.5
    stats = await scheduler.statistics()
    assert (stats.rate_limited, stats.cooldowns) == (1, 1)
    assert any(isinstance(e, ratekit.events.Cooldown) and e.seconds == 10 for e in events)


async def test_a_429_that_says_retrying_wont_help_is_raised_at_once() -> None:
    """A non-retryable rate-limit answer (quota exhausted) is not retried."""
    scheduler, _, _ = make("tier1")
    calls = 0

    async def exhausted() -> None:
        nonlocal calls
        calls += 1
        raise TooManyRequests(retry_after_s=0, retryable=False)

    with pytest.raises(TooManyRequests):
        await scheduler.submit(exhausted)
    assert calls == 1


async def test_429s_that_keep_coming_lower_the_limits_which_then_recover() -> None:
    """429s that keep coming within a period scale the limits to 80% (a burst counts once);
    a clean period gives 10% back."""
    scheduler, clock, events = make("tier1")
    await scheduler.rate_limited(None, Signal(retry_after_s=0.0, retryable=True))
    # A 429 to a call admitted before that one was seen is the same burst: no change.
    burst = Signal(retry_after_s=0.0, retryable=True)
    await scheduler.rate_limited(None, burst, admitted_at_s=clock.now() - 0.5)
    assert scheduler.limiter().limits.rpm == 200
    # A call admitted afterwards that is refused again: the provider is below the table.
    clock.advance(1)
    await scheduler.rate_limited(None, Signal(retry_after_s=0.0, retryable=True))
    limiter = scheduler.limiter()
    assert limiter.limits.rpm == pytest.approx(160)
    assert ratekit.events.LimitsAdapted("account", 0.8, "429s within the limits") in events
    clock.advance(61)
    assert scheduler.limiter().limits.rpm == pytest.approx(180)
    clock.advance(61)
    scheduler.limiter()
    clock.advance(61)
    assert scheduler.limiter().limits.rpm == 200
    assert (await scheduler.statistics()).factors == {"account": 1.0}


async def test_a_wait_longer_than_the_timeout_fails_at_once() -> None:
    """With Tier0's 3 RPM used, a call with a 10 s timeout fails without waiting."""
    scheduler, _, _ = make()

    async def call() -> None:
        return None

    for _ in range(3):
        await scheduler.submit(call)
    # A minute, one 1 s slice and the default margin.
    frees_s = f"{61 + DEFAULT_MARGIN_S:.3f}".replace(".", r"\.")
    with pytest.raises(ratekit.AcquireTimeout, match=rf"rpm frees up in {frees_s} s"):
        await scheduler.submit(call, timeout=10)


async def test_models_with_limits_of_their_own_have_their_own_limiter() -> None:
    """MiniMax's M2 and M2-Stable are limited apart; paying users get M2-Stable's 500 RPM."""
    scheduler, _, _ = make("paid", provider="minimax")
    assert scheduler.limiter("MiniMax-M2").limits.rpm == 20
    assert scheduler.limiter("minimax-m2-stable").limits.rpm == 500
    assert scheduler.limiter("MiniMax-M2") is not scheduler.limiter("MiniMax-M2-Stable")


async def test_statistics_report_waits_per_priority() -> None:
    """Wait percentiles are kept per priority."""
    scheduler, clock, _ = make()

    async def call() -> None:
        return None

    async with anyio.create_task_group() as group:
        for priority in (0, 0, 0, 5):
            group.start_soon(lambda p=priority: scheduler.submit(call, priority=p))
            await anyio.wait_all_tasks_blocked()
        await run_clock(clock, 62)
    stats = await scheduler.statistics()
    assert stats.priorities[0].admitted == 3
    assert stats.priorities[5].admitted == 1
    assert stats.priorities[5].wait_p50_s == pytest.approx(61.0, abs=0.5)
    assert stats.priorities[0].wait_p50_s == 0.0


async def test_cancelling_waiting_submissions_leaks_nothing() -> None:
    """Submissions cancelled while queued leave no waiter, slot or hold behind."""
    scheduler, _, _ = make()

    async def call() -> None:
        await anyio.sleep_forever()

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(scheduler.submit, call)
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    stats = await scheduler.limiter().statistics()
    assert stats.waiting == 0
    assert stats.dimension("concurrency").used == 0


async def test_provider_headers_below_the_tier_tighten_the_limits() -> None:
    """A provider reporting 100 RPM where the tier says 200 makes ratekit run at 100."""
    scheduler, _, events = make("tier1")
    scheduler.observe({"x-ratelimit-limit-requests": "100", "x-ratelimit-limit-tokens": "2000000"})
    assert scheduler.limiter().limits.rpm == pytest.approx(100)
    assert (
        ratekit.events.LimitsAdapted(
            "account", 0.5, "the provider reports requests limit 100, the tier 200"
        )
        in events
    )
    # The statistics say which of the provider's numbers are in force.
    stats = await scheduler.statistics()
    assert stats.reported == {"account": {"requests": 100}}
    assert stats.factors == {"account": 1.0}  # no 429
    scheduler.observe({"x-ratelimit-limit-requests": "200"})
    assert scheduler.limiter().limits.rpm == 200
    assert (await scheduler.statistics()).reported == {}


async def test_each_reported_limit_caps_only_its_own_dimension() -> None:
    """Requests and tokens reported below the tier by different ratios: each runs at the
    provider's own number (not both at the smaller ratio)."""
    scheduler, _, events = make("tier3")
    tier = scheduler.account.limits()
    assert tier.rpm is not None
    assert tier.tpm is not None
    rpm, tpm = tier.rpm / 2, tier.tpm / 5
    scheduler.observe(
        {"x-ratelimit-limit-requests": f"{rpm:g}", "x-ratelimit-limit-tokens": f"{tpm:g}"}
    )
    limits = scheduler.limiter().limits
    assert limits.rpm == pytest.approx(rpm)
    assert limits.tpm == pytest.approx(tpm)
    assert limits.concurrency == tier.concurrency
    reasons = [event.reason for event in events if isinstance(event, ratekit.events.LimitsAdapted)]
    assert reasons == [
        f"the provider reports requests limit {rpm:g}, the tier {tier.rpm:g}",
        f"the provider reports tokens limit {tpm:g}, the tier {tier.tpm:g}",
    ]
    # An answer that reports only requests leaves the tokens' cap as it was.
    scheduler.observe({"x-ratelimit-limit-requests": f"{tier.rpm:g}"})
    assert scheduler.limiter().limits.rpm == tier.rpm
    assert scheduler.limiter().limits.tpm == pytest.approx(tpm)


async def test_anthropic_rate_limit_headers_are_observed() -> None:
    """The Anthropic API's headers (`anthropic-ratelimit-*`, resets as RFC 3339 instants)
    cap rpm and tpm like OpenAI's; the same numbers as the tier change nothing."""
    scheduler, _, events = make("tier1")
    tier = scheduler.account.limits()
    assert tier.rpm is not None
    assert tier.tpm is not None
    scheduler.observe(
        {
            "anthropic-ratelimit-requests-limit": f"{tier.rpm:g}",
            "anthropic-ratelimit-tokens-limit": f"{tier.tpm:g}",
            "anthropic-ratelimit-tokens-reset": "2026-12-02T10:00:30Z",
        }
    )
    assert scheduler.limiter().limits == tier
    assert not [event for event in events if isinstance(event, ratekit.events.LimitsAdapted)]
    scheduler.observe({"anthropic-ratelimit-tokens-limit": f"{tier.tpm / 4:g}"})
    assert scheduler.limiter().limits.tpm == pytest.approx(tier.tpm / 4)
    assert scheduler.limiter().limits.rpm == tier.rpm


async def test_a_spend_budget_that_cannot_free_up_in_time_fails_at_once() -> None:
    """A daily budget of 1 USD, priced from the profile: the call that would exceed it fails
    at once, saying when the budget frees up."""
    clock = FakeClock()
    budget = ratekit.Rate(1.0, 86_400, "money", name="usd/day")
    account = Account("stepfun", tier="v1", rates=(budget,))
    scheduler = Scheduler(account, clock=clock, classify=classify)
    # step-3.7-flash: 0.20 USD per 1M input tokens, 1.15 per 1M output tokens.
    cost = scheduler.estimate_cost("step-3.7-flash", input_tokens=1_000_000, output_tokens=400_000)
    assert cost == pytest.approx(0.20 + 0.46)

    async def call() -> str:
        return "ok"

    assert await scheduler.submit(call, model="step-3.7-flash", cost=cost) == "ok"
    with pytest.raises(ratekit.AcquireTimeout) as caught:
        await scheduler.submit(call, model="step-3.7-flash", cost=cost, timeout=3600)
    assert caught.value.dimension == "usd/day"
    # The first cost counts until its 24-minute slice ends plus a day.
    slice_s = 86_400 / 60
    frees_at = (clock.now() // slice_s + 1) * slice_s + 86_400
    assert caught.value.retry_after_s == pytest.approx(frees_at - clock.now())


async def test_set_tier_to_the_tier_in_force_changes_nothing() -> None:
    """Moving to the current tier (any case) tells nobody of a change; a real move does."""
    scheduler, _, events = make("tier3")
    version = scheduler.account.version
    await scheduler.set_tier("TIER3")
    assert not [event for event in events if isinstance(event, ratekit.events.TierChanged)]
    assert scheduler.account.version == version
    await scheduler.set_tier("tier4")
    changed = [event for event in events if isinstance(event, ratekit.events.TierChanged)]
    assert [(event.old, event.new) for event in changed] == [("Tier3", "Tier4")]


@dataclass(frozen=True)
class Overloaded:
    retry_after_s: float | None
    retryable: bool = True
    message: str = "529"
    overloaded: bool = True


async def test_an_overloaded_provider_pauses_but_keeps_the_limits() -> None:
    """529s (busy for everyone) that keep coming pause the account each time, and never
    lower its limits as 429s within them would."""
    scheduler, clock, events = make("tier1")
    for _ in range(6):
        await scheduler.rate_limited(None, Overloaded(retry_after_s=0.5))
        clock.advance(1)
    assert scheduler.limiter().limits.rpm == 200
    assert not [e for e in events if isinstance(e, ratekit.events.LimitsAdapted)]
    assert len([e for e in events if isinstance(e, ratekit.events.Cooldown)]) == 6


async def test_the_providers_numbers_hold_across_tier_changes_and_adapt_with_429s() -> None:
    """A reported RPM is the provider's own number: after a move to another tier it still
    caps (never scaled by the old tier's ratio), and 429s lower what is in force."""
    scheduler, clock, _ = make("tier3")
    scheduler.observe({"x-ratelimit-limit-requests": "200"})
    assert scheduler.limiter().limits.rpm == 200
    await scheduler.set_tier("tier1")  # 200 RPM of its own
    assert scheduler.limiter().limits.rpm == 200
    await scheduler.set_tier("tier0")  # 3 RPM: below the provider's number
    assert scheduler.limiter().limits.rpm == 3
    await scheduler.set_tier("tier3")
    assert scheduler.limiter().limits.rpm == 200
    # 429s within the provider's number lower it too.
    await scheduler.rate_limited(None, Signal(retry_after_s=0.0, retryable=True))
    clock.advance(1)
    await scheduler.rate_limited(None, Signal(retry_after_s=0.0, retryable=True))
    assert scheduler.limiter().limits.rpm == pytest.approx(160)


async def test_a_hook_added_later_hears_every_event_from_then() -> None:
    scheduler, _, _ = make("tier1")
    heard: list[ratekit.Event] = []
    async with scheduler.slot():
        pass
    scheduler.add_hook(heard.append)
    scheduler.add_hook(heard.append)  # once is enough
    async with scheduler.slot():
        pass
    assert [type(event).__name__ for event in heard] == ["Queued", "Admitted", "Settled"]
    with pytest.raises(ratekit.InvalidArgumentError, match="must be callable"):
        scheduler.add_hook("print")  # type: ignore[arg-type]
