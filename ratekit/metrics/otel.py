"""A scheduler's metrics for OpenTelemetry, through the `opentelemetry-api` package (the
``otel`` extra: ``pip install 'ratekit[otel]'``).

`RatekitMetrics` is a scheduler hook that records events on counters and a
histogram, and a set of observable gauges whose callbacks read the scheduler's
statistics::

    metrics = RatekitMetrics(meter_provider=provider)  # None: the global provider
    scheduler = ratekit.Scheduler(account, hooks=[metrics])
    metrics.watch(scheduler)
    async with metrics:                                 # the gauges, refreshed every second
        ...                                             # run the application

Only the API is needed here: the application configures the SDK (a `MeterProvider`
with its readers and exporters); without one, every instrument is a no-op, as the
API specifies. Counters and the histogram are exact at every collection; the gauges
show the last snapshot of the statistics, taken by ``await metrics.refresh()`` or,
inside ``async with metrics:``, on entry and then every `interval_s` (default 1 s);
``ratekit.statistics.age`` says how old it is. Instruments (meter ``ratekit``):

Counters and histogram, from events

- ``ratekit.calls.queued`` ({call}): calls that asked for an admission.
- ``ratekit.admissions`` ({call}): calls admitted.
- ``ratekit.admission.wait_time`` (s): histogram of the time from asking to admission.
- ``ratekit.settled.tokens`` ({token}): tokens calls were settled with.
- ``ratekit.settled.cost`` ({currency}): their cost, in ``ratekit.currency``.
- ``ratekit.provider.rate_limits`` ({response}): the provider's 429s to admitted calls.
- ``ratekit.cooldowns`` ({cooldown}): pauses after a 429.
- ``ratekit.limit.adaptations`` ({adaptation}): changes of the limits in force.
- ``ratekit.tier.changes`` ({change}): moves to another tier.

Observable gauges, from the snapshot

- ``ratekit.calls.waiting`` ({call}): callers waiting now.
- ``ratekit.<unit>.limit``, ``.used``, ``.headroom`` and ``.in_flight`` per dimension,
  where `unit` is ``requests`` ({request}), ``tokens`` ({token}), ``slots`` ({slot},
  concurrency) or ``money`` ({currency}).
- ``ratekit.limits.factor`` (1): the share of the tier's limits in force after 429s.
- ``ratekit.tier`` (1): 1, with the tier in force as ``ratekit.tier``.
- ``ratekit.statistics.age`` (s): how old the snapshot is.

Attributes: ``ratekit.group`` (``account`` or a model with limits of its own),
``ratekit.model`` (the profile's name, the name given for models it does not list, or
``""``), ``ratekit.priority`` (an int), ``ratekit.dimension`` (``rpm``, ``tpm``,
``concurrency``, ...) and ``ratekit.currency`` (on money). Opt-in:
``RatekitMetrics(tenant_labels=True)`` adds ``ratekit.tenant`` to the queued, admissions,
wait time and settled instruments (the call's tenant, ``""`` for none);
``account_labels=True`` adds ``ratekit.account`` to the admissions, wait time and
settled ones (the pool's account that served the call, ``""`` for a call of no pool).
Each keeps the first 100 names as given and records the rest as ``"other"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from .. import __version__
from .._clock import Clock
from .._errors import InvalidArgumentError, MissingExtraError
from .._limits import show
from .._scheduler import Scheduler
from ..backends import DimensionStatistics
from ._watch import DEFAULT_INTERVAL_S, MEASURES, WAIT_BUCKETS_S, Watcher, Who

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] != "opentelemetry":
        raise
    raise MissingExtraError("ratekit.metrics.otel", "opentelemetry-api", "otel") from None

__all__ = ["RatekitMetrics"]

# A dimension's unit and the instrument unit its gauges are in.
_UNITS: Final = (
    ("requests", "{request}"),
    ("tokens", "{token}"),
    ("slots", "{slot}"),
    ("money", "{currency}"),
)

Gauge = Callable[[CallbackOptions], Iterable[Observation]]


class RatekitMetrics(Watcher):
    """OpenTelemetry metrics of one `Scheduler`: a hook that records its events, and
    observable gauges of its statistics (see the module's docstring for the names).

    A scheduler takes its hooks at construction only, so build this first, give it as
    ``Scheduler(account, hooks=[metrics])``, then ``metrics.watch(scheduler)``.
    Passing `scheduler` here is the same `watch`: the gauges work, but events are
    recorded only if this is one of that scheduler's hooks (a refresh warns when it
    is not).

    Instruments come from the meter ``ratekit`` of `meter_provider` (None: the global
    one): one `RatekitMetrics` per scheduler and provider. Gauges are as of the last
    `refresh`: at most `interval_s` (in [0.01, 86400] seconds) old inside ``async with
    metrics:``, which refreshes on the scheduler's event loop, waiting on `clock` (the
    system's by default). `tenant_labels` and `account_labels` (False by default) add
    the ``ratekit.tenant`` and ``ratekit.account`` attributes (see the module's
    docstring).

    The hook runs on the scheduler's loop; collections may come from any thread.
    """

    def __init__(
        self,
        scheduler: Scheduler | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Clock | None = None,
        tenant_labels: bool = False,
        account_labels: bool = False,
    ) -> None:
        if meter_provider is not None and not isinstance(meter_provider, MeterProvider):
            raise InvalidArgumentError(
                "RatekitMetrics.meter_provider must be an opentelemetry MeterProvider or None, "
                f"got {show(meter_provider)}"
            )
        super().__init__(
            scheduler,
            interval_s=interval_s,
            clock=clock,
            tenant_labels=tenant_labels,
            account_labels=account_labels,
        )
        meter = metrics.get_meter("ratekit", __version__, meter_provider=meter_provider)
        self._queued_total = meter.create_counter(
            "ratekit.calls.queued", "{call}", "Calls that asked for an admission"
        )
        self._admissions = meter.create_counter("ratekit.admissions", "{call}", "Calls admitted")
        self._wait = meter.create_histogram(
            "ratekit.admission.wait_time",
            "s",
            "Time from asking for an admission to being admitted",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS_S,
        )
        self._tokens = meter.create_counter(
            "ratekit.settled.tokens",
            "{token}",
            "Tokens calls were settled with (the provider's count, else the estimate)",
        )
        self._cost = meter.create_counter(
            "ratekit.settled.cost", "{currency}", "Cost calls were settled with"
        )
        self._rate_limits = meter.create_counter(
            "ratekit.provider.rate_limits",
            "{response}",
            "Rate-limit answers (429) of the provider to admitted calls",
        )
        self._cooldowns = meter.create_counter(
            "ratekit.cooldowns", "{cooldown}", "Pauses of a group after a 429"
        )
        self._adaptations = meter.create_counter(
            "ratekit.limit.adaptations",
            "{adaptation}",
            "Changes of a group's limits in force (429s, a clean period, provider headers)",
        )
        self._tier_changes = meter.create_counter(
            "ratekit.tier.changes", "{change}", "Moves of the account to another tier"
        )
        meter.create_observable_gauge(
            "ratekit.calls.waiting", [self._waiting], "{call}", "Callers waiting for an admission"
        )
        for unit, instrument_unit in _UNITS:
            for measure, about, read in MEASURES:
                meter.create_observable_gauge(
                    f"ratekit.{unit}.{measure}",
                    [self._dimension_gauge(unit, read)],
                    instrument_unit,
                    f"{about}, in {unit}",
                )
        meter.create_observable_gauge(
            "ratekit.limits.factor",
            [self._factors],
            "1",
            "Share of the tier's limits in force after 429s (1: all of them)",
        )
        meter.create_observable_gauge(
            "ratekit.tier", [self._tier], "1", "1, for the tier the account is on"
        )
        meter.create_observable_gauge(
            "ratekit.statistics.age", [self._age], "s", "Age of the statistics the gauges show"
        )

    # -- events -----------------------------------------------------------------------

    def _queued(self, group: str, model: str, priority: int, who: Who) -> None:
        self._queued_total.add(1, {**_call(group, model, priority), **_who(who)})

    def _admitted(self, group: str, model: str, priority: int, waited_s: float, who: Who) -> None:
        named = _who(who)
        self._admissions.add(1, {**_call(group, model, priority), **named})
        waited: dict[str, str | int] = {
            "ratekit.group": group,
            "ratekit.priority": priority,
            **named,
        }
        self._wait.record(waited_s, waited)

    def _settled(
        self, group: str, model: str, tokens: float, cost: float, currency: str, who: Who
    ) -> None:
        attributes = {"ratekit.group": group, "ratekit.model": model, **_who(who)}
        self._tokens.add(tokens, attributes)
        self._cost.add(cost, {**attributes, "ratekit.currency": currency})

    def _rate_limited(self, group: str, model: str) -> None:
        self._rate_limits.add(1, {"ratekit.group": group, "ratekit.model": model})

    def _cooldown(self, group: str) -> None:
        self._cooldowns.add(1, {"ratekit.group": group})

    def _adapted(self, group: str) -> None:
        self._adaptations.add(1, {"ratekit.group": group})

    def _tier_changed(self) -> None:
        self._tier_changes.add(1)

    # -- gauges (called at collection, from the reader's thread) ------------------------

    def _waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        if snapshot is None:
            return
        for group in snapshot.groups:
            for priority, count in group.waiting:
                attributes: dict[str, str | int] = {
                    "ratekit.group": group.name,
                    "ratekit.priority": priority,
                }
                yield Observation(count, attributes)

    def _dimension_gauge(self, unit: str, read: Callable[[DimensionStatistics], float]) -> Gauge:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            snapshot = self._snapshot
            if snapshot is None:
                return
            for group in snapshot.groups:
                for dimension in group.dimensions:
                    if dimension.unit != unit:
                        continue
                    attributes = {"ratekit.group": group.name, "ratekit.dimension": dimension.name}
                    if unit == "money":
                        attributes["ratekit.currency"] = snapshot.currency
                    yield Observation(read(dimension), attributes)

        return observe

    def _factors(self, options: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        if snapshot is not None:
            for group in snapshot.groups:
                yield Observation(group.factor, {"ratekit.group": group.name})

    def _tier(self, options: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        if snapshot is not None:
            yield Observation(1, {"ratekit.tier": snapshot.tier})

    def _age(self, options: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        if snapshot is not None:
            yield Observation(max(self._clock.now() - snapshot.taken.mono, 0.0))


def _call(group: str, model: str, priority: int) -> dict[str, str | int]:
    return {"ratekit.group": group, "ratekit.model": model, "ratekit.priority": priority}


def _who(who: Who) -> dict[str, str]:
    """The opt-in attributes (``ratekit.tenant``, ``ratekit.account``) of an event."""
    return {f"ratekit.{label}": value for label, value in who}
