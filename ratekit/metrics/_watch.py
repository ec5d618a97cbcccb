"""What both metric adapters share: the scheduler watched, bounded labels, and the
snapshot that gauges read.

Two kinds of numbers, two ways of keeping them fresh:

- Counters and the wait histogram change in the scheduler's hook, on its event loop,
  as each event happens: they are exact at every scrape.
- Gauges (callers waiting, used / limit / headroom / in flight per dimension, the
  adapted factor, the tier) come from a `Snapshot`. The scheduler's statistics are
  async (a Redis backend is a round trip away) while a Prometheus scrape or an
  OpenTelemetry collection is a synchronous call, often from another thread, so the
  adapters only ever read the last snapshot taken. `Watcher.refresh` takes one;
  ``async with watcher:`` takes one on entry and then every `interval_s`, so a gauge
  is at most `interval_s` (plus one refresh's round trips) old. A refresh that fails
  (Redis down) keeps the last snapshot, whose timestamp is exported too.

Labels are bounded: a group is the account's limiter or a model with limits of its own
(the profile's); a model is the profile's name for it, the name as given for models the
profile does not list (up to `MAX_MODEL_LABELS` of them, then ``"other"``), or ``""``
for a call made without a model; a dimension is one of the limits' names; a priority
is one the application used. Two labels are opt-in: ``tenant`` (``tenant_labels=True``,
on the queued, admitted, wait and settled metrics) and ``account`` (``account_labels=True``,
on the admitted, wait and settled metrics: the pool's account that served the call).
Each is the name as given, up to `MAX_TENANT_LABELS` (`MAX_ACCOUNT_LABELS`) names, then
``"other"``, or ``""`` for a call without one.
"""

from __future__ import annotations

import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import anyio
from anyio.abc import TaskStatus

from .._account import ACCOUNT_GROUP
from .._clock import Clock, Instant, SystemClock
from .._errors import InvalidArgumentError
from .._events import (
    Admitted,
    Cooldown,
    Event,
    LimitsAdapted,
    Queued,
    RateLimited,
    Settled,
    TierChanged,
)
from .._limits import check_number, show
from .._scheduler import Scheduler
from ..backends import DimensionStatistics

_log = logging.getLogger("ratekit")

# The label of a call made without a model (Prometheus reads an empty value as no label).
NO_MODEL: Final = ""
# The label of every model beyond the first MAX_MODEL_LABELS the profile does not list.
OTHER_MODEL: Final = "other"
MAX_MODEL_LABELS: Final = 100
# The label of a call without a tenant (or not served by a pool's account), and of every
# tenant (account) beyond the first MAX_TENANT_LABELS (MAX_ACCOUNT_LABELS) seen.
NO_NAME: Final = ""
OTHER_NAME: Final = "other"
MAX_TENANT_LABELS: Final = 100
MAX_ACCOUNT_LABELS: Final = 100
# Bucket bounds of the admission wait histogram, in seconds: most admissions wait
# nothing, a rate-limited one up to a window (a minute), a daily limit hours.
WAIT_BUCKETS_S: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    3600.0,
)
# How often `async with` refreshes the gauges unless told otherwise, and the bounds.
DEFAULT_INTERVAL_S: Final = 1.0
_MIN_INTERVAL_S: Final = 0.01
_MAX_INTERVAL_S: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """One limiter group at the snapshot's instant.

    `factor` is the adapted share of the tier's limits in force (1: all of them).
    `waiting` is (priority, callers waiting) for every priority seen so far in this
    group, zeros included, so that a drained queue reads 0 rather than vanishing.
    """

    name: str
    factor: float
    waiting: tuple[tuple[int, int], ...]
    dimensions: tuple[DimensionStatistics, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the gauges show: the scheduler's statistics as of `taken`."""

    taken: Instant
    tier: str
    currency: str
    groups: tuple[GroupSnapshot, ...]


# (label, value) of the opt-in labels of one event: tenant, account (see `Watcher._who`).
Who = tuple[tuple[str, str], ...]


def headroom(dimension: DimensionStatistics) -> float:
    """What a dimension still admits now: its limit less what is used, never below 0."""
    return max(dimension.limit - dimension.used, 0.0)


# The gauges of each dimension, in both adapters: (name of the measure, what it is, how
# it is read).
MEASURES: Final[tuple[tuple[str, str, Callable[[DimensionStatistics], float]], ...]] = (
    ("limit", "The limit in force", lambda d: d.limit),
    ("used", "What counts against the limit now", lambda d: d.used),
    ("headroom", "What the limit still admits now (limit less used, at least 0)", headroom),
    ("in_flight", "The part of used held by calls not yet settled", lambda d: d.in_flight),
)


class Watcher(ABC):
    """A scheduler hook that counts events, and the keeper of the gauges' snapshot.

    The base of `RatekitCollector` and `RatekitMetrics`; a subclass records each
    event in its metric library (`_queued`, `_admitted`, ...) and reads `_snapshot`
    for its gauges. One watcher serves one scheduler: the hook and the refreshes run
    on that scheduler's event loop; the snapshot, replaced whole by each refresh, may
    be read from any thread.
    """

    def __init__(
        self,
        scheduler: Scheduler | None,
        *,
        interval_s: float,
        clock: Clock | None,
        tenant_labels: bool = False,
        account_labels: bool = False,
    ) -> None:
        name = type(self).__name__
        for option, value in (("tenant_labels", tenant_labels), ("account_labels", account_labels)):
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"{name}.{option} must be a bool, got {show(value)}")
        # Whether calls are labelled by tenant, and by the pool's account that served them.
        self._tenant_labels = tenant_labels
        self._account_labels = account_labels
        # The tenants and accounts labelled by name so far (bounded, see `_named`).
        self._tenants: set[str] = set()
        self._accounts: set[str] = set()
        self._interval_s = check_number(
            f"{name}.interval_s",
            interval_s,
            positive=True,
            low=_MIN_INTERVAL_S,
            high=_MAX_INTERVAL_S,
            type_error=InvalidArgumentError,
        )
        # Where refreshes read the time and wait; the scheduler's own clock in tests.
        self._clock: Clock = clock or SystemClock()
        # The scheduler whose statistics the gauges show; None until `watch`.
        self._scheduler: Scheduler | None = None
        # The profile's model names by their casefold, and the currency of its costs.
        self._profile_models: dict[str, str] = {}
        self._currency = ""
        # A model as given to the scheduler -> (its group, its label); bounded, see `_call`.
        self._labels: dict[str | None, tuple[str, str]] = {}
        # Models labelled by the name given (the profile does not list them).
        self._unlisted = 0
        # The priorities seen per group, for the waiting gauge's zeros.
        self._priorities: dict[str, set[int]] = {}
        # Admitted events seen, to tell a watcher the scheduler never calls.
        self._admitted_events = 0
        # The last snapshot taken (None before the first refresh), and its number:
        # of two refreshes in flight, the later one started wins.
        self._snapshot: Snapshot | None = None
        self._shown = 0
        self._refreshes = itertools.count(1)
        # The refresh task's task group while ``async with`` runs.
        self._running: AsyncExitStack | None = None
        # Warnings already logged (each once) and whether the last refresh failed.
        self._warned: set[str] = set()
        self._failing = False
        if scheduler is not None:
            self._bind(scheduler, f"{name}(scheduler)")

    # -- the scheduler --------------------------------------------------------------

    def watch(self, scheduler: Scheduler) -> None:
        """Show `scheduler`'s statistics in the gauges and label its events.

        Its events reach this object too (it is added as one of the scheduler's
        hooks). Watching the same scheduler again does nothing; one watcher serves
        one scheduler.
        """
        self._bind(scheduler, f"{type(self).__name__}.watch(scheduler)")

    def _bind(self, scheduler: object, where: str) -> None:
        if not isinstance(scheduler, Scheduler):
            raise InvalidArgumentError(
                f"{where} must be a ratekit.Scheduler, got {show(scheduler)}"
            )
        if self._scheduler is scheduler:
            return
        if self._scheduler is not None:
            raise InvalidArgumentError(
                f"{where}: this {type(self).__name__} already watches {self._scheduler!r}; "
                "make one per scheduler"
            )
        profile = scheduler.account.profile
        self._profile_models = {model.name.casefold(): model.name for model in profile.models}
        self._currency = profile.currency
        self._scheduler = scheduler
        scheduler.add_hook(self)  # a hook already (hooks=[...]) is not added twice

    def _require(self, what: str) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError(
                f"{type(self).__name__}.{what}: no scheduler to read; call watch(scheduler) first"
            )
        return self._scheduler

    def _call(self, scheduler: Scheduler, model: str | None) -> tuple[str, str]:
        """The group and the model label of a call of `model`."""
        known = self._labels.get(model)
        if known is not None:
            return known
        group = scheduler.account.group(model)
        if model is None:
            label = NO_MODEL
        elif (listed := self._profile_models.get(model.casefold())) is not None:
            label = listed
        elif self._unlisted < MAX_MODEL_LABELS:
            self._unlisted += 1
            label = model
        else:
            self._warn_once(
                "models",
                "ratekit: %s labels models beyond the first %d the profile does not list as %r",
                type(self).__name__,
                MAX_MODEL_LABELS,
                OTHER_MODEL,
            )
            return group, OTHER_MODEL  # not kept: the names beyond the bound are unbounded
        self._labels[model] = group, label
        return group, label

    def _named(self, kind: str, name: str | None, seen: set[str], bound: int) -> str:
        """The label of `name`, a tenant or an account (`kind`, plural): ``""`` for none,
        the name as given for the first `bound` names, then ``"other"`` (said once)."""
        if name is None:
            return NO_NAME
        if name in seen:
            return name
        if len(seen) < bound:
            seen.add(name)
            return name
        self._warn_once(
            kind,
            "ratekit: %s labels %s beyond the first %d as %r",
            type(self).__name__,
            kind,
            bound,
            OTHER_NAME,
        )
        return OTHER_NAME

    def _who_labels(self, accounted: bool) -> tuple[str, ...]:
        """The names of the opt-in labels of a metric: ``tenant`` when `tenant_labels`,
        then ``account`` when `account_labels` and the metric is `accounted` (counts
        admitted or settled calls, whose events name the account)."""
        names: tuple[str, ...] = ()
        if self._tenant_labels:
            names += ("tenant",)
        if accounted and self._account_labels:
            names += ("account",)
        return names

    def _who(
        self, tenant: str | None, account: str | None = None, *, accounted: bool = False
    ) -> Who:
        """(label, value) of the opt-in labels of an event, in `_who_labels` order."""
        who: list[tuple[str, str]] = []
        if self._tenant_labels:
            tenant_label = self._named("tenants", tenant, self._tenants, MAX_TENANT_LABELS)
            who.append(("tenant", tenant_label))
        if accounted and self._account_labels:
            account_label = self._named("accounts", account, self._accounts, MAX_ACCOUNT_LABELS)
            who.append(("account", account_label))
        return tuple(who)

    # -- events -----------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """Count `event`: the scheduler's hook (``Scheduler(account, hooks=[this])``)."""
        if isinstance(event, Admitted):
            self._admitted_events += 1
        scheduler = self._scheduler
        if scheduler is None:
            self._warn_once(
                "unwatched",
                "ratekit: %s got %r before watch(scheduler); events are not counted until then",
                type(self).__name__,
                event,
            )
            return
        if isinstance(event, Queued):
            group, model = self._call(scheduler, event.model)
            self._priorities.setdefault(group, set()).add(event.priority)
            self._queued(group, model, event.priority, self._who(event.tenant))
        elif isinstance(event, Admitted):
            group, model = self._call(scheduler, event.model)
            who = self._who(event.tenant, event.account, accounted=True)
            self._admitted(group, model, event.priority, event.waited_s, who)
        elif isinstance(event, Settled):
            group, model = self._call(scheduler, event.model)
            who = self._who(event.tenant, event.account, accounted=True)
            self._settled(group, model, event.tokens, event.cost, self._currency, who)
        elif isinstance(event, RateLimited):
            self._rate_limited(*self._call(scheduler, event.model))
        elif isinstance(event, Cooldown):
            self._cooldown(event.group)
        elif isinstance(event, LimitsAdapted):
            self._adapted(event.group)
        elif isinstance(event, TierChanged):
            self._tier_changed()

    # `who` is (label, value) of the opt-in labels (`_who_labels`): tenant, account.

    @abstractmethod
    def _queued(self, group: str, model: str, priority: int, who: Who) -> None:
        """A call asked for an admission."""

    @abstractmethod
    def _admitted(self, group: str, model: str, priority: int, waited_s: float, who: Who) -> None:
        """A call was admitted after waiting `waited_s` seconds."""

    @abstractmethod
    def _settled(
        self, group: str, model: str, tokens: float, cost: float, currency: str, who: Who
    ) -> None:
        """A call ended with `tokens` and `cost` (in `currency`) counted."""

    @abstractmethod
    def _rate_limited(self, group: str, model: str) -> None:
        """The provider refused an admitted call (a 429)."""

    @abstractmethod
    def _cooldown(self, group: str) -> None:
        """A group was paused after a 429."""

    @abstractmethod
    def _adapted(self, group: str) -> None:
        """A group's limits in force changed (429s, a clean period, the provider's headers)."""

    @abstractmethod
    def _tier_changed(self) -> None:
        """The account moved to another tier."""

    # -- the snapshot -----------------------------------------------------------------

    async def refresh(self) -> None:
        """Take a new snapshot of the scheduler's statistics for the gauges.

        Call it on the scheduler's event loop (``async with`` calls it every
        `interval_s`). Raises what the statistics raise (a Redis backend that is
        down), keeping the last snapshot.
        """
        scheduler = self._require("refresh")
        number = next(self._refreshes)
        taken = Instant(self._clock.now(), self._clock.wall())
        scheduler.limiter()  # the account's limits are shown from the start, before any call
        statistics = await scheduler.statistics()
        groups = []
        for name, factor in statistics.factors.items():
            limiter = scheduler.limiter(None if name == ACCOUNT_GROUP else name)
            limiter_statistics = await limiter.statistics()
            by_priority = limiter_statistics.waiting_by_priority
            seen = self._priorities.setdefault(name, set())
            seen.update(by_priority)
            waiting = tuple((priority, by_priority.get(priority, 0)) for priority in sorted(seen))
            groups.append(GroupSnapshot(name, factor, waiting, limiter_statistics.dimensions))
        if statistics.admitted > self._admitted_events:
            self._warn_once(
                "unhooked",
                "ratekit: %s saw %d of the scheduler's %d admissions: those made before "
                "it watched the scheduler are not counted",
                type(self).__name__,
                self._admitted_events,
                statistics.admitted,
            )
        if number > self._shown:
            self._shown = number
            self._snapshot = Snapshot(taken, statistics.tier, self._currency, tuple(groups))

    async def __aenter__(self) -> Self:
        """Refresh now, then every `interval_s` in a task of its own until the block ends."""
        self._require("__aenter__")
        if self._running is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already refreshing in an 'async with' block; "
                "enter it once"
            )
        stack = AsyncExitStack()
        try:
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)  # runs first on exit: stops the task
            await group.start(self._refresh_every)
        except BaseException:
            await stack.aclose()
            raise
        self._running = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._running = self._running, None
        if stack is not None:
            await stack.aclose()

    async def _refresh_every(self, *, task_status: TaskStatus[None]) -> None:
        await self._try_refresh()
        task_status.started()
        never = anyio.Event()
        while True:
            await self._clock.wait(never, self._interval_s)
            await self._try_refresh()

    async def _try_refresh(self) -> None:
        # A refresh that fails keeps the last snapshot: said once when it starts failing
        # (with the error) and once when it works again, not at every interval.
        try:
            await self.refresh()
        except Exception:
            level = logging.DEBUG if self._failing else logging.WARNING
            _log.log(
                level,
                "ratekit: %s could not refresh its statistics; the gauges keep the last snapshot",
                type(self).__name__,
                exc_info=True,
            )
            self._failing = True
            return
        if self._failing:
            self._failing = False
            _log.info("ratekit: %s refreshes its statistics again", type(self).__name__)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message, *args)
