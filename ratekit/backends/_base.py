"""The contract between a limiter and the store that keeps an account's usage."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MethodType
from typing import Any, NamedTuple, Protocol, runtime_checkable

import anyio

from .._clock import Instant
from .._limits import Limits, Rate, TokenCounting

# How an admission takes its amount from one window, so that settle and refund undo
# it right. The Lua scripts use the same numbers.
RECORDED = 0  # counted in a slice at admission (requests; tokens under "reserve")
HELD_USAGE = 1  # held until settle, then the real usage is recorded ("usage"; money)
HELD_SAFE = 2  # held until settle, then max(reserved, real) until the admission's slice ends


def takes_no_slot(limits: Limits) -> bool:
    """Whether an admission under `limits` goes without a slot (a Redis lease): no
    concurrency cap, and only requests counted at admission, so that nothing is held
    and its end has nothing to change. Such an admission does not count against a cap
    that comes in force while it is in flight, on any backend."""
    return limits.concurrency is None and all(
        rate.unit == "requests" and take_kind(rate, limits.token_counting) == RECORDED
        for rate in limits.all_rates
    )


def take_kind(rate: Rate, counting: TokenCounting) -> int:
    """How an admission takes `rate`'s amount under the provider's token `counting`."""
    if rate.unit == "requests":
        return RECORDED
    if rate.unit == "money":
        return HELD_USAGE
    if counting is TokenCounting.RESERVE:
        return RECORDED
    if counting is TokenCounting.USAGE:
        return HELD_USAGE
    return HELD_SAFE


# Where each unit's amount sits in a (requests, tokens, cost) demand.
UNIT_POSITION = {"requests": 0, "tokens": 1, "money": 2}

# A refusal by a tenant's own limits names its dimension after this prefix.
TENANT_PREFIX = "tenant "


class Demand(NamedTuple):
    """What one call asks for (or really used): validated, non-negative amounts.

    A tuple, so that the hot path can index it by `UNIT_POSITION`. `counted`, in a
    call's real usage only, is the tokens the provider counted against its rates at
    the call's arrival when its answer told (its own prompt count plus the request's
    output cap): it replaces ratekit's estimate where a token counting keeps the
    reservation (``reserve``, and ``safe`` until the admission's slice ends). NaN:
    not known.
    """

    requests: float = 1
    tokens: float = 0
    cost: float = 0
    counted: float = math.nan

    def of_unit(self, unit: str) -> float:
        """The amount in `unit` ("requests", "tokens" or "money")."""
        if unit == "requests":
            return self.requests
        if unit == "tokens":
            return self.tokens
        return self.cost


# The dimension a refusal names while the account is taken out (see `Backend.pause`).
OUT = "out"
# The dimension a refusal names while a shared backend cannot be reached and its
# policy keeps callers waiting for it (its wait is when to ask again, not a forecast).
UNAVAILABLE = "unavailable"


def is_forecast(wait_s: float, dimension: str) -> bool:
    """Whether a refusal's wait (`wait_s`, refused on `dimension`) says when the demand
    fits (a rate's window, a cooldown), so that a caller whose deadline comes first may
    give up at once. A slot is freed by a release, which may come any time: a shared
    backend's wait for one (bounded by its oldest lease, in case the holder died) is
    no forecast, nor is an outage's. A tenant's own dimension ("tenant concurrency")
    and a pool's ("<account>: concurrency") end the same way."""
    return not math.isinf(wait_s) and not dimension.endswith(("concurrency", UNAVAILABLE))


@dataclass(frozen=True, slots=True)
class Refusal:
    """The backend did not admit; nothing was taken.

    `wait_s` is the earliest time from the refusal at which the same demand could
    fit (`inf` when only a release or a settle can make room). `dimension` names
    the rate or "concurrency" that binds longest, "cooldown" or "out" (`OUT`)
    during a pause, or "unavailable" (`UNAVAILABLE`) while a shared backend cannot
    be reached.
    """

    wait_s: float
    dimension: str


@dataclass(frozen=True, slots=True)
class DimensionStatistics:
    """One dimension of an account at one instant.

    `used` is what counts against `limit` now (for a rate: its live slices and
    holds; for concurrency: the calls in flight). `in_flight` is the part held by
    calls not yet settled.
    """

    name: str
    unit: str
    limit: float
    used: float
    in_flight: float


Grant = object
"""A backend's record of one admitted demand; opaque to the limiter."""


@runtime_checkable
class Backend(Protocol):
    """Keeps an account's usage and admits demands atomically.

    Time is handed in: `now` is the limiter's reading of its clock (monotonic
    seconds for rolling windows and pacing, wall seconds for calendar days). A
    backend whose store has a clock of its own shared by every process (Redis's
    ``TIME``) uses that one instead, and says so in its docstring; wait hints
    are durations either way. A backend that reads `now` itself sets
    ``waits_from_instant = True``: its refusals' waits then run from that instant,
    not from their reply (a fake clock may move while a reply is on its way).

    Every method takes the limits in force; a backend keeps a rate's usage across
    a change of limits (a tier upgrade) as long as its unit, period, calendar time
    zone and slice count stay. Changing one of those starts a new, empty window.
    Methods are safe to call from many tasks of the event loop the backend is
    used in.
    """

    async def reserve(self, limits: Limits, demand: Demand, now: Instant) -> Grant | Refusal:
        """Admit `demand` on every dimension at once, or on none and say how long to wait.

        Cancelling the call never leaves a grant behind: a grant that arrives
        after the caller left is handed back by the backend itself.
        """
        ...

    async def reserve_many(
        self, limits: Limits, demands: Sequence[Demand], now: Instant
    ) -> tuple[list[Grant], Refusal | None]:
        """Admit `demands` in order, as `reserve` each, until one does not fit: the grants
        of those admitted and the refusal of the first that was not (None: all were).
        Nothing comes between them: a queue served this way keeps its order.
        """
        ...

    async def settle(
        self, limits: Limits, grant: Grant, actual: Demand | None, now: Instant
    ) -> None:
        """Record the real usage of an admitted call and free its concurrency slot.

        `actual` is `None` for a call that never reached the provider: everything
        the grant took is handed back. Only the first settle of a grant counts.
        """
        ...

    async def restamp(self, limits: Limits, grant: Grant, now: Instant) -> None:
        """The request of `grant` left the process at `now`: what the admission recorded
        counts from now on, as the provider counts it from its arrival (held amounts
        are untouched: they count until the settle). Best effort: a backend that
        cannot reach its store leaves the admission as it was."""
        ...

    def abandon(self, limits: Limits, grant: Grant, actual: Demand | None, now: Instant) -> None:
        """Settle a grant whose holder dropped it, without awaiting.

        Called by the limiter on the loop that owns the grant (never from a
        finalizer): the memory backend settles at once, a shared one stops
        renewing the grant's lease and settles it in the background.
        """
        ...

    async def statistics(self, limits: Limits, now: Instant) -> tuple[DimensionStatistics, ...]:
        """Usage of every dimension of `limits` now."""
        ...

    async def pause(self, seconds: float, now: Instant, *, out: bool = False) -> float:
        """Refuse every admission for `seconds` from now (a provider's cooldown after a 429).

        A longer pause already in force stands. Returns the seconds the pause lasts
        from now. Refusals during it name the dimension "cooldown", or "out" when the
        pause that ends last was made with `out` (the account's quota or balance is
        spent: a pool takes it out, and every process sharing the backend sees why).
        """
        ...

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` whenever capacity may have been freed; returns an unsubscribe."""
        ...

    async def aclose(self) -> None:
        """Stop background work and close connections the backend opened itself."""
        ...


@runtime_checkable
class InProcess(Protocol):
    """What a backend with no I/O adds: the same operations, synchronous, at an explicit
    instant. The limiter admits and ends through them without suspending the task, so
    no cancellation can come between a grant and its holder, or an end and its slot."""

    def reserve_now(
        self, limits: Limits, demand: Demand, now: float, wall: float = ...
    ) -> Grant | Refusal:
        """`reserve` at monotonic `now` (and Unix `wall`, read for calendar days only)."""
        ...

    def settle_now(self, grant: Any, actual: Demand | None, now: float, wall: float = ...) -> None:
        """`settle` at an explicit instant."""
        ...

    def restamp_now(self, grant: Any, now: float) -> None:
        """`restamp` at monotonic `now`."""
        ...


@runtime_checkable
class SettlesHere(Protocol):
    """What a shared backend adds when some of its grants end without waiting for the
    store: with no I/O (nothing of theirs changes at the end), or with a write the
    backend sends in the background, in order with what this process sends next. The
    limiter ends those at once, with `abandon`, which then does exactly what `settle`
    would, without suspending: no cancellation can come between the end and the
    slot's return, as in process."""

    def settles_here(self, grant: Any, actual: Demand | None) -> bool:
        """Whether ending `grant` with `actual` (None: a refund) waits for nothing."""
        ...


@runtime_checkable
class SharedAccount(Protocol):
    """What a backend shared by several processes adds: the account's tier, agreed by
    every pod, and child namespaces for limits of their own (a model's)."""

    def child(self, name: str) -> Backend:
        """A backend for limits of their own within this account (closed with it)."""
        ...

    async def publish_tier(self, tier: str) -> None:
        """Tell every pod of the account that it is now on `tier`."""
        ...

    async def shared_tier(self) -> str | None:
        """The tier the pods last agreed on, if any; `BackendUnavailableError` when the
        store is down."""
        ...

    def on_tier(self, callback: Callable[[str], None]) -> None:
        """Call `callback(tier)` when another pod publishes a tier change."""
        ...

    def share_estimates(
        self, factors: Mapping[str, float], on_fleet: Callable[[dict[str, float]], None]
    ) -> None:
        """Send this pod's learned token-estimate factors (by model) in the background;
        `on_fleet` gets the largest fresh factor of each model over the pods. Best
        effort: while the store is down nothing is sent and the pod's own stand."""
        ...


TenantShare = tuple[str, Limits]
"""A tenant's name and its own limits, as a limiter hands them to a backend that keeps
tenants' usage (`SharedTenants`)."""


@runtime_checkable
class SharedTenants(Protocol):
    """What a shared backend adds for tenants with limits of their own: their usage kept
    in the store, checked and taken in the same atomic step as the account's, so that
    every pod of the account sees one tenant's calls as one.

    Grants it returns are ended, restamped and abandoned through the `Backend` methods,
    which end the tenant's part with the account's.
    """

    def check_tenant_limits(self) -> None:
        """Raise `InvalidArgumentError` when this backend cannot keep tenant limits in
        the same atomic step as its account's."""
        ...

    async def reserve_tenants(
        self,
        limits: Limits,
        demands: Sequence[Demand],
        now: Instant,
        tenants: Sequence[TenantShare | None],
    ) -> tuple[list[Grant], Refusal | None]:
        """`reserve_many`, each demand also on the own limits of its tenant (None: none).

        A demand its tenant's limits refuse is refused by them (checked first), its
        dimension named after `TENANT_PREFIX`.
        """
        ...

    async def tenant_statistics(
        self, limits: Limits, tenant: TenantShare, now: Instant
    ) -> tuple[DimensionStatistics, ...]:
        """Usage of the tenant's own dimensions now (concurrency first when capped)."""
        ...

    def subscribe_tenants(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(tenant)` whenever one of `tenant`'s calls ended, in any process;
        returns an unsubscribe."""
        ...


class Relay:
    """What a backend's notices reach of one limiter: its count of releases, the event
    its head of queue waits on and its tenants' wake-up, not the limiter itself.

    The backend's listeners hold the relay's methods weakly and only the limiter holds
    the relay, so a dropped limiter takes its relay with it at once (no cycle to wait
    for the collector) and is told nothing more; a limiter compiled with mypyc, which
    cannot be referenced weakly, the same.
    """

    __slots__ = ("__weakref__", "_tenant_release", "changes", "wake")

    def __init__(self, tenant_release: Callable[[str], None] | None = None) -> None:
        # Releases told of so far: a try whose refusal comes back after one is stale.
        self.changes = 0
        # Set when capacity may have been freed; the head of the queue waits on it.
        self.wake: anyio.Event | None = None
        self._tenant_release = tenant_release

    def release(self) -> None:
        """Capacity may have been freed (`Backend.subscribe`)."""
        self.changes += 1
        self.changed()

    def changed(self) -> None:
        """Wake the head of the queue, if it waits."""
        if self.wake is not None:
            self.wake.set()

    def tenant_release(self, tenant: str) -> None:
        """A call of `tenant` ended (`SharedTenants.subscribe_tenants`)."""
        if self._tenant_release is not None:
            self._tenant_release(tenant)


class Listeners(list[Callable[[], Callable[..., None] | None]]):
    """Callbacks told when capacity may have been freed (with what `notify` is given).

    A bound method is held weakly, so a limiter that is dropped stops being called
    without unsubscribing; other callables are held as given. A list, so that
    "anyone listening?" is a plain truth test on the hot path.
    """

    __slots__ = ("__weakref__",)

    def add(self, listener: Callable[..., None]) -> Callable[[], None]:
        """Register `listener`; returns the function that unregisters it."""
        if isinstance(listener, MethodType):
            entry: Callable[[], Callable[..., None] | None] = weakref.WeakMethod(listener)
        else:
            entry = lambda: listener  # noqa: E731 - same shape as a WeakMethod
        self.append(entry)
        return lambda: self.remove(entry) if entry in self else None

    def notify(self, *args: Any) -> None:
        """Call every live listener with `args`; forget the dead ones."""
        dead = False
        for entry in list(self):
            listener = entry()
            if listener is None:
                dead = True
            else:
                listener(*args)
        if dead:
            self[:] = [entry for entry in self if entry() is not None]
