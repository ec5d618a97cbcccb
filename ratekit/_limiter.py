"""The limiter: admissions for calls, granted on every dimension at once, or waited for."""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import anyio
import anyio.lowlevel
import sniffio

from ._admission import Admission, check_priority, check_timeout
from ._clock import EXPIRED, Clock, Instant, SystemClock, within
from ._errors import (
    NO_REPLY,
    AcquireTimeout,
    BackendUnavailableError,
    CostExceedsLimitError,
    InvalidArgumentError,
    WrongEventLoopError,
)
from ._limits import MAX_AMOUNT, Amount, Limits, Priority, check_amount
from ._queue import Waiter, WaitQueue
from ._tenants import (
    FairShare,
    Mark,
    Tenant,
    TenantGrant,
    Tenants,
    check_tenant_name,
)
from .backends._base import (
    TENANT_PREFIX,
    UNAVAILABLE,
    Backend,
    Demand,
    DimensionStatistics,
    Grant,
    InProcess,
    Refusal,
    Relay,
    SettlesHere,
    SharedTenants,
    is_forecast,
)
from .backends.memory import MemoryBackend

_log = logging.getLogger("ratekit")

# The calling thread's id (a C function, ~35 ns; asyncio's running-loop lookup costs
# ~200 ns in a running loop): the uncontended path's check that it runs where its
# limiter's loop runs.
_thread_id = _thread.get_ident
_T = TypeVar("_T")
# The least time a caller with a timeout gives one round trip to a shared backend (s).
_REPLY_GRACE_S = 0.5
# Seconds every concurrency slot may stay taken while callers wait before a warning.
_STALL_WARN_S = 60.0
# Callers admitted in one backend call at most: the head and those behind it.
_BATCH = 32
# Validated demands a limiter keeps for reuse, at most.
_DEMANDS_KEPT = 1024
# A demand's `counted` field: not known (one NaN object, so that equal demands compare equal).
_NOT_COUNTED = Demand().counted
# No demand yet: no amounts equal its own (NaN equals nothing).
_NO_DEMAND: Final = Demand(math.nan, math.nan, math.nan)


def _ceilings(limits: Limits) -> tuple[float, float, float]:
    # The most of each unit one call may ask for: its smallest rate, and never beyond
    # MAX_AMOUNT (larger amounts take the slow path, which names them).
    smallest = {"requests": MAX_AMOUNT, "tokens": MAX_AMOUNT, "money": MAX_AMOUNT}
    for rate in limits.all_rates:
        smallest[rate.unit] = min(smallest[rate.unit], rate.limit)
    return smallest["requests"], smallest["tokens"], smallest["money"]


def _has_calendar(limits: Limits) -> bool:
    return any(rate.calendar_tz is not None for rate in limits.all_rates)


class _HeldBack(Exception):
    """The head of the queue was refused by its tenant's own limits: it leaves the queue.
    `seen` is where its tenant's releases stood before it asked (see `Tenants.mark`)."""

    def __init__(self, refusal: Refusal, seen: Mark | None) -> None:
        super().__init__(refusal)
        self.refusal = refusal
        self.seen = seen


class _Loop:
    """The event loop a limiter belongs to: who it is, and how to run a callback on it
    from anywhere (a finalizer included)."""

    __slots__ = ("identity", "run_soon")

    def __init__(self, identity: object, run_soon: Callable[[Callable[[], None]], Any]) -> None:
        self.identity = identity
        self.run_soon = run_soon

    @staticmethod
    def current() -> _Loop:
        if sniffio.current_async_library() == "trio":
            import trio

            token = trio.lowlevel.current_trio_token()
            return _Loop(token, token.run_sync_soon)
        loop = asyncio.get_running_loop()
        return _Loop(loop, loop.call_soon_threadsafe)

    def is_current(self) -> bool:
        identity = self.identity
        if isinstance(identity, asyncio.AbstractEventLoop):
            try:
                return asyncio.get_running_loop() is identity
            except RuntimeError:
                return False
        return _Loop.current().identity is identity

    def is_closed(self) -> bool:
        """Whether the loop has ended: an asyncio loop closed, a trio run finished."""
        identity = self.identity
        if isinstance(identity, asyncio.AbstractEventLoop):
            return identity.is_closed()
        import trio

        try:
            identity.run_sync_soon(_nothing)  # type: ignore[attr-defined]
        except trio.RunFinishedError:
            return True
        return False


def _nothing() -> None:
    return None


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a limiter: its dimensions and how many callers wait.

    `dimensions` lists concurrency first (when capped), then every rate;
    `waiting_by_priority` splits `waiting` by priority.
    """

    dimensions: tuple[DimensionStatistics, ...]
    waiting: int
    waiting_by_priority: dict[int, int] = field(default_factory=dict)

    def dimension(self, name: str) -> DimensionStatistics:
        """The statistics of the dimension called `name` ("concurrency", "rpm", ...)."""
        for dimension in self.dimensions:
            if dimension.name == name:
                return dimension
        known = ", ".join(d.name for d in self.dimensions)
        raise KeyError(f"no dimension {name!r}; known: {known}")


class Limiter:
    """Admits calls within `limits`: every rate and the concurrency cap at once.

    Use `acquire` around a call (``async with limiter.acquire(tokens=n) as admission``):
    it waits until every dimension admits the whole demand, holds nothing while
    waiting, and ends the admission when the block ends. `try_acquire` never
    waits. Waiters are served first come, first served, so a large demand is not
    starved by small ones.

    Callers that wait are served by `priority` (higher first, FIFO within one),
    with `lower_share` of admissions kept for lower priorities while they wait;
    at most `max_queue` callers wait (`QueueFullError` beyond; None: no bound).

    The limiter owns time: it reads `clock` (monotonic seconds for windows,
    pacing and deadlines; the wall clock only for calendar days) and hands each
    reading to `backend`, which keeps the usage: a fresh `MemoryBackend` (this
    process only) by default, or a shared one (a shared backend may use its
    store's own clock, as Redis does). It owns every admission it creates: each
    ends through `Admission.release`/`refund`, or, when its holder drops it, on
    this limiter's event loop.

    A limiter belongs to the event loop (asyncio or trio) it is first used in and
    may be shared by any number of tasks of that loop; used from another running
    loop it raises `WrongEventLoopError`.

    `tenants` shares the account among tenants (``acquire(tenant="acme")``): each
    tenant's own limits are checked in the same step as the account's, and callers
    waiting for the account are served by weighted fair share between tenants
    instead of first come, first served (see `ratekit.Tenants`). A tenant held back
    by its own limits steps out of the queue, so it never holds up the others.
    Tenant limits are kept where the account's usage is: in this process with the
    memory backend, in the store with a shared one (`RedisBackend`: every pod of the
    account counts a tenant's calls together, in the same atomic step).
    """

    __slots__ = (
        "__weakref__",
        "_aged",
        "_backend",
        "_calendar",
        "_ceilings",
        "_clock",
        "_demands",
        "_fair",
        "_full_since_s",
        "_head_eta_s",
        "_head_unreachable",
        "_here",
        "_lane",
        "_last_demand",
        "_limits",
        "_local",
        "_loop",
        "_loop_closed",
        "_loop_thread",
        "_now",
        "_queue",
        "_relay",
        "_shared_tenants",
        "_stall_warned_s",
        "_tenants",
        "_tickets",
        "_unsubscribe",
        "_waiting_tenants",
        "_wall",
    )

    def __init__(
        self,
        limits: Limits,
        *,
        backend: Backend | None = None,
        clock: Clock | None = None,
        max_queue: int | None = None,
        lower_share: float = 0.1,
        tenants: Tenants | Mapping[str, Tenant] | None = None,
    ) -> None:
        if not isinstance(limits, Limits):
            raise InvalidArgumentError(f"Limiter: limits must be a ratekit.Limits, got {limits!r}")
        tenants = Tenants.of(tenants)
        if backend is None:
            backend = MemoryBackend()
        elif not isinstance(backend, Backend):
            raise InvalidArgumentError(
                f"Limiter: backend must be a ratekit backend (MemoryBackend, RedisBackend), "
                f"got {backend!r}"
            )
        if clock is None:
            clock = SystemClock()
        elif not all(callable(getattr(clock, name, None)) for name in ("now", "wall", "wait")):
            raise InvalidArgumentError(f"Limiter: clock must be a ratekit Clock, got {clock!r}")
        self._clock: Clock = clock
        # `clock.now` and `clock.wall`; the system clock's own readings without their
        # methods' frames.
        system = type(clock) is SystemClock
        self._now: Callable[[], float] = time.monotonic if system else clock.now
        self._wall: Callable[[], float] = time.time if system else clock.wall
        self._backend: Backend = backend
        # What the backend's notices reach (held weakly by its listeners): `Relay`.
        self._relay = Relay(None if tenants is None else tenants.wake)
        # Whether the backend's refusals wait from the instant it was handed: their
        # waits are then shortened by the time their reply took (`_age`).
        self._aged = bool(getattr(backend, "waits_from_instant", False))
        # A backend with no I/O (memory), called synchronously: the uncontended path.
        self._local: InProcess | None = backend if isinstance(backend, InProcess) else None
        # The memory backend itself (not a subclass, which may count or change what it
        # is asked): its uncontended path is asked first (`MemoryBackend.admit_now`).
        self._lane: MemoryBackend | None = backend if type(backend) is MemoryBackend else None
        # A shared backend that ends some grants with no I/O, ended at once too.
        self._here: SettlesHere | None = (
            backend if self._local is None and isinstance(backend, SettlesHere) else None
        )
        # A shared backend that keeps tenants' own limits beside the account's.
        self._shared_tenants: SharedTenants | None = None
        if tenants is not None and tenants.limited and self._local is None:
            if not isinstance(backend, SharedTenants):
                raise InvalidArgumentError(
                    f"Limiter: {type(backend).__name__} cannot keep tenant limits; give "
                    "tenants weights only, or use the memory or the Redis backend"
                )
            backend.check_tenant_limits()
            self._shared_tenants = backend
            # Told when a tenant's call ends in any process (held weakly: `_relay`).
            backend.subscribe_tenants(self._relay.tenant_release)
        self._tenants = tenants
        # The tenant of each waiter, for a shared backend to take the followers of the
        # head from their tenants' own limits too.
        self._waiting_tenants: dict[Waiter, str] = {}
        # With tenants, waiting callers are ordered by fair-share tags, not arrival.
        self._fair = FairShare() if tenants is not None else None
        self._limits = limits
        self._ceilings = _ceilings(limits)
        # Demands already checked against these limits, by their amounts (plain ints or
        # floats): most call sites ask for the same few amounts, so the common acquire
        # builds none.
        self._demands: dict[tuple[float, float, float], Demand] = {}
        self._calendar = _has_calendar(limits) or self._tenant_calendar()
        # Callers waiting: by priority, first come first served; the head retries.
        self._queue = WaitQueue(lower_share=lower_share, max_size=max_queue)
        # Each caller's place in the order of arrival (see `_reserve`).
        self._tickets = itertools.count()
        # When the head of the queue is predicted to be admitted (None: unknown).
        self._head_eta_s: float | None = None
        # Whether the head's last try found the shared backend unreachable (its policy
        # keeps callers waiting for it): a deadline then ends in `BackendUnavailableError`.
        self._head_unreachable = False
        # Since when every concurrency slot has been taken while someone waits (None: not
        # now), and when that was last reported (see `_warn_if_stalled`).
        self._full_since_s: float | None = None
        self._stall_warned_s = -math.inf
        # The event loop of the first admission: dropped admissions end there.
        self._loop: _Loop | None = None
        # The thread `_loop` runs in, and whether that loop is closed (an asyncio loop's
        # `is_closed`): a call from another thread, or once the loop is closed, is from
        # another loop, checked by `_check_loop` on every path, the uncontended one
        # included (a loop replaced in the same thread is taken over, or refused).
        self._loop_thread = -1
        self._loop_closed: Callable[[], bool] = _never
        # The demand of the last `acquire` (its amounts compared before the cache of
        # `_demand` is looked in): checked against the limits in force, so reset with them.
        self._last_demand: Demand = _NO_DEMAND
        # Told when capacity may be freed. A shared backend's notices cross the
        # network, so the limiter listens from the start; the memory backend is
        # listened to only while someone waits (its releases are synchronous, so
        # none can be missed), which keeps the uncontended path free of callbacks.
        self._unsubscribe: Callable[[], None] | None = None
        if self._local is None:
            self._unsubscribe = backend.subscribe(self._relay.release)

    # -- configuration -------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """Replace the limits (a tier upgrade): usage so far counts against the new numbers."""
        if not isinstance(limits, Limits):
            raise InvalidArgumentError(f"Limiter.limits must be a ratekit.Limits, got {limits!r}")
        self._limits = limits
        self._ceilings = _ceilings(limits)
        self._demands = {}
        self._last_demand = _NO_DEMAND
        self._calendar = _has_calendar(limits) or self._tenant_calendar()
        self._on_change()

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def max_tokens(self) -> float:
        """The most tokens one call may ask for: the smallest token rate's limit."""
        return self._ceilings[1]

    @property
    def clock(self) -> Clock:
        return self._clock

    def instant(self) -> Instant:
        """The limiter's reading of its clock, as handed to the backend."""
        # A tuple built directly: the generated constructor of a NamedTuple is slower.
        return tuple.__new__(Instant, (self._now(), self._wall()))

    def _on_change(self) -> None:
        self._relay.changed()

    # -- acquiring -------------------------------------------------------------------

    def acquire(
        self,
        requests: Amount = 1,
        *,
        tokens: Amount = 0,
        cost: Amount = 0,
        timeout: Amount | None = None,
        priority: Priority = 0,
        tenant: str | None = None,
    ) -> Admission:
        """An admission for one call of `requests`, `tokens` (estimated) and `cost` (money).

        Use as ``async with limiter.acquire(...) as admission:``, or ``admission =
        await limiter.acquire(...)`` followed by ``await admission.release()``.
        `timeout` is in seconds; when the wait the backend predicts is longer,
        `AcquireTimeout` is raised at once (a wait for a concurrency slot is never
        predicted: a release may come any time). With a shared backend, a round trip
        not answered by the deadline (or half a second, if later) raises
        `AcquireTimeout` too, and an outage that lasts past it
        `BackendUnavailableError`. Bad arguments raise here, in the
        caller's own task, before anything is queued: a negative, NaN or infinite
        amount `InvalidCostError`, a demand larger than a whole rate
        `CostExceedsLimitError`, a priority that is not an int or a negative
        timeout `InvalidArgumentError`. `priority` orders the callers that have to
        wait (higher first). `tenant` names the tenant whose share it takes (a limiter
        built with `tenants`; `InvalidArgumentError` otherwise).
        """
        # The amounts of the last call, compared first (most calls repeat them); plain
        # numbers only: a bool equals 1 but is refused. Else `_demand` checks and caches.
        # The types are looked at before the values: a comparison with a float narrows
        # the argument to a float for the type checker, and compiled, a bool would then
        # be converted to one.
        demand = self._last_demand
        if not (
            (type(requests) is int or type(requests) is float)
            and (type(tokens) is int or type(tokens) is float)
            and (type(cost) is int or type(cost) is float)
            and requests == demand[0]
            and tokens == demand[1]
            and cost == demand[2]
        ):
            demand = self._demand(requests, tokens, cost)
            self._last_demand = demand
        return Admission(
            self,
            demand,
            None if timeout is None else check_timeout(timeout),
            priority if type(priority) is int else check_priority(priority),
            None if tenant is None else self._check_tenant(tenant),
        )

    async def try_acquire(
        self,
        requests: Amount = 1,
        *,
        tokens: Amount = 0,
        cost: Amount = 0,
        tenant: str | None = None,
    ) -> Admission | None:
        """A granted admission if every dimension admits now (and nobody waits), else None.

        Bad amounts raise as in `acquire`; end the admission (``async with admission:``
        or ``await admission.release()``).
        """
        outcome = await self._offer(self._demand(requests, tokens, cost), tenant)
        if isinstance(outcome, Admission):
            outcome._enterable = True  # its holder may end it with one `async with`
            return outcome
        return None

    async def _offer(self, demand: Demand, tenant: str | None) -> Admission | Refusal | None:
        """`try_acquire` that says why not: the granted admission, the backend's refusal
        (with its wait), or None when callers of this limiter already wait (they go first).
        A pool of accounts asks each account this way (see `ratekit.Pool`)."""
        admission = Admission(
            self, demand, None, 0, None if tenant is None else self._check_tenant(tenant)
        )
        admission._start()
        tried = admission._try_now()
        if tried is True:
            return admission
        if tried is not False or self._queue:
            admission._state = 0
            return tried if isinstance(tried, Refusal) else None
        self._check_loop()
        outcome = await self._attempt(admission._demand, admission.tenant)
        if isinstance(outcome, Refusal):
            admission._state = 0
            return outcome
        admission._grant = outcome
        admission._state = 2
        self._granted(admission)
        return admission

    def _tenant_calendar(self) -> bool:
        return self._tenants is not None and self._tenants.calendar

    def _check_tenant(self, tenant: object) -> str:
        if self._tenants is None:
            raise InvalidArgumentError(
                f"tenant={tenant!r} needs a limiter with tenants: Limiter(..., tenants=...)"
            )
        return check_tenant_name(tenant, "tenant")

    def _demand(self, requests: Amount, tokens: Amount, cost: Amount) -> Demand:
        # Plain numbers (an int or a float, not a bool or a subclass) are looked up, then
        # checked in a few comparisons: a NaN or an infinity fails them and is refused by
        # `check_amount` below.
        if (
            (type(requests) is int or type(requests) is float)
            and (type(tokens) is int or type(tokens) is float)
            and (type(cost) is int or type(cost) is float)
        ):
            key = (requests, tokens, cost)
            demand = self._demands.get(key)
            if demand is not None:
                return demand
            ceilings = self._ceilings
            if (
                0 <= requests <= ceilings[0]
                and 0 <= tokens <= ceilings[1]
                and 0 <= cost <= ceilings[2]
            ):
                # Valid numbers within every limit. A Demand is a tuple, built here without
                # its (slower) generated constructor.
                demand = tuple.__new__(Demand, (requests, tokens, cost, _NOT_COUNTED))
                if len(self._demands) >= _DEMANDS_KEPT:
                    self._demands.clear()
                self._demands[key] = demand
                return demand
        demand = Demand(
            check_amount("requests", requests),
            check_amount("tokens", tokens),
            check_amount("cost", cost),
        )
        self._check_fits(demand)
        return demand

    def _check_fits(self, demand: Demand) -> None:
        requests, tokens, cost = self._ceilings
        if demand.requests > requests or demand.tokens > tokens or demand.cost > cost:
            for rate in self._limits.all_rates:
                amount = demand.of_unit(rate.unit)
                if amount > rate.limit:
                    raise CostExceedsLimitError(rate.name, amount, rate.limit)

    def _reserve_now(self, demand: Demand, tenant: str | None = None) -> Grant | Refusal | None:
        """The uncontended in-memory path: admit synchronously, or None when it cannot be
        tried (a shared backend, or callers already waiting)."""
        local = self._local
        if local is None or self._queue.size:
            return None
        if self._loop is None:
            self._own_loop(_Loop.current())
        elif _thread_id() != self._loop_thread or self._loop_closed():
            self._check_loop()  # another loop: raises (or a closed one hands over)
        now = self._now()
        if tenant is None:
            lane = self._lane
            if lane is not None:
                grant = lane.admit_now(self._limits, demand, now)
                if grant is not None:
                    return grant
            wall = self._wall() if self._calendar else math.nan
            return local.reserve_now(self._limits, demand, now, wall)
        wall = self._wall() if self._calendar else math.nan
        return self._reserve_both(local, demand, tenant, now, wall)

    def _reserve_both(
        self, local: InProcess, demand: Demand, tenant: str, now: float, wall: float
    ) -> Grant | Refusal:
        """Admit on the tenant's own limits and the account's in one synchronous step."""
        tenants = self._tenants
        assert tenants is not None, "a tenant is checked against the limiter's tenants"
        if not tenants.tenant(tenant).limited:
            return local.reserve_now(self._limits, demand, now, wall)
        own = tenants.reserve_now(tenant, demand, now, wall)
        if isinstance(own, Refusal):
            return own
        state, own_grant = own
        outcome = local.reserve_now(self._limits, demand, now, wall)
        grant = TenantGrant(outcome, state, own_grant)
        if isinstance(outcome, Refusal):
            tenants.settle_now(grant, None, now, wall)  # nothing taken from either
            return outcome
        return grant

    async def _attempt(self, demand: Demand, tenant: str | None) -> Grant | Refusal:
        """One try at admitting `demand` now, whoever waits."""
        if tenant is not None:
            local = self._local
            if local is not None:
                wall = self._wall() if self._calendar else math.nan
                return self._reserve_both(local, demand, tenant, self._now(), wall)
            shared = self._shared_tenants
            if shared is not None:
                assert self._tenants is not None
                share = self._tenants.share(tenant)
                if share is not None:
                    now = self.instant()
                    grants, refusal = await shared.reserve_tenants(
                        self._limits, (demand,), now, (share,)
                    )
                    if grants:
                        return grants[0]
                    assert refusal is not None, "a backend admits or refuses"
                    return self._age(refusal, now[0])
        now = self.instant()
        outcome = await self._backend.reserve(self._limits, demand, now)
        if type(outcome) is Refusal:
            return self._age(outcome, now[0])
        return outcome

    def _age(self, refusal: Refusal, asked_s: float) -> Refusal:
        """`refusal` as from now: a backend whose waits run from the instant it was
        handed (`asked_s`) had them shortened by the time the reply took, so that a
        clock that moved meanwhile (a fake one) does not make the caller wait longer."""
        if not self._aged:
            return refusal
        taken_s = self._now() - asked_s
        if taken_s <= 0 or math.isinf(refusal.wait_s):
            return refusal
        return Refusal(max(0.0, refusal.wait_s - taken_s), refusal.dimension)

    def _granted(self, admission: Admission) -> None:
        if self._loop is None:
            self._own_loop(_Loop.current())

    def _own_loop(self, loop: _Loop) -> None:
        self._loop = loop
        self._loop_thread = _thread_id()
        identity = loop.identity
        self._loop_closed = (
            identity.is_closed if isinstance(identity, asyncio.AbstractEventLoop) else _never
        )

    def _check_loop(self) -> None:
        """Refuse use from a second running loop (a closed first loop hands over)."""
        loop = self._loop
        if loop is None:
            self._own_loop(_Loop.current())
        elif not loop.is_current():
            if loop.is_closed() and not self._queue:
                self._own_loop(_Loop.current())
                return
            raise WrongEventLoopError(
                f"{self!r} belongs to the event loop it was first used in ({loop.identity!r}) "
                "and is used from another one; build one limiter (and scheduler, and Redis "
                "backend) per event loop, or call from threads through ratekit.SyncScheduler"
            )
        else:
            self._loop_thread = _thread_id()  # its loop, run from another thread now

    async def _reserve(
        self,
        demand: Demand,
        timeout_s: float | None,
        refusal: Refusal | None = None,
        priority: int = 0,
        tenant: str | None = None,
    ) -> Grant:
        """The one primitive: admit `demand`, waiting at most `timeout_s` (None: no bound).

        `refusal` is the backend's answer to an attempt made just before, so that
        the backend is not asked again at once.
        """
        self._check_loop()
        queue = self._queue
        fair = self._fair
        # Taken on arrival: a caller refused after a try queues in the order it came,
        # not in the order the replies to many callers' tries arrived (a herd gathered
        # at once on Redis: its tries' replies come back over several connections).
        # With tenants, the place is the caller's fair-share tag instead.
        if fair is None:
            ticket = float(next(self._tickets))
        else:
            assert self._tenants is not None
            ticket = fair.tag(tenant, self._tenants.weight(tenant))
        seen = None if tenant is None else self._mark(tenant)
        deadline_s = None if timeout_s is None else self._now() + timeout_s
        if refusal is None and not queue.size:
            changes = self._relay.changes
            if deadline_s is not None and self._local is None:
                outcome = await self._bounded(self._attempt(demand, tenant), deadline_s, timeout_s)
            elif tenant is None:  # `_attempt`, without its frame
                now = self.instant()
                outcome = await self._backend.reserve(self._limits, demand, now)
                if type(outcome) is Refusal:
                    outcome = self._age(outcome, now[0])
            else:
                outcome = await self._attempt(demand, tenant)
            if not isinstance(outcome, Refusal):
                if fair is not None:
                    fair.served(ticket, idle=not queue)
                return outcome
            # A release heard while the try was on its way (a shared backend's reply can
            # come after it) makes the refusal stale: the head asks again at once.
            refusal = outcome if self._relay.changes == changes else None
        while True:
            if refusal is not None and refusal.dimension.startswith(TENANT_PREFIX):
                # Held back by its tenant's own limits: it waits out of the queue, so that
                # the callers of other tenants go on, and comes back with its tag.
                assert tenant is not None, "only a tenant's call meets its own limits"
                await self._wait_own(tenant, refusal, deadline_s, timeout_s, seen)
                refusal = None
                if not queue:
                    seen = self._mark(tenant)
                    outcome = await self._attempt(demand, tenant)
                    if not isinstance(outcome, Refusal):
                        if fair is not None:
                            fair.served(ticket, idle=not queue)
                        return outcome
                    refusal = outcome
                    continue
            waiter = queue.push(priority, demand, ticket=ticket)
            if tenant is not None and self._shared_tenants is not None:
                self._waiting_tenants[waiter] = tenant
            if self._unsubscribe is None:
                self._unsubscribe = self._backend.subscribe(self._relay.release)
            if queue.head() is waiter:
                self._on_change()  # a head displaced by a higher priority steps back
            else:
                refusal = None  # it answered for another position in the queue
            held_back: tuple[Refusal, Mark | None] | None = None
            try:
                grant = await self._serve(waiter, demand, deadline_s, timeout_s, refusal, tenant)
            except _HeldBack as back:
                held_back = back.refusal, back.seen  # not the exception: no frame cycle
            finally:
                self._leave(waiter)
            if held_back is not None:  # (no `continue` in the `try`: mypyc cannot build it)
                refusal, seen = held_back
                continue
            if fair is not None:
                fair.served(ticket)
            return grant

    def _mark(self, tenant: str | None) -> Mark | None:
        """Where `tenant`'s releases stand, before a shared backend is asked (None: no
        tenant, or its limits are in this process, where nothing comes between)."""
        if tenant is None or self._shared_tenants is None:
            return None
        assert self._tenants is not None
        return self._tenants.mark(tenant, self._clock.now())

    def _leave(self, waiter: Waiter) -> None:
        """Take `waiter` out of the queue (admitted, refused, gone) and wake the next head."""
        queue = self._queue
        if self._waiting_tenants:
            self._waiting_tenants.pop(waiter, None)
        if waiter.grant is not None:
            # Admitted with the head, then cancelled or timed out before taking it:
            # nothing was sent, everything goes back.
            grant, waiter.grant = waiter.grant, None
            self._backend.abandon(self._limits, grant, None, self.instant())
        was_head = queue.head() is waiter
        queue.remove(waiter)
        if was_head:
            self._head_eta_s = None
        head = queue.head()
        if head is not None:
            head.turn.set()
        elif self._local is not None and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    async def _wait_own(
        self,
        tenant: str,
        refusal: Refusal,
        deadline_s: float | None,
        timeout_s: float | None,
        seen: Mark | None,
    ) -> None:
        """Wait until `tenant`'s own limits may admit again (the refusal's hint, or one of
        its calls ending), within the deadline. A call of the tenant that ended while the
        refusal was on its way back from a shared backend (after `seen`) ends the wait at
        once."""
        tenants = self._tenants
        assert tenants is not None
        wait_s = refusal.wait_s
        now = self._clock.now()
        if deadline_s is not None:
            left_s = deadline_s - now
            if left_s <= 0 or (wait_s > left_s and is_forecast(wait_s, refusal.dimension)):
                raise AcquireTimeout(timeout_s or 0.0, wait_s, refusal.dimension)
            wait_s = min(wait_s, left_s)
        if seen is not None and tenants.released(tenant, seen):
            await anyio.lowlevel.checkpoint()
            return
        await self._clock.wait(tenants.changed(tenant, now), wait_s)

    async def _serve(
        self,
        waiter: Waiter,
        demand: Demand,
        deadline_s: float | None,
        timeout_s: float | None,
        refusal: Refusal | None,
        tenant: str | None,
    ) -> Grant:
        """Wait for the turn, then as the head retry whenever the backend said or a release
        came; a head displaced by a higher priority goes back to waiting for its turn, and
        one held back by its tenant's own limits leaves the queue (`_HeldBack`)."""
        while True:
            if waiter.grant is not None:  # admitted together with the head
                grant, waiter.grant = waiter.grant, None
                self._full_since_s = None
                return grant
            if self._queue.head() is not waiter:
                waiter.turn = anyio.Event()
                await self._wait_turn(waiter.turn, deadline_s, timeout_s)
                continue
            self._check_fits(demand)  # the limits may have changed while queued
            # Armed before asking, so a release during the round trip is not missed.
            self._relay.wake = wake = anyio.Event()
            seen = self._mark(tenant)
            if refusal is None:
                if deadline_s is not None and self._local is None:
                    outcome = await self._bounded(
                        self._reserve_with_followers(waiter, demand, tenant),
                        deadline_s,
                        timeout_s,
                    )
                else:
                    outcome = await self._reserve_with_followers(waiter, demand, tenant)
                if not isinstance(outcome, Refusal):
                    self._full_since_s = None
                    self._head_unreachable = False
                    return outcome
                refusal = outcome
            if refusal.dimension.startswith(TENANT_PREFIX):
                raise _HeldBack(refusal, seen)
            wait_s = refusal.wait_s
            now = self._clock.now()
            if refusal.dimension == "concurrency":
                self._warn_if_stalled(now)
            else:
                self._full_since_s = None
            # An outage's wait says when to ask again, and a slot's when to look for a
            # holder that died: neither says when the head is admitted.
            unreachable = self._head_unreachable = refusal.dimension == UNAVAILABLE
            forecast = is_forecast(wait_s, refusal.dimension)
            self._head_eta_s = now + wait_s if forecast else None
            if deadline_s is not None:
                left_s = deadline_s - now
                if unreachable:
                    if left_s <= 0:
                        raise self._unreachable(timeout_s)
                elif left_s <= 0 or (forecast and wait_s > left_s):
                    raise AcquireTimeout(timeout_s or 0.0, wait_s, refusal.dimension)
                wait_s = min(wait_s, left_s)
            refusal = None
            await self._clock.wait(wake, wait_s)

    def _warn_if_stalled(self, now: float) -> None:
        """Every slot taken for `_STALL_WARN_S` while callers wait: say so (once a period),
        for the usual cause is an admission nobody ends, such as a stream neither read to
        its end nor closed but kept alive (by an exception that references it)."""
        if self._full_since_s is None:
            self._full_since_s = now
            return
        stalled_s = now - self._full_since_s
        if stalled_s >= _STALL_WARN_S and now - self._stall_warned_s >= _STALL_WARN_S:
            self._stall_warned_s = now
            _log.warning(
                "ratekit: every concurrency slot of %r has been taken for %.0f s while %d "
                "call(s) wait; an admission that is never ended holds its slot (a stream "
                "neither read to its end nor closed, kept alive by a reference to it)",
                self,
                stalled_s,
                len(self._queue),
            )

    async def _reserve_with_followers(
        self, head: Waiter, demand: Demand, tenant: str | None
    ) -> Grant | Refusal:
        """Admit the head, and on a shared backend in the same call the callers behind it
        in its priority (up to `_BATCH`) until one does not fit: a burst of capacity
        freed at once is handed out in one round trip, in queue order, not one per
        round trip. The followers admitted are woken with their grants.

        While the call is on its way, the head and its followers are asked for: a head
        that comes before them meanwhile (a caller of another tenant back with its
        earlier fair-share tag, a higher priority) does not ask for them too, so each
        caller is granted by one call at most and a grant is never handed over another.

        In process the head admits alone: each caller then runs from its admission to
        its first wait before the next is admitted, so that callers that do not say
        when their request leaves (`Admission.sent`) send it soon after their
        admission, not behind a burst of others."""
        followers = [] if self._local is not None else self._queue.behind(head, _BATCH - 1)
        if not followers:
            head.asked = True
            try:
                outcome = await self._attempt(demand, tenant)
            finally:
                head.asked = False
            if not isinstance(outcome, Refusal):
                self._queue.admitted(head)
            return outcome
        asked = [head, *followers]
        for waiter in asked:
            waiter.asked = True
        try:
            grants, refusal = await self._reserve_batch(demand, tenant, followers)
        finally:
            for waiter in asked:
                waiter.asked = False
        if not grants:
            assert refusal is not None, "a backend admits or refuses the head"
            return refusal
        self._queue.admitted(head)
        for follower, grant in zip(followers, grants[1:], strict=False):
            if follower.gone:
                # Left while the call was on its way: nothing was sent, all goes back.
                self._backend.abandon(self._limits, grant, None, self.instant())
                continue
            assert follower.grant is None, "a follower is asked for by one head at a time"
            self._queue.admitted(follower)
            follower.grant = grant
            follower.turn.set()
        return grants[0]

    async def _reserve_batch(
        self, demand: Demand, tenant: str | None, followers: list[Waiter]
    ) -> tuple[list[Grant], Refusal | None]:
        """One call to a shared backend for the head's `demand` and its followers': the
        grants of those admitted, in order, and the (aged) refusal of the first that was
        not."""
        demands = [demand, *(follower.demand for follower in followers)]
        shared = self._shared_tenants
        now = self.instant()
        if shared is not None:
            assert self._tenants is not None
            share = self._tenants.share
            waiting = self._waiting_tenants
            names = [tenant, *(waiting.get(follower) for follower in followers)]
            grants, refusal = await shared.reserve_tenants(
                self._limits,
                demands,
                now,
                [None if name is None else share(name) for name in names],
            )
        else:
            grants, refusal = await self._backend.reserve_many(self._limits, demands, now)
        if refusal is not None:
            refusal = self._age(refusal, now[0])
        return grants, refusal

    async def _wait_turn(
        self, turn: anyio.Event, deadline_s: float | None, timeout_s: float | None
    ) -> None:
        if deadline_s is None:
            await turn.wait()
            return
        now = self._clock.now()
        eta_s = self._head_eta_s
        if eta_s is not None and eta_s > deadline_s:
            # Even the caller ahead cannot be admitted before this deadline.
            raise AcquireTimeout(timeout_s or 0.0, eta_s - now, "queue")
        await self._clock.wait(turn, deadline_s - now)
        if not turn.is_set():
            if self._head_unreachable:
                raise self._unreachable(timeout_s)
            raise AcquireTimeout(timeout_s or 0.0, math.inf, "queue")

    async def _bounded(
        self, attempt: Awaitable[_T], deadline_s: float, timeout_s: float | None
    ) -> _T:
        """`attempt` (a try on a shared backend), given up at the caller's deadline, or
        `_REPLY_GRACE_S` after it is made when that is later (a round trip takes time,
        also for a caller that asks not to wait): a reply still on its way then (a hung
        or overloaded server) ends the wait with `AcquireTimeout`; what it would have
        granted is handed back."""
        outcome = await within(attempt, max(_REPLY_GRACE_S, deadline_s - self._now()))
        if outcome is EXPIRED:
            raise AcquireTimeout(timeout_s or 0.0, math.inf, NO_REPLY)
        return outcome

    def _unreachable(self, timeout_s: float | None) -> BackendUnavailableError:
        """The error of a caller whose deadline passed while the backend was unreachable
        (or did not answer)."""
        return BackendUnavailableError(
            f"no permit within {timeout_s or 0.0:g} s: {self._backend!r} was unreachable "
            "or did not reply in time"
        )

    # -- ending admissions -------------------------------------------------------------

    def _settle_now(self, grant: Grant, actual: Demand | None) -> bool:
        """End one admission's grant at once when the backend is in this process, or the
        shared one needs no round trip for it (no cancellation can come between the end
        and the slot's return); False when it takes a round trip (`_settle`)."""
        lane = self._lane
        if lane is not None and type(grant) is tuple:
            # A grant of the memory backend's uncontended path (`_reserve_now`): ended
            # there (without reading the clock when no window holds, as nothing then
            # depends on the instant), or as the general path's grant.
            now = self._now() if grant[0].ends_timed else math.nan
            if not lane.end_now(grant, actual, now):
                if math.isnan(now):
                    now = self._now()
                wall = self._wall() if self._calendar else math.nan
                lane.settle_now(lane.grant_of(grant), actual, now, wall)
            return True
        local = self._local
        if local is None:
            here = self._here
            if here is None or not here.settles_here(grant, actual):
                return False
            self._backend.abandon(self._limits, grant, actual, self.instant())
            self._on_change()  # as `_settle` does
            return True
        now = self._now()
        wall = self._wall() if self._calendar else math.nan
        if type(grant) is TenantGrant:
            assert isinstance(grant, TenantGrant)
            Tenants.settle_now(grant, actual, now, wall)
            grant = grant.account
        local.settle_now(grant, actual, now, wall)
        return True

    async def _settle(self, grant: Grant, actual: Demand | None) -> None:
        """End one admission's grant over the backend's I/O (`_settle_now` found it could
        not end it at once): with `_settle_now`, the only place capacity goes back to
        the backend."""
        with anyio.CancelScope(shield=True):
            await self._backend.settle(self._limits, grant, actual, self.instant())
        # Our own waiters retry now, whether or not the store's notice reaches them.
        self._on_change()

    async def _restamp(self, grant: Grant) -> Grant:
        """The request of `grant` leaves now: count what it recorded from now. Returns the
        grant to hold from now on: `grant`, or for one of the memory backend's
        uncontended path, the backend's own grant, restamped."""
        local = self._local
        if local is not None:
            now = self._clock.now()
            if self._lane is not None and type(grant) is tuple:
                grant = self._lane.grant_of(grant)  # of the uncontended path
            account = grant
            if isinstance(account, TenantGrant):
                Tenants.restamp_now(account, now)
                account = account.account
            local.restamp_now(account, now)
            return grant
        await self._backend.restamp(self._limits, grant, self.instant())
        return grant

    def _hand_back(self, grant: Grant, actual: Demand | None) -> None:
        """End a dropped admission's grant on this limiter's loop (called by a finalizer,
        which must not touch shared state itself)."""
        loop = self._loop
        if loop is None:
            return
        limits = self._limits
        backend = self._backend

        def end() -> None:
            now = self.instant()
            account = grant
            if self._lane is not None and type(account) is tuple:
                account = self._lane.grant_of(account)  # of the uncontended path
            if isinstance(grant, TenantGrant):
                Tenants.settle_now(grant, actual, now.mono, now.wall)
                account = grant.account
            backend.abandon(limits, account, actual, now)
            # A shared backend settles in the background, queued ahead of any retry.
            self._on_change()

        # A closed loop raises: nothing of this process waits there any more.
        with contextlib.suppress(RuntimeError):
            loop.run_soon(end)

    async def pause(self, seconds: float, *, out: bool = False) -> float:
        """Refuse every admission for `seconds` from now (a provider's cooldown); returns
        how long the pause lasts from now (a longer one in force stands). With `out`,
        the account's quota or balance is spent: refusals name the dimension "out", in
        every process sharing the backend (a pool takes the account out)."""
        return await self._backend.pause(seconds, self.instant(), out=out)

    # -- observing -------------------------------------------------------------------

    async def statistics(self) -> LimiterStatistics:
        """A frozen snapshot: per dimension, used / limit / in flight; and the waiters."""
        dimensions = await self._backend.statistics(self._limits, self.instant())
        return LimiterStatistics(dimensions, len(self._queue), self._queue.waiting())

    async def tenant_statistics(self, tenant: str) -> tuple[DimensionStatistics, ...]:
        """Usage of `tenant`'s own limits now (concurrency first, then each rate; none for
        a tenant without limits of its own): this process's with the memory backend,
        every process's with a shared one."""
        name = self._check_tenant(tenant)
        tenants = self._tenants
        assert tenants is not None
        shared = self._shared_tenants
        if shared is not None:
            share = tenants.share(name)
            if share is None:
                return ()
            return await shared.tenant_statistics(self._limits, share, self.instant())
        clock = self._clock
        return tenants.statistics_now(name, clock.now(), clock.wall())

    def __repr__(self) -> str:
        return f"Limiter({self._limits!r}, backend={type(self._backend).__name__})"
