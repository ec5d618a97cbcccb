"""A scheduler's metrics for Prometheus, through the `prometheus-client` package (the
``prometheus`` extra: ``pip install 'ratekit[prometheus]'``).

`RatekitCollector` is both a scheduler hook (it counts events) and a Prometheus
collector (a scrape reads it)::

    collector = RatekitCollector(registry=registry)    # registry=None: the default one
    scheduler = ratekit.Scheduler(account, hooks=[collector])
    collector.watch(scheduler)
    async with collector:                               # the gauges, refreshed every second
        ...                                             # run the application

Counters and the histogram are exact at every scrape. Gauges show the last snapshot
of the scheduler's statistics, taken by ``await collector.refresh()`` or, inside
``async with collector:``, on entry and then every `interval_s` (default 1 s); a
refresh that fails keeps the last one, and ``ratekit_statistics_timestamp_seconds``
says when it was taken. Names with the default namespace ``ratekit``:

Counters and histogram, from events (labels: group, model, priority as listed)

- ``ratekit_queued_total{group, model, priority}``: calls that asked for an admission.
- ``ratekit_admissions_total{group, model, priority}``: calls admitted.
- ``ratekit_admission_wait_seconds{group, priority}``: histogram of the time from
  asking to admission.
- ``ratekit_settled_tokens_total{group, model}``: tokens calls were settled with (the
  provider's count, else the estimate).
- ``ratekit_settled_cost_total{group, model, currency}``: their cost, in the profile's
  currency.
- ``ratekit_rate_limited_total{group, model}``: the provider's 429s to admitted calls.
- ``ratekit_cooldowns_total{group}``: pauses after a 429.
- ``ratekit_limit_adaptations_total{group}``: changes of the limits in force (429s that
  keep coming, a clean period, the provider's headers).
- ``ratekit_tier_changes_total``: moves to another tier.

Gauges, from the snapshot

- ``ratekit_waiting_calls{group, priority}``: callers waiting now.
- ``ratekit_limit_<unit>``, ``ratekit_used_<unit>``, ``ratekit_headroom_<unit>``
  (limit less used, at least 0) and ``ratekit_in_flight_<unit>`` (held by calls not yet
  settled), each ``{group, dimension}``, where `unit` is the dimension's: ``requests``,
  ``tokens``, ``slots`` (concurrency) or ``money`` (which also has ``currency``).
- ``ratekit_adapted_factor_ratio{group}``: the share of the tier's limits in force
  after 429s (1: all of them).
- ``ratekit_tier_info{tier}``: 1, for the tier in force.
- ``ratekit_statistics_timestamp_seconds``: when the snapshot was taken (Unix time).

A group is ``account`` or a model with limits of its own; a model is the profile's name,
the name given for models the profile does not list, or ``""`` (no model).

Opt-in labels: ``RatekitCollector(tenant_labels=True)`` adds ``tenant`` to the queued,
admissions, wait and settled metrics (the call's tenant, ``""`` for none);
``account_labels=True`` adds ``account`` to the admissions, wait and settled metrics
(the pool's account that served the call, ``""`` for a call of no pool). Each keeps
the first 100 names as given and labels the rest ``"other"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final, TypeVar, cast

from .._clock import Clock
from .._errors import InvalidArgumentError, MissingExtraError
from .._limits import UNITS, show
from .._scheduler import Scheduler
from ..backends import DimensionStatistics
from ._watch import DEFAULT_INTERVAL_S, MEASURES, WAIT_BUCKETS_S, Snapshot, Watcher, Who

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] != "prometheus_client":
        raise
    raise MissingExtraError(
        "ratekit.metrics.prometheus", "prometheus-client", "prometheus"
    ) from None

__all__ = ["RatekitCollector"]

_Metric = TypeVar("_Metric", Counter, Histogram)

_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The units of a dimension: the rates' and the concurrency cap's.
_UNITS: Final = (*UNITS, "slots")


class RatekitCollector(Watcher):
    """Prometheus metrics of one `Scheduler`: a hook that counts its events, and a
    collector whose gauges show its statistics (see the module's docstring for the
    names).

    A scheduler takes its hooks at construction only, so build the collector first,
    give it as ``Scheduler(account, hooks=[collector])``, then ``collector.watch(
    scheduler)``. Passing `scheduler` here is the same `watch`: the gauges work, but
    events are counted only if the collector is one of that scheduler's hooks (a
    refresh warns when it is not).

    It registers itself in `registry` at once (None: ``prometheus_client.REGISTRY``;
    take it out with ``registry.unregister(collector)``): one collector per scheduler
    and `namespace` in a registry. Gauges are as of the last `refresh`: at most
    `interval_s` (in [0.01, 86400] seconds) old inside ``async with collector:``,
    which refreshes on the scheduler's event loop, waiting on `clock` (the system's
    by default). `tenant_labels` and `account_labels` (False by default) add the
    ``tenant`` and ``account`` labels (see the module's docstring).

    The hook runs on the scheduler's loop; scrapes may come from any thread.
    """

    def __init__(
        self,
        scheduler: Scheduler | None = None,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "ratekit",
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Clock | None = None,
        tenant_labels: bool = False,
        account_labels: bool = False,
    ) -> None:
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise InvalidArgumentError(
                f"RatekitCollector.namespace must be a Prometheus name ([a-zA-Z_][a-zA-Z0-9_]*), "
                f"got {show(namespace)}"
            )
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise InvalidArgumentError(
                "RatekitCollector.registry must be a prometheus_client.CollectorRegistry or "
                f"None, got {show(registry)}"
            )
        super().__init__(
            scheduler,
            interval_s=interval_s,
            clock=clock,
            tenant_labels=tenant_labels,
            account_labels=account_labels,
        )
        self._namespace = namespace
        call = ("group", "model")
        # The opt-in labels of queued calls, and of admitted and settled ones.
        asked = self._who_labels(accounted=False)
        served = self._who_labels(accounted=True)
        self._queued_total = self._counter(
            "queued", "Calls that asked for an admission", (*call, "priority", *asked)
        )
        self._admissions = self._counter(
            "admissions", "Calls admitted", (*call, "priority", *served)
        )
        self._wait = Histogram(
            "admission_wait_seconds",
            "Seconds from asking for an admission to being admitted",
            ("group", "priority", *served),
            namespace=namespace,
            registry=None,
            buckets=WAIT_BUCKETS_S,
        )
        self._tokens = self._counter(
            "settled_tokens",
            "Tokens calls were settled with (the provider's count, else the estimate)",
            (*call, *served),
        )
        self._cost = self._counter(
            "settled_cost",
            "Cost calls were settled with, in the profile's currency",
            (*call, "currency", *served),
        )
        self._rate_limited_total = self._counter(
            "rate_limited", "Rate-limit answers (429) of the provider to admitted calls", call
        )
        self._cooldowns = self._counter("cooldowns", "Pauses of a group after a 429", ("group",))
        self._adaptations = self._counter(
            "limit_adaptations",
            "Changes of a group's limits in force (429s, a clean period, provider headers)",
            ("group",),
        )
        self._tier_changes = self._counter("tier_changes", "Moves of the account to another tier")
        # The labelled children of the metrics above, by (metric, label values).
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Counter | Histogram] = {}
        (prometheus_client.REGISTRY if registry is None else registry).register(self)

    def _counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        # Not registered on its own: the collector yields it with the gauges.
        return Counter(name, documentation, labels, namespace=self._namespace, registry=None)

    # -- events -----------------------------------------------------------------------

    def _queued(self, group: str, model: str, priority: int, who: Who) -> None:
        self._child(self._queued_total, group, model, str(priority), *_values(who)).inc()

    def _admitted(self, group: str, model: str, priority: int, waited_s: float, who: Who) -> None:
        values = _values(who)
        self._child(self._admissions, group, model, str(priority), *values).inc()
        self._child(self._wait, group, str(priority), *values).observe(waited_s)

    def _settled(
        self, group: str, model: str, tokens: float, cost: float, currency: str, who: Who
    ) -> None:
        values = _values(who)
        self._child(self._tokens, group, model, *values).inc(tokens)
        self._child(self._cost, group, model, currency, *values).inc(cost)

    def _rate_limited(self, group: str, model: str) -> None:
        self._child(self._rate_limited_total, group, model).inc()

    def _cooldown(self, group: str) -> None:
        self._child(self._cooldowns, group).inc()

    def _adapted(self, group: str) -> None:
        self._child(self._adaptations, group).inc()

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        """`metric.labels(*labels)`, kept: an event costs a dict lookup rather than the
        library's checks and lock (the labels are bounded, so is the cache)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(_Metric, child)

    def _tier_changed(self) -> None:
        self._tier_changes.inc()

    # -- the Prometheus collector -------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every metric: the counters as they are now, the gauges as of the last refresh."""
        for metric in self._event_metrics():
            yield from metric.collect()
        snapshot = self._snapshot  # one read: a refresh may replace it meanwhile
        if snapshot is not None:
            yield from self._gauges(snapshot)

    def describe(self) -> Iterator[Metric]:
        """Every metric's name and type, without samples, for the registry's checks."""
        for metric in self._event_metrics():
            yield from metric.describe()
        yield from self._gauges(None)

    def _event_metrics(self) -> tuple[Counter | Histogram, ...]:
        return (
            self._queued_total,
            self._admissions,
            self._wait,
            self._tokens,
            self._cost,
            self._rate_limited_total,
            self._cooldowns,
            self._adaptations,
            self._tier_changes,
        )

    def _gauges(self, snapshot: Snapshot | None) -> Iterator[Metric]:
        """The gauges of `snapshot`; with None, every gauge family without samples."""
        ns = self._namespace
        waiting = GaugeMetricFamily(
            f"{ns}_waiting_calls", "Callers waiting for an admission", labels=("group", "priority")
        )
        factor = GaugeMetricFamily(
            f"{ns}_adapted_factor_ratio",
            "Share of the tier's limits in force after 429s (1: all of them)",
            labels=("group",),
        )
        stamp = GaugeMetricFamily(
            f"{ns}_statistics_timestamp_seconds",
            "When the statistics the gauges show were taken (Unix time)",
        )
        tier = InfoMetricFamily(f"{ns}_tier", "The tier the account is on")
        dimensions = {
            (measure, unit): self._dimension_family(measure, about, unit)
            for measure, about, _ in MEASURES
            for unit in _UNITS
        }
        if snapshot is not None:
            stamp.add_metric((), snapshot.taken.wall)
            tier.add_metric((), {"tier": snapshot.tier})
            for group in snapshot.groups:
                factor.add_metric((group.name,), group.factor)
                for priority, count in group.waiting:
                    waiting.add_metric((group.name, str(priority)), count)
                for dimension in group.dimensions:
                    self._add_dimension(dimensions, group.name, dimension, snapshot.currency)
        yield waiting
        for family in dimensions.values():
            if snapshot is None or family.samples:
                yield family
        yield factor
        yield tier
        yield stamp

    def _dimension_family(self, measure: str, about: str, unit: str) -> GaugeMetricFamily:
        labels = ("group", "dimension", "currency") if unit == "money" else ("group", "dimension")
        suffix = _name_part(unit)
        return GaugeMetricFamily(
            f"{self._namespace}_{measure}_{suffix}", f"{about}, in {unit}", labels=labels
        )

    def _add_dimension(
        self,
        families: dict[tuple[str, str], GaugeMetricFamily],
        group: str,
        dimension: DimensionStatistics,
        currency: str,
    ) -> None:
        labels: tuple[str, ...] = (group, dimension.name)
        if dimension.unit == "money":
            labels = (*labels, currency)
        for measure, about, read in MEASURES:
            family = families.get((measure, dimension.unit))
            if family is None:  # a unit this module does not know yet: named after it
                family = families[measure, dimension.unit] = self._dimension_family(
                    measure, about, dimension.unit
                )
            family.add_metric(labels, read(dimension))


def _values(who: Who) -> tuple[str, ...]:
    """The values of the opt-in labels, in the order the metrics name them."""
    return tuple(value for _, value in who)


def _name_part(text: str) -> str:
    """`text` as a part of a Prometheus name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)
