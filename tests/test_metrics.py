"""Metrics for operators: the Prometheus collector and the OpenTelemetry instruments, fed by
a real Scheduler on a fake clock, read through the real prometheus-client and
opentelemetry-sdk."""

from __future__ import annotations

import functools
import importlib
import logging
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import anyio
import prometheus_client
import pytest
from anyio.abc import TaskGroup
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families

import ratekit
from ratekit import Account, Admission, Scheduler
from ratekit.clock import FakeClock
from ratekit.metrics import _watch
from ratekit.metrics.otel import RatekitMetrics
from ratekit.metrics.prometheus import RatekitCollector

pytestmark = pytest.mark.anyio


class TooManyRequests(Exception):
    """What a provider client raises on a 429, in these tests."""


@dataclass(frozen=True)
class Signal:
    retry_after_s: float | None
    retryable: bool = True
    message: str = "429"


def classify(error: BaseException) -> Signal | None:
    return Signal(retry_after_s=5.0) if isinstance(error, TooManyRequests) else None


def make_scheduler(hook: ratekit.Hook, clock: FakeClock, provider: str = "moonshot") -> Scheduler:
    tier = "tier0" if provider == "moonshot" else "paid"
    return Scheduler(
        Account(provider, tier=tier),
        clock=clock,
        classify=classify,
        hooks=[hook],
        max_attempts=1,
    )


async def let_time_pass(clock: FakeClock, seconds: float, step_s: float = 0.5) -> None:
    """Move the fake clock in steps, letting woken tasks run at each."""
    elapsed = 0.0
    while elapsed < seconds:
        await anyio.wait_all_tasks_blocked()
        clock.advance(step_s)
        elapsed += step_s
    await anyio.wait_all_tasks_blocked()


async def traffic(scheduler: Scheduler, clock: FakeClock, group: TaskGroup) -> Admission:
    """Moonshot Tier0 (1 in flight, 3 RPM): a settled call of a model, a 429 with a 5 s
    cooldown, a call of priority 1 that waits the cooldown out and stays in flight
    (returned), and a call of priority 2 left waiting behind it in `group`."""
    async with scheduler.slot(tokens=100, model="kimi-k2") as admission:
        admission.settle(tokens=80)
    with pytest.raises(TooManyRequests):
        async with scheduler.slot(tokens=10):
            raise TooManyRequests
    held: list[Admission] = []

    async def hold() -> None:
        held.append(await scheduler.admit(tokens=50, priority=1))

    group.start_soon(hold)
    await let_time_pass(clock, 5.0)
    assert len(held) == 1
    group.start_soon(functools.partial(scheduler.submit, anyio.sleep, 0, priority=2))
    await anyio.wait_all_tasks_blocked()
    return held[0]


async def end_traffic(scheduler: Scheduler, clock: FakeClock, held: Admission) -> None:
    """Let the call in flight end and the waiting one through."""
    await scheduler.finish(held)
    await let_time_pass(clock, 60.0, step_s=5.0)


def exposition(registry: prometheus_client.CollectorRegistry) -> str:
    return prometheus_client.generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition text, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- Prometheus ----------------------------------------------------------------------------


async def test_the_exposition_shows_counters_the_histogram_and_gauges() -> None:
    """After admissions, a 429, a cooldown, a call in flight and one waiting, a scrape shows
    each under its Prometheus name, with bounded labels and exact values."""
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock)
    scheduler = make_scheduler(collector, clock)
    collector.watch(scheduler)
    async with anyio.create_task_group() as group:
        held = await traffic(scheduler, clock, group)
        taken_at = clock.wall()
        await collector.refresh()
        text = exposition(registry)
        await end_traffic(scheduler, clock, held)
    for line in [
        # counters, from events
        'ratekit_queued_total{group="account",model="kimi-k2",priority="0"} 1.0',
        'ratekit_queued_total{group="account",model="",priority="2"} 1.0',
        'ratekit_admissions_total{group="account",model="kimi-k2",priority="0"} 1.0',
        'ratekit_admissions_total{group="account",model="",priority="0"} 1.0',
        'ratekit_admissions_total{group="account",model="",priority="1"} 1.0',
        'ratekit_settled_tokens_total{group="account",model="kimi-k2"} 80.0',
        'ratekit_settled_tokens_total{group="account",model=""} 10.0',
        'ratekit_settled_cost_total{currency="USD",group="account",model="kimi-k2"} 0.0',
        'ratekit_rate_limited_total{group="account",model=""} 1.0',
        'ratekit_cooldowns_total{group="account"} 1.0',
        "ratekit_tier_changes_total 0.0",
        # the histogram: two admissions at once, one after the 5 s cooldown
        'ratekit_admission_wait_seconds_bucket{group="account",le="0.005",priority="0"} 2.0',
        'ratekit_admission_wait_seconds_bucket{group="account",le="2.5",priority="1"} 0.0',
        'ratekit_admission_wait_seconds_bucket{group="account",le="5.0",priority="1"} 1.0',
        'ratekit_admission_wait_seconds_sum{group="account",priority="1"} 5.0',
        # gauges, from the snapshot
        'ratekit_waiting_calls{group="account",priority="0"} 0.0',
        'ratekit_waiting_calls{group="account",priority="2"} 1.0',
        'ratekit_limit_requests{dimension="rpm",group="account"} 3.0',
        'ratekit_used_requests{dimension="rpm",group="account"} 3.0',
        'ratekit_headroom_requests{dimension="rpm",group="account"} 0.0',
        'ratekit_limit_slots{dimension="concurrency",group="account"} 1.0',
        'ratekit_in_flight_slots{dimension="concurrency",group="account"} 1.0',
        'ratekit_headroom_slots{dimension="concurrency",group="account"} 0.0',
        'ratekit_limit_tokens{dimension="tpm",group="account"} 500000.0',
        'ratekit_in_flight_tokens{dimension="tpm",group="account"} 50.0',
        'ratekit_adapted_factor_ratio{group="account"} 1.0',
        'ratekit_tier_info{tier="Tier0"} 1.0',
        "# TYPE ratekit_admission_wait_seconds histogram",
        "# TYPE ratekit_used_tokens gauge",
    ]:
        assert line in text.splitlines(), line
    assert samples(text)["ratekit_statistics_timestamp_seconds", frozenset()] == taken_at
    # Safe counting keeps the larger of estimate and usage: 100 + 10 + 50 held.
    assert (
        samples(text)[
            "ratekit_used_tokens", frozenset({("group", "account"), ("dimension", "tpm")})
        ]
        == 160
    )
    # No money rate and no unit beyond the four: no empty family is shown.
    assert "ratekit_limit_money" not in text
    # OpenMetrics (what a scraper that asks for it gets) renders it too.
    assert b"ratekit_admissions_total" in openmetrics(registry)  # type: ignore[no-untyped-call]


async def test_gauges_show_the_last_refresh_and_counters_every_event() -> None:
    """Between refreshes the gauges keep the snapshot while the counters move at once."""
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock)
    scheduler = make_scheduler(collector, clock)
    collector.watch(scheduler)
    assert "ratekit_used_requests" not in exposition(registry)  # no snapshot yet
    await collector.refresh()
    async with scheduler.slot():
        pass
    text = exposition(registry)
    assert 'ratekit_used_requests{dimension="rpm",group="account"} 0.0' in text
    assert 'ratekit_admissions_total{group="account",model="",priority="0"} 1.0' in text
    await collector.refresh()
    assert 'ratekit_used_requests{dimension="rpm",group="account"} 1.0' in exposition(registry)


def refreshed_at(registry: prometheus_client.CollectorRegistry) -> float | None:
    """When the snapshot the gauges show was taken (Unix time); None before any."""
    return samples(exposition(registry)).get(("ratekit_statistics_timestamp_seconds", frozenset()))


async def test_async_with_refreshes_every_interval_and_stops_on_exit() -> None:
    """Inside ``async with`` the snapshot is taken on entry and every `interval_s` of the
    clock; leaving the block ends the refresh task and its timer."""
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock, interval_s=2.0)
    scheduler = make_scheduler(collector, clock)
    collector.watch(scheduler)
    entered_at = clock.wall()
    async with collector:
        assert refreshed_at(registry) == entered_at
        async with scheduler.slot():
            pass
        await let_time_pass(clock, 1.5)
        assert refreshed_at(registry) == entered_at
        assert 'ratekit_used_requests{dimension="rpm",group="account"} 0.0' in exposition(registry)
        await let_time_pass(clock, 0.5)
        assert refreshed_at(registry) == entered_at + 2.0
        assert 'ratekit_used_requests{dimension="rpm",group="account"} 1.0' in exposition(registry)
        with pytest.raises(RuntimeError, match="already refreshing"):
            async with collector:
                pass
    assert clock.pending_timers == 0
    async with collector:  # and may run again
        pass


async def test_a_failing_refresh_keeps_the_snapshot_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that raises (a backend down) keeps the last snapshot; the failure is a
    warning once, and the recovery one info line."""
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock, interval_s=1.0)
    scheduler = make_scheduler(collector, clock)
    collector.watch(scheduler)
    working = scheduler.statistics

    async def down() -> ratekit.statistics.SchedulerStatistics:
        raise ratekit.BackendUnavailableError("redis: connection refused")

    caplog.set_level(logging.INFO, logger="ratekit")
    entered_at = clock.wall()
    async with collector:
        monkeypatch.setattr(scheduler, "statistics", down)
        await let_time_pass(clock, 3.0)
        assert refreshed_at(registry) == entered_at
        monkeypatch.setattr(scheduler, "statistics", working)
        await let_time_pass(clock, 1.0)
        assert refreshed_at(registry) == entered_at + 4.0
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            logging.WARNING,
            "ratekit: RatekitCollector could not refresh its statistics; the gauges keep "
            "the last snapshot",
        ),
        (logging.INFO, "ratekit: RatekitCollector refreshes its statistics again"),
    ]


async def test_a_model_with_limits_of_its_own_is_its_group() -> None:
    """MiniMax's text models have limits of their own: each is a group, and its calls are
    labelled with the profile's name for the model, however it was written."""
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock)
    scheduler = make_scheduler(collector, clock, provider="minimax")
    collector.watch(scheduler)
    cost = scheduler.estimate_cost("MiniMax-M2", input_tokens=1000, output_tokens=500)
    for model in ["minimax-m2", "MiniMax-M2"]:
        async with scheduler.slot(model=model, tokens=1500, cost=cost):
            pass
    await collector.refresh()
    text = exposition(registry)
    for line in [
        'ratekit_admissions_total{group="MiniMax-M2",model="MiniMax-M2",priority="0"} 2.0',
        f'ratekit_settled_cost_total{{currency="CNY",group="MiniMax-M2",model="MiniMax-M2"}} '
        f"{2 * cost!r}",
        'ratekit_limit_requests{dimension="rpm",group="MiniMax-M2"} 20.0',
        'ratekit_used_requests{dimension="rpm",group="MiniMax-M2"} 2.0',
        'ratekit_adapted_factor_ratio{group="MiniMax-M2"} 1.0',
        'ratekit_adapted_factor_ratio{group="account"} 1.0',
    ]:
        assert line in text.splitlines(), line


async def test_models_the_profile_does_not_list_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Moonshot lists no models: each is labelled as given, up to the bound, then "other"
    (said once)."""
    monkeypatch.setattr(_watch, "MAX_MODEL_LABELS", 2)
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock)
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, hooks=[collector])
    collector.watch(scheduler)
    for model in ["kimi-k2", "Kimi-K2", "kimi-k2", "kimi-latest", "moonshot-v1-8k"]:
        async with scheduler.slot(model=model):
            pass
    text = exposition(registry)
    for line in [
        'ratekit_admissions_total{group="account",model="kimi-k2",priority="0"} 2.0',
        'ratekit_admissions_total{group="account",model="Kimi-K2",priority="0"} 1.0',
        'ratekit_admissions_total{group="account",model="other",priority="0"} 2.0',
    ]:
        assert line in text.splitlines(), line
    assert [r.getMessage() for r in caplog.records] == [
        "ratekit: RatekitCollector labels models beyond the first 2 the profile does not "
        "list as 'other'"
    ]


async def test_a_collector_attached_to_a_running_scheduler_counts_from_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A collector given a scheduler that exists adds itself as its hook: it counts the
    admissions from then on, and says once that those before it were not counted."""
    clock = FakeClock()
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock)
    async with scheduler.slot():
        pass
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(scheduler, registry=registry, clock=clock)
    async with scheduler.slot():
        pass
    await collector.refresh()
    await collector.refresh()
    assert [r.getMessage() for r in caplog.records] == [
        "ratekit: RatekitCollector saw 1 of the scheduler's 2 admissions: those made "
        "before it watched the scheduler are not counted"
    ]
    text = prometheus_client.generate_latest(registry).decode()
    assert 'ratekit_admissions_total{group="account",model="",priority="0"} 1.0' in text


async def test_events_before_watch_are_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    """A collector given as a hook but not yet watching drops events, and says so once."""
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock)
    scheduler = make_scheduler(collector, clock)
    async with scheduler.slot():
        pass
    assert len(caplog.records) == 1
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            "ratekit: RatekitCollector got Queued(model=None, priority=0, tokens=0, tenant=None) "
            "before "
            "watch(scheduler)"
        )
    )
    assert "ratekit_admissions_total{" not in exposition(registry)


def test_one_collector_per_namespace_in_a_registry() -> None:
    """The registry refuses a second collector of the same names; another namespace is
    fine."""
    registry = prometheus_client.CollectorRegistry()
    RatekitCollector(registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RatekitCollector(registry=registry)
    RatekitCollector(registry=registry, namespace="batch")
    assert "# TYPE batch_admissions_total counter" in exposition(registry).splitlines()


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: RatekitCollector(namespace="9lives"),
            ratekit.InvalidArgumentError,
            "RatekitCollector.namespace must be a Prometheus name ([a-zA-Z_][a-zA-Z0-9_]*), "
            "got '9lives'",
        ),
        (
            lambda: RatekitCollector(registry="default"),  # type: ignore[arg-type]
            ratekit.InvalidArgumentError,
            "RatekitCollector.registry must be a prometheus_client.CollectorRegistry or None, "
            "got 'default'",
        ),
        (
            lambda: RatekitCollector(interval_s=0),
            ratekit.errors.LimitsError,
            "RatekitCollector.interval_s must be positive, got 0",
        ),
        (
            lambda: RatekitCollector(interval_s="1"),  # type: ignore[arg-type]
            ratekit.InvalidArgumentError,
            "RatekitCollector.interval_s must be a number, got '1'",
        ),
        (
            lambda: RatekitMetrics(interval_s=100_000),
            ratekit.errors.LimitsError,
            "RatekitMetrics.interval_s must be at most 86400, got 100000",
        ),
        (
            lambda: RatekitCollector("scheduler"),  # type: ignore[arg-type]
            ratekit.InvalidArgumentError,
            "RatekitCollector(scheduler) must be a ratekit.Scheduler, got 'scheduler'",
        ),
        (
            lambda: RatekitMetrics(meter_provider="global"),  # type: ignore[arg-type]
            ratekit.InvalidArgumentError,
            "RatekitMetrics.meter_provider must be an opentelemetry MeterProvider or None, "
            "got 'global'",
        ),
        (
            lambda: RatekitCollector(tenant_labels="yes"),  # type: ignore[arg-type]
            ratekit.InvalidArgumentError,
            "RatekitCollector.tenant_labels must be a bool, got 'yes'",
        ),
        (
            lambda: RatekitMetrics(account_labels=1),  # type: ignore[arg-type]
            ratekit.InvalidArgumentError,
            "RatekitMetrics.account_labels must be a bool, got 1",
        ),
    ],
)
def test_bad_arguments_are_typed_errors(build: Any, error: type[Exception], message: str) -> None:
    """Each bad argument raises at construction, naming the argument and the value."""
    with pytest.raises(error) as caught:
        build()
    assert str(caught.value) == message


async def test_one_scheduler_per_collector_and_none_is_not_read() -> None:
    """Watching a second scheduler is refused; refreshing or running unwatched too."""
    collector = RatekitCollector(registry=prometheus_client.CollectorRegistry())
    with pytest.raises(RuntimeError, match=r"^RatekitCollector.refresh: no scheduler to read; "):
        await collector.refresh()
    with pytest.raises(RuntimeError, match=r"^RatekitCollector.__aenter__: no scheduler"):
        async with collector:
            pass
    first = Scheduler(Account("moonshot"))
    collector.watch(first)
    collector.watch(first)
    with pytest.raises(ratekit.InvalidArgumentError) as caught:
        collector.watch(Scheduler(Account("moonshot")))
    assert str(caught.value) == (
        "RatekitCollector.watch(scheduler): this RatekitCollector already watches "
        f"{first!r}; make one per scheduler"
    )


async def tenants_traffic(scheduler: Scheduler) -> None:
    """Calls of tenants acme (twice, settled with 30 tokens each), initech (through a
    ``ratekit.tenant`` block), globex, and one without a tenant."""
    for tenant in ["acme", "acme", "globex"]:
        async with scheduler.slot(tokens=50, tenant=tenant) as admission:
            admission.settle(tokens=30)
    with ratekit.tenant("initech"):
        async with scheduler.slot(tokens=50) as admission:
            admission.settle(tokens=30)
    async with scheduler.slot(tokens=50) as admission:
        admission.settle(tokens=30)


def pool_events() -> list[ratekit.Event]:
    """What a pool tells its hooks of calls its accounts served: the account named when
    the call is admitted and when it is settled, not when it is queued."""
    events = ratekit.events
    return [
        events.Queued("kimi-k2", 0, 100, "acme"),
        events.Admitted("kimi-k2", 0, 0.5, "acme", "key-1"),
        events.Settled("kimi-k2", 80, 0.0, "acme", "key-1"),
        events.Queued("kimi-k2", 0, 100),
        events.Admitted("kimi-k2", 0, 0.0, None, "key-2"),
        events.Settled("kimi-k2", 60, 0.0, None, "key-2"),
        events.Admitted("kimi-k2", 0, 0.0, None, "key-3"),
    ]


def label_names(text: str) -> set[str]:
    return {name for _, labels in samples(text) for name, _ in labels}


async def test_tenant_labels_are_opt_in_and_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``tenant_labels=True`` the queued, admissions, wait and settled metrics carry
    the call's tenant ("" for none), the first names as given, then "other" (said once);
    without it (the default) no metric has a tenant label."""
    monkeypatch.setattr(_watch, "MAX_TENANT_LABELS", 2)
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock, tenant_labels=True)
    plain_registry = prometheus_client.CollectorRegistry()
    plain = RatekitCollector(registry=plain_registry, clock=clock)
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, hooks=[collector, plain])
    collector.watch(scheduler)
    plain.watch(scheduler)
    await tenants_traffic(scheduler)
    text = exposition(registry)
    for line in [
        'ratekit_queued_total{group="account",model="",priority="0",tenant="acme"} 2.0',
        'ratekit_admissions_total{group="account",model="",priority="0",tenant="acme"} 2.0',
        'ratekit_admissions_total{group="account",model="",priority="0",tenant="globex"} 1.0',
        'ratekit_admissions_total{group="account",model="",priority="0",tenant="other"} 1.0',
        'ratekit_admissions_total{group="account",model="",priority="0",tenant=""} 1.0',
        'ratekit_admission_wait_seconds_count{group="account",priority="0",tenant="acme"} 2.0',
        'ratekit_settled_tokens_total{group="account",model="",tenant="acme"} 60.0',
        'ratekit_settled_tokens_total{group="account",model="",tenant="other"} 30.0',
        'ratekit_settled_cost_total{currency="USD",group="account",model="",tenant=""} 0.0',
    ]:
        assert line in text.splitlines(), line
    assert "account" not in label_names(text)
    assert [r.getMessage() for r in caplog.records] == [
        "ratekit: RatekitCollector labels tenants beyond the first 2 as 'other'"
    ]
    plain_text = exposition(plain_registry)
    assert "tenant" not in label_names(plain_text)
    assert (
        'ratekit_admissions_total{group="account",model="",priority="0"} 5.0'
        in plain_text.splitlines()
    )


async def test_account_labels_name_the_pools_account_that_served_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``account_labels=True`` the admissions, wait and settled metrics carry the
    account an event names (bounded like tenants; "" for a call of no pool), the queued
    one does not (a call is queued before an account admits it); the default has none."""
    monkeypatch.setattr(_watch, "MAX_ACCOUNT_LABELS", 2)
    clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    collector = RatekitCollector(registry=registry, clock=clock, account_labels=True)
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, hooks=[collector])
    collector.watch(scheduler)
    for event in pool_events():
        collector(event)
    async with scheduler.slot():  # a call of the scheduler itself: no account
        pass
    text = exposition(registry)
    for line in [
        'ratekit_queued_total{group="account",model="kimi-k2",priority="0"} 2.0',
        'ratekit_admissions_total{account="key-1",group="account",model="kimi-k2",priority="0"} '
        "1.0",
        'ratekit_admissions_total{account="key-2",group="account",model="kimi-k2",priority="0"} '
        "1.0",
        'ratekit_admissions_total{account="other",group="account",model="kimi-k2",priority="0"} '
        "1.0",
        'ratekit_admissions_total{account="",group="account",model="",priority="0"} 1.0',
        'ratekit_admission_wait_seconds_sum{account="key-1",group="account",priority="0"} 0.5',
        'ratekit_settled_tokens_total{account="key-1",group="account",model="kimi-k2"} 80.0',
        'ratekit_settled_tokens_total{account="key-2",group="account",model="kimi-k2"} 60.0',
    ]:
        assert line in text.splitlines(), line
    assert "tenant" not in label_names(text)
    default = prometheus_client.CollectorRegistry()
    unlabelled = RatekitCollector(registry=default, clock=clock)
    unlabelled.watch(Scheduler(Account("moonshot", tier="tier1"), clock=clock))
    for event in pool_events():
        unlabelled(event)
    assert "account" not in label_names(exposition(default))


# -- OpenTelemetry -------------------------------------------------------------------------


def points(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def values(metric: Metric) -> dict[frozenset[tuple[str, Any]], float]:
    """Each data point's value by its attributes (a counter's or a gauge's)."""
    return {
        frozenset((point.attributes or {}).items()): point.value
        for point in metric.data.data_points
        if isinstance(point, NumberDataPoint)
    }


def histogram(metric: Metric) -> dict[frozenset[tuple[str, Any]], HistogramDataPoint]:
    """Each data point of a histogram by its attributes."""
    return {
        frozenset((point.attributes or {}).items()): point
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
    }


def attrs(**named: Any) -> frozenset[tuple[str, Any]]:
    return frozenset((f"ratekit.{key}", value) for key, value in named.items())


async def test_opentelemetry_data_points() -> None:
    """The same traffic through the OpenTelemetry SDK: counters, the wait histogram with
    its advised buckets, and observable gauges, with their units and attributes."""
    clock = FakeClock()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel = RatekitMetrics(meter_provider=provider, clock=clock)
    scheduler = make_scheduler(otel, clock)
    otel.watch(scheduler)
    async with anyio.create_task_group() as group:
        held = await traffic(scheduler, clock, group)
        await otel.refresh()
        clock.advance(0.25)
        metrics = points(reader)
        await end_traffic(scheduler, clock, held)
    units = {name: metric.unit for name, metric in metrics.items()}
    assert units == {
        "ratekit.calls.queued": "{call}",
        "ratekit.admissions": "{call}",
        "ratekit.admission.wait_time": "s",
        "ratekit.settled.tokens": "{token}",
        "ratekit.settled.cost": "{currency}",
        "ratekit.provider.rate_limits": "{response}",
        "ratekit.cooldowns": "{cooldown}",
        "ratekit.calls.waiting": "{call}",
        "ratekit.requests.limit": "{request}",
        "ratekit.requests.used": "{request}",
        "ratekit.requests.headroom": "{request}",
        "ratekit.requests.in_flight": "{request}",
        "ratekit.tokens.limit": "{token}",
        "ratekit.tokens.used": "{token}",
        "ratekit.tokens.headroom": "{token}",
        "ratekit.tokens.in_flight": "{token}",
        "ratekit.slots.limit": "{slot}",
        "ratekit.slots.used": "{slot}",
        "ratekit.slots.headroom": "{slot}",
        "ratekit.slots.in_flight": "{slot}",
        "ratekit.limits.factor": "1",
        "ratekit.tier": "1",
        "ratekit.statistics.age": "s",
    }
    assert values(metrics["ratekit.admissions"]) == {
        attrs(group="account", model="kimi-k2", priority=0): 1,
        attrs(group="account", model="", priority=0): 1,
        attrs(group="account", model="", priority=1): 1,
    }
    assert values(metrics["ratekit.settled.tokens"]) == {
        attrs(group="account", model="kimi-k2"): 80,
        attrs(group="account", model=""): 10,
    }
    assert (
        values(metrics["ratekit.settled.cost"])[
            attrs(group="account", model="kimi-k2", currency="USD")
        ]
        == 0
    )
    assert values(metrics["ratekit.provider.rate_limits"]) == {attrs(group="account", model=""): 1}
    assert values(metrics["ratekit.cooldowns"]) == {attrs(group="account"): 1}
    waited = histogram(metrics["ratekit.admission.wait_time"])[attrs(group="account", priority=1)]
    assert (waited.count, waited.sum) == (1, 5.0)
    assert tuple(waited.explicit_bounds) == _watch.WAIT_BUCKETS_S
    assert values(metrics["ratekit.calls.waiting"]) == {
        attrs(group="account", priority=0): 0,
        attrs(group="account", priority=1): 0,
        attrs(group="account", priority=2): 1,
    }
    assert values(metrics["ratekit.requests.used"]) == {attrs(group="account", dimension="rpm"): 3}
    assert values(metrics["ratekit.requests.headroom"]) == {
        attrs(group="account", dimension="rpm"): 0
    }
    assert values(metrics["ratekit.slots.in_flight"]) == {
        attrs(group="account", dimension="concurrency"): 1
    }
    assert values(metrics["ratekit.tokens.limit"]) == {
        attrs(group="account", dimension="tpm"): 500_000,
        attrs(group="account", dimension="tpd"): 1_500_000,
    }
    assert values(metrics["ratekit.limits.factor"]) == {attrs(group="account"): 1.0}
    assert values(metrics["ratekit.tier"]) == {attrs(tier="Tier0"): 1}
    assert values(metrics["ratekit.statistics.age"]) == {frozenset(): 0.25}


async def test_opentelemetry_counts_adaptations_and_tier_changes() -> None:
    """429s that keep coming adapt the limits (the factor gauge follows at the next
    refresh), and a top-up that changes the tier is counted."""
    clock = FakeClock()
    reader = InMemoryMetricReader()
    otel = RatekitMetrics(meter_provider=MeterProvider(metric_readers=[reader]), clock=clock)
    scheduler = make_scheduler(otel, clock)
    otel.watch(scheduler)
    await scheduler.add_top_up(10)  # Tier1
    for _ in range(2):
        with pytest.raises(TooManyRequests):
            async with scheduler.slot():
                raise TooManyRequests
        await let_time_pass(clock, 5.0)
    await otel.refresh()
    metrics = points(reader)
    assert values(metrics["ratekit.tier.changes"]) == {frozenset(): 1}
    assert values(metrics["ratekit.limit.adaptations"]) == {attrs(group="account"): 1}
    assert values(metrics["ratekit.limits.factor"]) == {attrs(group="account"): 0.8}
    assert values(metrics["ratekit.tier"]) == {attrs(tier="Tier1"): 1}
    assert values(metrics["ratekit.requests.limit"]) == {
        attrs(group="account", dimension="rpm"): pytest.approx(160)
    }


async def test_opentelemetry_tenant_and_account_attributes() -> None:
    """Opted in, the instruments carry ``ratekit.tenant`` (queued, admissions, wait time,
    settled) and ``ratekit.account`` (the admitted and settled ones)."""
    clock = FakeClock()
    reader = InMemoryMetricReader()
    otel = RatekitMetrics(
        meter_provider=MeterProvider(metric_readers=[reader]),
        clock=clock,
        tenant_labels=True,
        account_labels=True,
    )
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, hooks=[otel])
    otel.watch(scheduler)
    await tenants_traffic(scheduler)
    for event in pool_events():
        otel(event)
    metrics = points(reader)
    assert values(metrics["ratekit.calls.queued"]) == {
        attrs(group="account", model="", priority=0, tenant="acme"): 2,
        attrs(group="account", model="", priority=0, tenant="globex"): 1,
        attrs(group="account", model="", priority=0, tenant="initech"): 1,
        attrs(group="account", model="", priority=0, tenant=""): 1,
        attrs(group="account", model="kimi-k2", priority=0, tenant="acme"): 1,
        attrs(group="account", model="kimi-k2", priority=0, tenant=""): 1,
    }
    admissions = values(metrics["ratekit.admissions"])
    assert admissions[attrs(group="account", model="", priority=0, tenant="acme", account="")] == 2
    assert (
        admissions[
            attrs(group="account", model="kimi-k2", priority=0, tenant="acme", account="key-1")
        ]
        == 1
    )
    assert len(admissions) == 7
    waited = histogram(metrics["ratekit.admission.wait_time"])
    key_1 = waited[attrs(group="account", priority=0, tenant="acme", account="key-1")]
    assert (key_1.count, key_1.sum) == (1, 0.5)
    assert (
        values(metrics["ratekit.settled.tokens"])[
            attrs(group="account", model="kimi-k2", tenant="", account="key-2")
        ]
        == 60
    )
    assert (
        values(metrics["ratekit.settled.cost"])[
            attrs(group="account", model="", tenant="initech", account="", currency="USD")
        ]
        == 0
    )


# -- the extras ----------------------------------------------------------------------------


def test_importing_ratekit_imports_no_metrics_package() -> None:
    """``import ratekit`` (and ``ratekit.metrics``) loads neither prometheus_client nor
    opentelemetry."""
    code = (
        "import sys, ratekit, ratekit.metrics\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'prometheus_client', 'opentelemetry'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "package", "message"),
    [
        (
            "ratekit.metrics.prometheus",
            "prometheus_client",
            "ratekit.metrics.prometheus needs the 'prometheus-client' package, which is not "
            "installed: pip install 'ratekit[prometheus]'",
        ),
        (
            "ratekit.metrics.otel",
            "opentelemetry",
            "ratekit.metrics.otel needs the 'opentelemetry-api' package, which is not "
            "installed: pip install 'ratekit[otel]'",
        ),
    ],
)
def test_a_missing_package_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, package: str, message: str
) -> None:
    """Without its library, importing an adapter raises MissingExtraError naming the extra."""
    monkeypatch.setitem(sys.modules, package, None)  # what an absent package imports as
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ratekit.MissingExtraError) as caught:
        importlib.import_module(module)
    assert str(caught.value) == message
    assert caught.value.extra == message.rsplit("[", 1)[1].rstrip("]'")
