"""The limiter: permits for calls, admitted on every dimension at once, or waited for."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio

from ._clock import Clock, SystemClock
from ._errors import AcquireTimeout, CostExceedsLimitError, LimitsError, PermitError
from ._limits import Limits, check_amount
from ._queue import Waiter, WaitQueue
from .backends._base import Backend, Demand, DimensionStatistics, Grant, Refusal
from .backends.memory import MemoryBackend


def _amount(where: str, value: float) -> float:
    # The common case (a non-negative int) without the full check's cost.
    if isinstance(value, int) and value.__class__ is int and value >= 0:
        return value
    return check_amount(where, value)


def _ceilings(limits: Limits) -> tuple[float, float, float]:
    smallest = {"requests": math.inf, "tokens": math.inf, "money": math.inf}
    for rate in limits.all_rates:
        smallest[rate.unit] = min(smallest[rate.unit], rate.limit)
    return smallest["requests"], smallest["tokens"], smallest["money"]


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

    Use `acquire` around a call (``async with limiter.acquire(tokens=n) as permit``):
    it waits until every dimension admits the whole demand, holds nothing while
    waiting, and releases the concurrency slot when the block ends. `try_acquire`
    never waits. Waiters are served first come, first served, so a large demand
    is not starved by small ones.

    Callers that wait are served by `priority` (higher first, FIFO within one),
    with `lower_share` of admissions kept for lower priorities while they wait;
    at most `max_queue` callers wait (`QueueFullError` beyond; None: no bound).

    `backend` keeps the usage: a fresh `MemoryBackend` (this process only) by
    default, or a shared one. `clock` is where time is read and waited on: the
    memory backend's own clock (give it to one or the other), or the system
    clock for a shared backend, whose waits are durations of the server's time.
    A limiter belongs to one event loop (asyncio or trio); it may be shared by any
    number of tasks of that loop.
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_ceilings",
        "_clock",
        "_head_eta_s",
        "_limits",
        "_local",
        "_queue",
        "_unsubscribe",
        "_wake",
    )

    def __init__(
        self,
        limits: Limits,
        *,
        backend: Backend | None = None,
        clock: Clock | None = None,
        max_queue: int | None = None,
        lower_share: float = 0.1,
    ) -> None:
        if not isinstance(limits, Limits):
            raise TypeError(f"Limiter: limits must be a ratekit.Limits, got {limits!r}")
        if backend is None:
            backend = MemoryBackend(clock=clock)
        if isinstance(backend, MemoryBackend):
            if clock is not None and clock is not backend.clock:
                raise LimitsError(
                    "Limiter: clock must be the memory backend's own clock "
                    "(pass it to MemoryBackend(clock=...) and leave Limiter's unset)"
                )
            clock = backend.clock
        elif clock is None:
            clock = SystemClock()
        self._limits = limits
        # The smallest limit per unit (requests, tokens, money): a larger demand never fits.
        self._ceilings = _ceilings(limits)
        self._backend: Backend = backend
        # The memory backend, called synchronously on the uncontended path.
        self._local = backend if isinstance(backend, MemoryBackend) else None
        self._clock: Clock = clock
        # Callers waiting: by priority, first come first served; the head retries.
        self._queue = WaitQueue(lower_share=lower_share, max_size=max_queue)
        # Set when capacity may have been freed; the head waits on it.
        self._wake: anyio.Event | None = None
        # When the head of the queue is predicted to be admitted (None: unknown).
        self._head_eta_s: float | None = None
        # Told when capacity may be freed. A shared backend's notices cross the
        # network, so the limiter listens from the start; the memory backend is
        # listened to only while someone waits (its releases are synchronous, so
        # none can be missed), which keeps the uncontended path free of callbacks.
        self._unsubscribe: Callable[[], None] | None = None
        if self._local is None:
            self._unsubscribe = backend.subscribe(self._on_change)

    # -- configuration -------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """Replace the limits (a tier upgrade): usage so far counts against the new numbers."""
        if not isinstance(limits, Limits):
            raise TypeError(f"Limiter.limits must be a ratekit.Limits, got {limits!r}")
        self._limits = limits
        self._ceilings = _ceilings(limits)
        self._on_change()

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def clock(self) -> Clock:
        return self._clock

    def _on_change(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- acquiring -------------------------------------------------------------------

    def acquire(
        self,
        requests: float = 1,
        *,
        tokens: float = 0,
        cost: float = 0,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Permit:
        """A permit for one call of `requests`, `tokens` (estimated) and `cost` (money).

        Use as ``async with limiter.acquire(...) as permit:``, or ``permit = await
        limiter.acquire(...)`` followed by ``await permit.release()``. `timeout` is
        in seconds; when the wait the backend predicts is longer, `AcquireTimeout`
        is raised at once. A demand larger than a whole rate raises
        `CostExceedsLimitError`; a negative, NaN or infinite amount
        `InvalidCostError`. Both raise when the permit is awaited or entered.
        `priority` orders the callers that have to wait (higher first).
        """
        return Permit(self, requests, tokens, cost, timeout, priority)

    async def try_acquire(
        self, requests: float = 1, *, tokens: float = 0, cost: float = 0
    ) -> Permit | None:
        """A granted permit if every dimension admits now (and nobody waits), else None.

        Bad amounts raise as in `acquire` (`InvalidCostError`,
        `CostExceedsLimitError`); release the permit (``async with permit:``).
        """
        permit = Permit(self, requests, tokens, cost, None, 0)
        demand = permit._validate()
        if self._queue:
            return None
        outcome = await self._backend.reserve(self._limits, demand)
        if isinstance(outcome, Refusal):
            return None
        permit._grant = outcome
        return permit

    def _check_fits(self, demand: Demand) -> None:
        requests, tokens, cost = self._ceilings
        if demand.requests > requests or demand.tokens > tokens or demand.cost > cost:
            for rate in self._limits.all_rates:
                amount = demand.of_unit(rate.unit)
                if amount > rate.limit:
                    raise CostExceedsLimitError(rate.name, amount, rate.limit)

    async def _reserve(
        self,
        demand: Demand,
        timeout_s: float | None,
        refusal: Refusal | None = None,
        priority: int = 0,
    ) -> Grant:
        """The one primitive: admit `demand`, waiting at most `timeout_s` (None: no bound).

        `refusal` is the backend's answer to an attempt made just before, so that
        the backend is not asked again at once.
        """
        queue = self._queue
        if refusal is None and not queue:
            outcome = await self._backend.reserve(self._limits, demand)
            if not isinstance(outcome, Refusal):
                return outcome
            refusal = outcome
        deadline_s = None if timeout_s is None else self._clock.now() + timeout_s
        waiter = queue.push(priority)
        if self._unsubscribe is None:
            self._unsubscribe = self._backend.subscribe(self._on_change)
        if queue.head() is waiter:
            self._on_change()  # a head displaced by a higher priority steps back
        else:
            refusal = None  # it answered for another position in the queue
        try:
            return await self._serve(waiter, demand, deadline_s, timeout_s, refusal)
        finally:
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

    async def _serve(
        self,
        waiter: Waiter,
        demand: Demand,
        deadline_s: float | None,
        timeout_s: float | None,
        refusal: Refusal | None,
    ) -> Grant:
        """Wait for the turn, then as the head retry whenever the backend said or a release
        came; a head displaced by a higher priority goes back to waiting for its turn."""
        while True:
            if self._queue.head() is not waiter:
                waiter.turn = anyio.Event()
                await self._wait_turn(waiter.turn, deadline_s, timeout_s)
                continue
            self._check_fits(demand)  # the limits may have changed while queued
            # Armed before asking, so a release during the round trip is not missed.
            self._wake = wake = anyio.Event()
            if refusal is None:
                outcome = await self._backend.reserve(self._limits, demand)
                if not isinstance(outcome, Refusal):
                    self._queue.admitted(waiter)
                    return outcome
                refusal = outcome
            wait_s = refusal.wait_s
            now = self._clock.now()
            self._head_eta_s = None if math.isinf(wait_s) else now + wait_s
            if deadline_s is not None:
                left_s = deadline_s - now
                predictably_late = wait_s > left_s and not math.isinf(wait_s)
                if predictably_late or left_s <= 0:
                    raise AcquireTimeout(timeout_s or 0.0, wait_s, refusal.dimension)
                wait_s = min(wait_s, left_s)
            refusal = None
            await self._clock.wait(wake, wait_s)

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
            raise AcquireTimeout(timeout_s or 0.0, math.inf, "queue")

    async def _release(self, grant: Grant, actual: Demand | None) -> None:
        with anyio.CancelScope(shield=True):
            await self._backend.settle(self._limits, grant, actual)

    # -- observing -------------------------------------------------------------------

    async def statistics(self) -> LimiterStatistics:
        """A frozen snapshot: per dimension, used / limit / in flight; and the waiters."""
        dimensions = await self._backend.statistics(self._limits)
        return LimiterStatistics(dimensions, len(self._queue), self._queue.waiting())

    def __repr__(self) -> str:
        return f"Limiter({self._limits!r}, backend={type(self._backend).__name__})"


class Permit:
    """One call's admission: acquired on entry, released exactly once on exit.

    Call `settle` with the real usage once the response says it (tokens and cost
    from the response's usage). A permit left without `settle` counts its
    estimates, the conservative choice for a call that may have reached the
    provider; `refund` hands everything back for a call that never did. Not to be
    shared between tasks.
    """

    __slots__ = (
        "_actual",
        "_asked",
        "_demand",
        "_grant",
        "_limiter",
        "_priority",
        "_released",
        "_timeout",
    )

    def __init__(
        self,
        limiter: Limiter,
        requests: float,
        tokens: float,
        cost: float,
        timeout: float | None,
        priority: int,
    ) -> None:
        self._limiter = limiter
        self._priority = priority
        # The amounts as the caller gave them; validated when the permit is acquired.
        self._asked = (requests, tokens, cost)
        self._timeout = timeout
        self._demand: Demand | None = None
        self._grant: Grant | None = None
        # What to record at release: None = the estimates, a Demand = settled usage.
        self._actual: Demand | None = None
        self._released = False

    def _validate(self) -> Demand:
        asked = self._asked
        requests, tokens, cost = asked
        ceilings = self._limiter._ceilings
        if (
            requests.__class__ is int
            and tokens.__class__ is int
            and cost.__class__ is int
            and 0 <= requests <= ceilings[0]
            and 0 <= tokens <= ceilings[1]
            and 0 <= cost <= ceilings[2]
        ):
            # The common case: valid ints within every limit. A Demand is a tuple,
            # built here without its (slower) generated constructor.
            demand: Demand = tuple.__new__(Demand, asked)
        else:
            demand = Demand(
                check_amount("requests", requests),
                check_amount("tokens", tokens),
                check_amount("cost", cost),
            )
            self._limiter._check_fits(demand)
        self._demand = demand
        return demand

    def _try_local(self) -> bool | Refusal:
        """Admit synchronously when the backend is in memory and nobody waits.

        True when admitted; the refusal when the memory backend refused; False
        when it was not asked (a shared backend, or callers already waiting).
        """
        limiter = self._limiter
        local = limiter._local
        if local is None or limiter._queue:
            return False
        demand = self._demand or self._validate()
        outcome = local.reserve_now(limiter._limits, demand, limiter._clock.now())
        if outcome.__class__ is Refusal:
            return outcome
        self._grant = outcome
        return True

    async def _acquire(self, tried: bool | Refusal = False) -> Permit:
        """Acquire; `tried` is what `_try_local` already answered, if it was asked."""
        if self._grant is not None:
            raise PermitError(
                "this permit was already used; call limiter.acquire() once for each call"
            )
        timeout = self._timeout
        if timeout is not None:
            timeout = check_amount("timeout", timeout)
            tried = False  # the fast path was skipped: a deadline is checked first
        if tried is False:
            tried = self._try_local()
        if tried is not True:
            demand = self._demand or self._validate()
            refusal = tried if isinstance(tried, Refusal) else None
            self._grant = await self._limiter._reserve(demand, timeout, refusal, self._priority)
        return self

    def __await__(self) -> Generator[Any, None, Permit]:
        return self._acquire().__await__()

    async def __aenter__(self) -> Permit:
        # The uncontended in-memory path admits without suspending (the call inside
        # the block is where the task yields); anything else goes through _acquire.
        if self._grant is None and self._timeout is None:
            tried = self._try_local()
            if tried is True:
                return self
            return await self._acquire(tried)
        return await self._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finish_local(self._actual or self._demand):
            await self.release()

    def __del__(self) -> None:
        # A granted permit dropped without release: give its slot back (memory) or
        # let its lease lapse (shared backends), and say so.
        if self._grant is not None and not self._released:
            warnings.warn(
                "a ratekit permit was garbage-collected without release(); use "
                "'async with limiter.acquire(...)' or await permit.release()",
                ResourceWarning,
                stacklevel=1,
            )
            self._finish_local(self._actual or self._demand)

    @property
    def demand(self) -> Demand:
        """What was admitted (the estimates)."""
        if self._grant is None or self._demand is None:
            raise PermitError("this permit has not been acquired")
        return self._demand

    @property
    def usage(self) -> Demand:
        """What the release records: the settled usage, or the estimates if not settled."""
        return self._actual or self.demand

    @property
    def granted(self) -> bool:
        """Whether the permit holds an admission not yet released."""
        return self._grant is not None and not self._released

    def settle(self, *, tokens: float | None = None, cost: float | None = None) -> None:
        """Record the call's real usage; applied when the permit is released.

        `tokens` and `cost` default to the estimates. Settling twice is an error.
        How the real usage counts depends on the provider's token counting: under
        "reserve" the reservation stands whatever the usage; under "usage" the
        real amount counts from the release; under "safe" the larger of the two.
        """
        estimate = self._demand
        if self._grant is None or estimate is None or self._released:
            raise PermitError("settle needs an acquired permit that is not yet released")
        if self._actual is not None:
            raise PermitError("this permit is already settled")
        self._actual = Demand(
            estimate.requests,
            estimate.tokens if tokens is None else _amount("settle tokens", tokens),
            estimate.cost if cost is None else _amount("settle cost", cost),
        )

    async def refund(self) -> None:
        """Release the permit handing everything back: for a call that was never sent."""
        if self._grant is None:
            raise PermitError("this permit has not been acquired")
        if self._actual is not None:
            raise PermitError("a settled permit cannot be refunded")
        if not self._finish_local(None):
            await self._finish(None)

    async def release(self) -> None:
        """Free the concurrency slot and record the usage (settled, or the estimates).

        Idempotent: only the first call does anything. Shielded from cancellation,
        so the slot is always given back.
        """
        if self._grant is None:
            raise PermitError("this permit has not been acquired")
        actual = self._actual or self._demand
        if not self._finish_local(actual):
            await self._finish(actual)

    def release_nowait(self) -> bool:
        """Release at once, without awaiting, where the backend allows it (memory).

        Returns False for a shared backend: release it with `release`, or its lease
        lapses. For finalisers and synchronous cleanup.
        """
        if self._grant is None:
            return True
        return self._finish_local(self._actual or self._demand)

    def _finish_local(self, actual: Demand | None) -> bool:
        """Release synchronously on the memory backend; False when the backend is remote.

        Being synchronous, no cancellation can come between the admission's end
        and the slot's return.
        """
        limiter = self._limiter
        local = limiter._local
        if local is None:
            return False
        grant = self._grant
        if grant is not None and not self._released:
            self._released = True
            local.settle_now(grant, actual, limiter._clock.now())  # type: ignore[arg-type]
        return True

    async def _finish(self, actual: Demand | None) -> None:
        grant = self._grant
        if grant is None or self._released:
            return
        self._released = True
        await self._limiter._release(grant, actual)
