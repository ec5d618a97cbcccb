"""Tenants: shares of one account with limits of their own, served by weighted fair share.

Pure bookkeeping with no I/O: time is handed in, as to a backend. With the memory
backend a tenant's limits are kept here, in windows of its own (the memory backend's),
checked in the same step as the account's by the limiter; with a shared backend
(`SharedTenants`: Redis) they are kept in the store, beside the account's, and only
the wake-ups of the tenant's waiting callers are kept here. Its weight orders the
callers that wait for the account (`FairShare`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import anyio

from ._errors import InvalidArgumentError
from ._limits import Limits, show
from .backends._base import TENANT_PREFIX, Demand, DimensionStatistics, Refusal, TenantShare
from .backends.memory import MemoryBackend, MemoryGrant

# Tenants kept with nothing in flight before the idle ones are looked for and dropped.
_PRUNE_AT = 1024


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant's share of an account: `limits` of its own (any rates and a
    concurrency cap; none by default) and a `weight` (> 0): while callers of several
    tenants wait for the account, each tenant is admitted in proportion to its weight,
    and a tenant with nobody waiting leaves its share to the others."""

    limits: Limits = field(default_factory=Limits)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):
            raise InvalidArgumentError(
                f"Tenant.limits must be a ratekit.Limits, got {show(self.limits)}"
            )
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or not 0 < weight <= 1e6
        ):
            raise InvalidArgumentError(
                f"Tenant.weight must be a number in (0, 1e6], got {show(weight)}"
            )

    @property
    def limited(self) -> bool:
        """Whether it has limits of its own (else only its weight counts)."""
        return bool(self.limits.all_rates) or self.limits.concurrency is not None


class _State:
    """A tenant's usage in this process: its windows and its calls in flight (with a
    shared backend, only its wake-up)."""

    __slots__ = ("backend", "in_flight", "last_s", "releases", "tenant", "wake")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.backend = MemoryBackend()
        self.in_flight = 0
        self.last_s = -math.inf
        # Set when one of its calls ends: its callers waiting on its own limits retry.
        self.wake: anyio.Event | None = None
        # Ends of its calls a shared backend told of (see `Tenants.mark`).
        self.releases = 0


Mark = tuple[_State, int]
"""A tenant's state and its count of releases at one instant (`Tenants.mark`)."""


class TenantGrant:
    """An admission's grant on the account and on its tenant's own windows."""

    __slots__ = ("account", "own", "state")

    def __init__(self, account: object, state: _State, own: MemoryGrant) -> None:
        self.account = account
        self.state = state
        self.own = own


class Tenants:
    """The tenants of one account: their limits and weights, and their usage.

    `named` gives the tenants that differ from `default`, which every other tenant
    name gets (so that a service with many customers lists only the exceptions).
    One `Tenants` is one set of usage: give the same one to every limiter of the
    account (a `Scheduler` does). With the memory backend usage is kept in this
    process, in the windows of the memory backend; the state of a tenant with nothing
    in flight whose windows have emptied is dropped. With a shared backend (Redis)
    usage is kept in the store, shared by every process of the account.
    """

    __slots__ = (
        "_longest_s",
        "_next_prune_s",
        "_prune_at",
        "_states",
        "calendar",
        "default",
        "limited",
        "named",
    )

    def __init__(self, default: Tenant | None = None, named: Mapping[str, Tenant] | None = None):
        if default is None:
            default = Tenant()
        if not isinstance(default, Tenant):
            raise InvalidArgumentError(f"Tenants.default must be a Tenant, got {show(default)}")
        named = dict(named or {})
        for name, tenant in named.items():
            check_tenant_name(name, "Tenants.named")
            if not isinstance(tenant, Tenant):
                raise InvalidArgumentError(
                    f"Tenants.named[{name!r}] must be a Tenant, got {show(tenant)}"
                )
        self.default = default
        self.named = named
        self._states: dict[str, _State] = {}
        # When the idle ones are looked for again: once as many states as were left the
        # last time are added, or a second later, so that looking costs O(1) a new tenant
        # however many are active.
        self._prune_at = _PRUNE_AT
        self._next_prune_s = -math.inf
        # Whether any tenant has limits of its own.
        self.limited = default.limited or any(t.limited for t in named.values())
        rates = [rate for t in (default, *named.values()) for rate in t.limits.all_rates]
        # Whether a tenant has a calendar-day rate (its windows need the wall clock).
        self.calendar = any(rate.calendar_tz is not None for rate in rates)
        # How long a tenant's windows can hold anything after its last admission.
        self._longest_s = max((rate.period_s for rate in rates), default=0.0) + 86_400.0 * (
            self.calendar
        )

    @classmethod
    def of(cls, value: Tenants | Mapping[str, Tenant] | None) -> Tenants | None:
        """`value` as a `Tenants`: a mapping gives the named tenants of an unlimited
        default."""
        if value is None or isinstance(value, Tenants):
            return value
        if isinstance(value, Mapping):
            return cls(named=value)
        raise InvalidArgumentError(
            f"tenants must be a ratekit.Tenants, a mapping of names to Tenant, or None, "
            f"got {show(value)}"
        )

    def tenant(self, name: str) -> Tenant:
        """The share of tenant `name`."""
        return self.named.get(name, self.default)

    def weight(self, name: str | None) -> float:
        return 1.0 if name is None else self.named.get(name, self.default).weight

    def share(self, name: str) -> TenantShare | None:
        """Tenant `name` and its own limits as a shared backend takes them (None: it has
        none, only its weight counts)."""
        tenant = self.named.get(name, self.default)
        return (name, tenant.limits) if tenant.limited else None

    def active(self) -> int:
        """Tenants whose usage is kept now."""
        return len(self._states)

    def _state(self, name: str, now: float) -> _State:
        state = self._states.get(name)
        if state is None:
            count = len(self._states)
            if count >= self._prune_at or (count >= _PRUNE_AT and now >= self._next_prune_s):
                self._prune(now)
                self._prune_at = max(_PRUNE_AT, 2 * len(self._states))
                self._next_prune_s = now + 1.0
            state = self._states[name] = _State(self.tenant(name))
        return state

    def _prune(self, now: float) -> None:
        # A new dict: one emptied in place keeps the size it had at its largest.
        longest_s = self._longest_s + 1.0
        self._states = {
            name: state
            for name, state in self._states.items()
            if state.in_flight or state.wake is not None or now - state.last_s <= longest_s
        }

    # -- the limiter's steps -------------------------------------------------------------

    def reserve_now(
        self, name: str, demand: Demand, now: float, wall: float
    ) -> tuple[_State, MemoryGrant] | Refusal:
        """Take `demand` from tenant `name`'s own windows, or say how long it waits."""
        state = self._state(name, now)
        outcome = state.backend.reserve_now(state.tenant.limits, demand, now, wall)
        if isinstance(outcome, Refusal):
            return Refusal(outcome.wait_s, TENANT_PREFIX + outcome.dimension)
        state.in_flight += 1
        state.last_s = now
        return state, outcome

    @staticmethod
    def settle_now(grant: TenantGrant, actual: Demand | None, now: float, wall: float) -> None:
        """End the tenant's part of `grant` (only the first end counts)."""
        own = grant.own
        if own.settled:
            return
        state = grant.state
        state.backend.settle_now(own, actual, now, wall)
        state.in_flight -= 1
        state.last_s = max(state.last_s, now)
        wake = state.wake
        if wake is not None:
            state.wake = None
            wake.set()

    @staticmethod
    def restamp_now(grant: TenantGrant, now: float) -> None:
        grant.state.backend.restamp_now(grant.own, now)

    def changed(self, name: str, now: float) -> anyio.Event:
        """An event set when one of tenant `name`'s calls ends."""
        state = self._state(name, now)
        if state.wake is None:
            state.wake = anyio.Event()
        return state.wake

    def wake(self, name: str) -> None:
        """One of tenant `name`'s calls ended (a shared backend says so, for any process):
        its callers waiting on its own limits retry."""
        state = self._states.get(name)
        if state is None:
            return
        state.releases += 1
        wake = state.wake
        if wake is not None:
            state.wake = None
            wake.set()

    def mark(self, name: str, now: float) -> Mark:
        """Where tenant `name`'s releases stand now, taken before asking a shared backend,
        so that one told of while its answer was on the way is not missed (`released`)."""
        state = self._state(name, now)
        return state, state.releases

    def released(self, name: str, mark: Mark) -> bool:
        """Whether a call of tenant `name` may have ended since `mark` was taken."""
        state, releases = mark
        return self._states.get(name) is not state or state.releases != releases

    def statistics_now(
        self, name: str, now: float, wall: float = math.nan
    ) -> tuple[DimensionStatistics, ...]:
        """Usage of tenant `name`'s own dimensions now (nothing used when it is idle)."""
        state = self._states.get(name)
        if state is None:
            state = _State(self.tenant(name))
        return state.backend.statistics_now(state.tenant.limits, now, wall)


def check_tenant_name(name: object, where: str) -> str:
    """A tenant's name: a non-empty str of at most 256 characters."""
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidArgumentError(
            f"{where}: a tenant is named by a non-empty str of at most 256 characters, "
            f"got {show(name)}"
        )
    return name


class FairShare:
    """Start-time fair queueing over tenants, for one queue of callers.

    Each waiting caller gets a tag: its tenant's last tag plus ``1 / weight``, and
    never less than the tag of the caller admitted last (the virtual time), so a
    tenant that had nobody waiting starts level with the others instead of with
    credit saved up. Callers are served in order of tags: under contention tenant
    shares of admissions follow their weights. Once nobody waits (the end of a busy
    period) the virtual time moves up to the latest tag handed out: every tenant
    starts level again, and the tags kept so far can go.
    """

    __slots__ = ("_finish", "_latest", "_prune_at", "virtual")

    def __init__(self) -> None:
        self.virtual = 0.0
        # Per tenant (None: callers without one), the tag its next caller starts from.
        self._finish: dict[str | None, float] = {}
        # The largest of those tags handed out so far.
        self._latest = 0.0
        # How many tags are kept before those at or below the virtual time are dropped:
        # twice what was left the last time, so that dropping costs O(1) a tag.
        self._prune_at = _PRUNE_AT

    def tag(self, tenant: str | None, weight: float) -> float:
        """The tag of a caller of `tenant` that starts waiting now."""
        finish = self._finish
        start = max(self.virtual, finish.get(tenant, 0.0))
        end = finish[tenant] = start + 1.0 / weight
        if end > self._latest:
            self._latest = end
        if len(finish) > self._prune_at:
            virtual = self.virtual
            self._finish = {key: value for key, value in finish.items() if value > virtual}
            self._prune_at = max(_PRUNE_AT, 2 * len(self._finish))
        return start

    def served(self, tag: float, *, idle: bool = False) -> None:
        """A caller with `tag` was admitted: virtual time moves up to it, and, when nobody
        waits any more (`idle`), up to the latest tag handed out."""
        if tag > self.virtual:
            self.virtual = tag
        if idle and self._latest > self.virtual:
            self.virtual = self._latest


_CURRENT: ContextVar[str | None] = ContextVar("ratekit_tenant", default=None)


@contextmanager
def tenant(name: str) -> Iterator[str]:
    """Admit the calls made in this block (and in tasks started from it) as tenant `name`,
    through any path: a wrapped client, a transport, a decorator, ``submit``::

        with ratekit.tenant("acme"):
            await client.chat.completions.create(...)

    A ``tenant=`` given to a call itself wins.
    """
    token = _CURRENT.set(check_tenant_name(name, "ratekit.tenant"))
    try:
        yield name
    finally:
        _CURRENT.reset(token)


def current_tenant() -> str | None:
    """The tenant of the innermost `tenant` block around the caller (None: none)."""
    return _CURRENT.get()
