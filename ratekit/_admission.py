"""One admission: created by a limiter, held by one call site, released in one place.

An `Admission` is the whole lifetime of one call's permit. The limiter creates
it (`Limiter.acquire`), the call site holds it (``async with``, a wrapped
stream, a transport) and `release` (or `refund`) ends it, once. Every path
that ends an admission goes through `_end`; nothing else gives capacity back.

A holder that drops an admission without ending it is not silently forgiven:
the finalizer warns and hands the release to the limiter's own event loop
(`Limiter._hand_back`), so no shared state is touched from the garbage
collector.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from ._errors import InvalidArgumentError, InvalidCostError, PermitError
from ._limits import MAX_AMOUNT, Amount, check_amount
from .backends._base import Demand, Grant, Refusal

if TYPE_CHECKING:
    from ._limiter import Limiter


# The states of an admission, in the only order they are gone through.
_NEW: Final = 0  # created, not yet asked for
_ACQUIRING: Final = 1  # one task is waiting for it
_GRANTED: Final = 2  # admitted and held
_ENDED: Final = 3  # released or refunded: its capacity is back with the limiter


def _amount(where: str, value: Amount) -> float:
    # The common case (a plain number in range) without the full check's cost.
    if (type(value) is int or type(value) is float) and 0 <= value <= MAX_AMOUNT:
        return value
    return check_amount(where, value)


def check_priority(priority: object) -> int:
    """`priority` as given to an acquire: an int (bool is not one)."""
    if type(priority) is int:
        return priority
    if isinstance(priority, int) and not isinstance(priority, bool):
        return int(priority)
    raise InvalidArgumentError(f"priority must be an int, got {priority!r}")


def check_timeout(timeout: object) -> float | None:
    """`timeout` as given to an acquire: None (no bound) or finite seconds >= 0; else
    `InvalidArgumentError` (a timeout is an argument, not an amount)."""
    if timeout is None:
        return None
    try:
        return check_amount("timeout", timeout)
    except InvalidCostError as exc:
        raise InvalidArgumentError(str(exc)) from None


class Admission:
    """One call's admission over every dimension: acquired once, ended exactly once.

    Use as ``async with limiter.acquire(tokens=n) as admission:`` (ended when the
    block ends), or ``admission = await limiter.acquire(...)`` followed by
    ``await admission.release()`` in a ``finally``.

    Call `settle` with the real usage once the response says it. An admission
    ended without `settle` counts its estimates, the conservative choice for a
    call that may have reached the provider; `refund` hands everything back for
    a call that never did. One task holds it: awaiting it from a second task is
    an error, not a second grant.
    """

    __slots__ = (
        "_actual",
        "_demand",
        "_enterable",
        "_grant",
        "_limiter",
        "_priority",
        "_state",
        "_timeout",
        "admitted_at_s",
        "tenant",
    )

    def __init__(
        self,
        limiter: Limiter,
        demand: Demand,
        timeout: float | None,
        priority: int,
        tenant: str | None = None,
    ) -> None:
        self._limiter = limiter
        # What is asked for: validated by the limiter when it created the admission.
        self._demand = demand
        self._timeout = timeout
        self._priority = priority
        # The tenant whose share of the account it takes (None: none).
        self.tenant = tenant
        self._grant: Grant | None = None
        # What to record at the end: None = the estimates, a Demand = settled usage.
        self._actual: Demand | None = None
        self._state = _NEW
        # When the scheduler saw it granted (its clock's monotonic seconds); NaN: unknown.
        self.admitted_at_s = math.nan

    # -- acquiring -------------------------------------------------------------------

    def _start(self) -> None:
        if self._state != _NEW:
            raise PermitError(
                "this admission was already used; call limiter.acquire() once for each "
                "call, and await or enter each admission in one task only"
            )
        self._state = _ACQUIRING

    def _try_now(self) -> bool | Refusal:
        """Admit synchronously when the limiter can (memory backend, nobody waiting).

        True when admitted; the refusal when the memory backend refused; False when
        it was not asked.
        """
        outcome = self._limiter._reserve_now(self._demand, self.tenant)
        if outcome is None:
            return False
        if type(outcome) is Refusal:
            return outcome
        self._grant = outcome
        self._state = _GRANTED
        return True

    async def _acquire(self, tried: bool | Refusal) -> Admission:
        """Wait for the grant; `tried` is what `_try_now` already answered, if asked."""
        try:
            refusal = tried if isinstance(tried, Refusal) else None
            grant = await self._limiter._reserve(
                self._demand, self._timeout, refusal, self._priority, self.tenant
            )
        except BaseException:
            self._state = _NEW  # refused, timed out or cancelled: nothing is held
            raise
        self._grant = grant
        self._state = _GRANTED
        self._limiter._granted(self)
        return self

    def __await__(self) -> Generator[Any, None, Admission]:
        self._start()
        tried: bool | Refusal = False
        if self._timeout is None:
            tried = self._try_now()
            if tried is True:
                return self._done().__await__()
        return self._acquire(tried).__await__()

    async def _done(self) -> Admission:
        return self

    async def __aenter__(self) -> Admission:
        # The uncontended in-memory path admits without suspending (the call inside
        # the block is where the task yields); anything else waits in the limiter.
        # `_start` and `_try_now`, inlined: this is the hot path of every call.
        if self._state != _NEW:
            # Granted by `try_acquire` (which alone sets `_enterable`, so that the hot path
            # never sets it): one block may hold it and end it. Any other admission is
            # entered once, from new: a second entry (another task's, or nested) raises.
            if self._state == _GRANTED and getattr(self, "_enterable", False):
                self._enterable = False
                return self
            self._start()  # raises
        self._state = _ACQUIRING
        if self._timeout is None:
            outcome = self._limiter._reserve_now(self._demand, self.tenant)
            if outcome is None:
                return await self._acquire(False)
            if type(outcome) is Refusal:
                assert isinstance(outcome, Refusal)
                return await self._acquire(outcome)
            self._grant = outcome
            self._state = _GRANTED
            return self
        return await self._acquire(False)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # `release`, without its two nested coroutines when the end is synchronous
        # (and `_end_here` inlined).
        state = self._state
        if state == _ENDED:
            return
        actual = self._actual or self._demand
        if state != _GRANTED:
            self._end_here(actual)  # raises
        self._state = _ENDED
        grant = self._grant
        self._grant = None
        limiter = self._limiter
        if not limiter._settle_now(grant, actual):
            await limiter._settle(grant, actual)

    # -- holding ---------------------------------------------------------------------

    @property
    def demand(self) -> Demand:
        """What was asked for and admitted (the estimates)."""
        return self._demand

    @property
    def usage(self) -> Demand:
        """What the end records: the settled usage, or the estimates if not settled."""
        return self._actual or self._demand

    @property
    def granted(self) -> bool:
        """Whether the admission is held (granted and not yet ended)."""
        return self._state == _GRANTED

    def settle(
        self,
        *,
        tokens: Amount | None = None,
        cost: Amount | None = None,
        counted_tokens: Amount | None = None,
    ) -> None:
        """Record the call's real usage; applied when the admission ends.

        `tokens` and `cost` default to the estimates. Settling twice is an error.
        How the real usage counts depends on the provider's token counting: under
        "reserve" the reservation stands whatever the usage; under "usage" the
        real amount counts from the end; under "safe" the larger of the two.

        `counted_tokens` is what the provider reserved for the call at its arrival,
        when the answer tells (its own count of the prompt plus the request's output
        cap): under "reserve" and "safe" it stands instead of ratekit's estimate, so
        that an estimate made too large (or too small) counts as the provider
        counted it.
        """
        if self._state != _GRANTED:
            raise PermitError("settle needs a granted admission that has not ended")
        if self._actual is not None:
            raise PermitError("this admission is already settled")
        estimate = self._demand
        if tokens is None:
            tokens = estimate[1]
        elif (type(tokens) is not int and type(tokens) is not float) or not (
            0 <= tokens <= MAX_AMOUNT
        ):
            tokens = _amount("settle tokens", tokens)  # `_amount`'s common case inlined
        # A tuple built directly: the generated constructor of a Demand is slower.
        self._actual = tuple.__new__(
            Demand,
            (
                estimate[0],
                tokens,
                estimate[2] if cost is None else _amount("settle cost", cost),
                math.nan
                if counted_tokens is None
                else _amount("settle counted_tokens", counted_tokens),
            ),
        )

    async def sent(self) -> None:
        """Say that the request leaves the process now: what the admission counted is
        counted from now on, as the provider counts it from its arrival.

        An admission never said sent counts from its end instead (its request had
        arrived by then at the latest), holding its share of the window for the
        call's duration; a call that outlasts the period counts from its admission
        until then, which misses a request that left more than a slice after it.
        Wrapped clients and `RateLimitedTransport` call it once the request's body
        has been written; call it yourself as your request leaves. Does nothing for
        an admission not held.
        """
        if self._state == _GRANTED:
            grant = self._grant
            kept = await self._limiter._restamp(grant)
            if self._grant is grant:  # still held (a shared backend's restamp awaits)
                self._grant = kept

    # -- ending: the one way out ---------------------------------------------------------

    async def release(self) -> None:
        """End the admission: free the concurrency slot and record the usage (settled, or
        the estimates). Idempotent: only the first end counts. Shielded from
        cancellation, so the capacity always comes back."""
        if self._state == _ENDED:
            return
        await self._end(self._actual or self._demand)

    async def refund(self) -> None:
        """End the admission handing everything back: for a call that was never sent."""
        if self._actual is not None:
            raise PermitError("a settled admission cannot be refunded")
        if self._state == _ENDED:
            raise PermitError("this admission has already ended")
        await self._end(None)

    async def _end(self, actual: Demand | None) -> None:
        grant = self._end_here(actual)
        if grant is not None:
            await self._limiter._settle(grant, actual)

    def _end_here(self, actual: Demand | None) -> Grant | None:
        """Mark the admission ended and end its grant here when the limiter can do so
        synchronously (in process); else return the grant, still to be settled (awaited
        by the caller, which is `_end` or leaving ``async with``)."""
        if self._state != _GRANTED:
            raise PermitError("this admission has not been acquired")
        self._state = _ENDED
        grant = self._grant
        self._grant = None
        if self._limiter._settle_now(grant, actual):
            return None
        return grant

    def __del__(self) -> None:
        # Dropped while held: say so, and let the limiter's loop end it (never here).
        if self._state == _GRANTED:
            self._state = _ENDED
            warnings.warn(
                "a ratekit admission was dropped without release(); use 'async with "
                "limiter.acquire(...)' or await admission.release() in a finally. Its "
                "capacity is handed back on the limiter's event loop.",
                ResourceWarning,
                stacklevel=1,
            )
            self._limiter._hand_back(self._grant, self._actual or self._demand)

    def __repr__(self) -> str:
        states = ("new", "acquiring", "granted", "ended")
        return f"<Admission {states[self._state]} {self._demand}>"
