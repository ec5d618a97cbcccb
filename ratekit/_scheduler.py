"""The scheduler: admits or queues calls against an account's current tier, and answers 429s."""

from __future__ import annotations

import inspect
import logging
import math
import random
import statistics as stats
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ._account import ACCOUNT_GROUP, Account
from ._admission import Admission, check_priority, check_timeout
from ._calibration import Calibration, EstimateStatistics
from ._clock import Clock, SystemClock
from ._errors import BackendUnavailableError, InvalidArgumentError, LimitsError, PermitError
from ._events import (
    Admitted,
    Cooldown,
    Event,
    Hook,
    LimitsAdapted,
    Queued,
    RateLimited,
    Settled,
    TierChanged,
)
from ._limiter import Limiter
from ._limits import MIN_LIMIT, Limits, check_amount
from ._profiles import Tier
from ._queue import WaitQueue
from ._signals import parse_provider_limits
from ._tenants import Tenant, Tenants, current_tenant
from .backends._base import Backend, Refusal, SharedAccount
from .backends.memory import MemoryBackend

_log = logging.getLogger("ratekit")

T = TypeVar("T")

# Adapting to a provider below its table: each 429 that comes while ratekit kept to
# the limits scales them by this, down to the floor; a clean period gives back a step.
_ADAPT_DOWN = 0.8
_ADAPT_FLOOR = 0.1
_ADAPT_UP = 0.1
# The cooldown after a 429 that names no wait, doubling while 429s keep coming.
_DEFAULT_COOLDOWN_S = 1.0
_MAX_COOLDOWN_S = 60.0
# The longest pause a provider's Retry-After may impose (a day): beyond, a typo or garbage.
_MAX_PAUSE_S = 86_400.0
# Wait samples kept per priority for the percentiles.
_SAMPLES = 10_000
# The most tries `max_attempts` may ask for: a bound, so that no 429 is retried for ever.
_MAX_ATTEMPTS = 100


class RateLimitSignalLike(Protocol):
    """What the scheduler needs of a classified 429 (see `ratekit._signals`)."""

    @property
    def retry_after_s(self) -> float | None: ...

    @property
    def retryable(self) -> bool: ...

    @property
    def message(self) -> str: ...


Classifier = Callable[[BaseException], RateLimitSignalLike | None]


def _default_classifier(clock: Clock) -> Classifier:
    from ._signals import classify

    # Providers' reset headers are absolute Unix times: the one use of the wall clock here.
    return lambda error: classify(error, now_s=clock.wall())


def _check_attempts(max_attempts: object) -> int:
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= _MAX_ATTEMPTS
    ):
        raise InvalidArgumentError(
            f"Scheduler.max_attempts must be an int in [1, {_MAX_ATTEMPTS}], got {max_attempts!r}"
        )
    return max_attempts


@dataclass(frozen=True, slots=True)
class PriorityStatistics:
    """Waits of one priority: admitted calls and their wait percentiles (seconds)."""

    admitted: int
    waiting: int
    wait_p50_s: float
    wait_p99_s: float


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """A snapshot of a scheduler.

    `utilisation` is, per limiter group and dimension, used / limit now.
    `factors` are, per group, the share of the tier's limits in force after 429s
    within the limits (1.0: the tier's numbers). `reported` are, per group, the
    provider's own per-minute numbers from its rate-limit headers where they are
    lower than the tier's and so in force (`observe`), by unit ("requests",
    "tokens").
    `estimates` says per model how far prompt estimates were from the provider's
    counts and what they are scaled by now (`Scheduler.estimates`).
    """

    tier: str
    queued: int
    admitted: int
    rate_limited: int
    cooldowns: int
    priorities: dict[int, PriorityStatistics] = field(default_factory=dict)
    utilisation: dict[str, dict[str, float]] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    estimates: dict[str, EstimateStatistics] = field(default_factory=dict)
    reported: dict[str, dict[str, float]] = field(default_factory=dict)


# The units a provider's rate-limit headers report, and the field of Limits each caps.
_HEADER_FIELDS = (("requests", "rpm"), ("tokens", "tpm"))


class _Group:
    """One limiter of the account (the account's own, or a model's with limits of its own)."""

    __slots__ = (
        "cooldown_s",
        "factor",
        "header_limits",
        "last_429_s",
        "last_step_s",
        "limiter",
        "version",
    )

    def __init__(self, limiter: Limiter, version: int) -> None:
        self.limiter = limiter
        self.version = version
        # Share of the tier's limits in force (below 1 after repeated 429s).
        self.factor = 1.0
        self.last_429_s = -math.inf
        self.last_step_s = -math.inf
        # The cooldown given to the last 429 that named no wait.
        self.cooldown_s = _DEFAULT_COOLDOWN_S
        # The rpm ("requests") and tpm ("tokens") the provider's own headers report, per
        # unit, where below the tier's (absent: the tier's).
        self.header_limits: dict[str, float] = {}


class Scheduler:
    """Admits or queues LLM calls against an account's current tier.

    `submit(fn, ...)` runs one call when the limits allow, retries it when the
    provider answers 429, and returns its result; `slot(...)` is the same
    admission as an ``async with`` block around your own call. Calls of models
    with limits of their own (MiniMax) go through their own limiter.

    `backend`: where usage is kept; a `RedisBackend` shares the account with
    other pods (a model's own limits get a namespace of their own). Waiting
    callers are served by `priority`, with `lower_share` of admissions kept for
    lower priorities; at most `max_queue` wait per limiter. `hooks` receive every
    event (see `ratekit.LoggingHook`). A 429 pauses the whole account (every pod,
    through Redis) for the provider's Retry-After; 429s that keep coming lower
    the effective limits, which recover a step per clean period.
    """

    def __init__(
        self,
        account: Account,
        *,
        backend: Backend | None = None,
        clock: Clock | None = None,
        max_queue: int | None = None,
        lower_share: float = 0.1,
        hooks: Sequence[Hook] = (),
        max_attempts: int = 5,
        adapt: bool = True,
        classify: Classifier | None = None,
        tenants: Tenants | Mapping[str, Tenant] | None = None,
    ) -> None:
        if not isinstance(account, Account):
            raise InvalidArgumentError(
                f"Scheduler: account must be a ratekit.Account (e.g. Account('moonshot', "
                f"tier='tier1')), got {account!r}"
            )
        if backend is not None and not isinstance(backend, Backend):
            raise InvalidArgumentError(
                f"Scheduler.backend must be a ratekit backend (MemoryBackend, RedisBackend) "
                f"or None, got {backend!r}"
            )
        if isinstance(hooks, str | bytes) or not all(callable(hook) for hook in hooks):
            raise InvalidArgumentError(f"Scheduler.hooks must be callables, got {hooks!r}")
        if classify is not None and not callable(classify):
            raise InvalidArgumentError(f"Scheduler.classify must be callable, got {classify!r}")
        if clock is not None and not all(
            callable(getattr(clock, name, None)) for name in ("now", "wall", "wait")
        ):
            raise InvalidArgumentError(f"Scheduler.clock must be a ratekit Clock, got {clock!r}")
        if not isinstance(adapt, bool):
            raise InvalidArgumentError(f"Scheduler.adapt must be a bool, got {adapt!r}")
        # The same checks as each limiter's queue makes, made now rather than at the first call.
        try:
            WaitQueue(lower_share=lower_share, max_size=max_queue)
        except LimitsError as error:
            raise LimitsError(f"Scheduler: {error}") from None
        tenants = Tenants.of(tenants) or Tenants()
        # Shared by every limiter of the account: a tenant's limits span its models (kept
        # in this process with the memory backend, in the store with a shared one).
        self.tenants = tenants
        self.account = account
        # The account's name in a pool (`ratekit.Pool` names it): its events carry it.
        self.account_name: str | None = None
        # The one clock of every limiter of this scheduler.
        self._clock: Clock = clock or SystemClock()
        self._backend = backend
        self._max_queue = max_queue
        self._lower_share = lower_share
        # A tuple: a hook added while events are told is told from the next one.
        self._hooks: tuple[Hook, ...] = tuple(hooks)
        self._max_attempts = _check_attempts(max_attempts)
        self._adapt = adapt
        self._classify = classify
        self._groups: dict[str, _Group] = {}
        self._admitted = 0
        self._queued = 0
        self._rate_limited = 0
        self._cooldowns = 0
        self._waits: dict[int, deque[float]] = {}
        self._admitted_by_priority: dict[int, int] = {}
        # A shared backend carries tier changes and learned estimates between pods.
        self._shared = backend if isinstance(backend, SharedAccount) else None
        # What prompt estimates are scaled by, learned from the provider's counts.
        self.estimates = Calibration(None if self._shared is None else self._share_estimates)
        account.on_change(self._tier_changed)
        # The event loop this scheduler runs in, for calls from other threads.
        self.loop_token: anyio.lowlevel.EventLoopToken | None = None
        # Set when the SyncScheduler that ran this loop closed it (see `SyncScheduler`).
        self.sync_closed = False
        self._tier_synced = self._shared is None
        # Set when the read of the fleet's tier under way (None: none) ends: callers
        # gathered before the first admission wait for that one read.
        self._tier_read: anyio.Event | None = None
        if self._shared is not None:
            self._shared.on_tier(self._tier_published)

    def _share_estimates(self, factors: dict[str, float]) -> None:
        assert self._shared is not None
        self._shared.share_estimates(factors, self.estimates.fleet_learned)

    # -- limiters per group ---------------------------------------------------------

    def _backend_for(self, group: str) -> Backend:
        backend = self._backend
        if group == ACCOUNT_GROUP and backend is not None:
            return backend
        if self._shared is not None:
            return self._shared.child(group)
        return MemoryBackend()

    def _group(self, model: str | None) -> _Group:
        name = self.account.group(model)
        group = self._groups.get(name)
        if group is None:
            backend = self._backend_for(name)
            limiter = Limiter(
                self.account.limits(model),
                backend=backend,
                clock=self._clock,
                max_queue=self._max_queue,
                lower_share=self._lower_share,
                tenants=self.tenants,
            )
            group = self._groups[name] = _Group(limiter, self.account.version)
        elif group.version != self.account.version:
            group.version = self.account.version
            self._apply(group, model)
        self._recover(name, group, model)
        return group

    def _apply(self, group: _Group, model: str | None) -> None:
        """Put in force the tier's limits, rpm and tpm no higher than the provider's headers
        report, all times the adapted factor (429s lower what is in force, whichever number
        it came from)."""
        tier = self.account.limits(model)
        limits = tier.scaled(group.factor)
        changes = {}
        for unit, field_name in _HEADER_FIELDS:
            reported = group.header_limits.get(unit)
            value = getattr(tier, field_name)
            if reported is not None and value is not None and reported < value:
                changes[field_name] = max(reported * group.factor, MIN_LIMIT)
        group.limiter.limits = limits.replace(**changes) if changes else limits

    def limiter(self, model: str | None = None) -> Limiter:
        """The limiter calls of `model` go through (None: the account's)."""
        return self._group(model).limiter

    async def set_tier(self, name: str) -> Tier:
        """Move the account to tier `name`, in every pod sharing a Redis backend."""
        tier = self.account.set_tier(name)
        await self._publish_tier()
        return tier

    async def add_top_up(self, amount: float) -> Tier:
        """Add a top-up; the tier it unlocks applies in every pod sharing a Redis backend."""
        before = self.account.tier
        tier = self.account.add_top_up(amount)
        if tier is not before:
            await self._publish_tier()
        return tier

    async def _publish_tier(self) -> None:
        if self._shared is not None:
            await self._shared.publish_tier(self.account.tier.name)

    def _tier_published(self, name: str) -> None:
        if name.casefold() != self.account.tier.name.casefold():
            self.account.set_tier(name)

    async def _sync_tier(self, timeout_s: float | None = None) -> None:
        """Adopt the tier other pods agreed on, once, before the first admission; with
        the store down, or not answering within the caller's `timeout_s`, at a later
        call (the admission itself follows the store's policy and the timeout)."""
        shared = self._shared
        if shared is None:
            self._tier_synced = True
            return
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            while not self._tier_synced:
                read = self._tier_read
                if read is not None:
                    # Another caller reads it: that read serves every caller gathered
                    # meanwhile; one that ended without the tier (its caller left, or
                    # its deadline came) is made again by a caller still here.
                    await read.wait()
                    continue
                read = self._tier_read = anyio.Event()
                try:
                    try:
                        name = await shared.shared_tier()
                    except BackendUnavailableError:
                        return
                    if name is not None:
                        self._tier_published(name)
                    self._tier_synced = True
                finally:
                    self._tier_read = None
                    read.set()

    def _tier_changed(self, old: Tier, new: Tier) -> None:
        # Applied now, so that callers already waiting see the new tier at once.
        for name, group in self._groups.items():
            group.version = self.account.version
            self._apply(group, None if name == ACCOUNT_GROUP else name)
        self._emit(TierChanged(old.name, new.name))

    # -- admission --------------------------------------------------------------------

    def slot(
        self,
        *,
        tokens: float = 0,
        cost: float = 0,
        model: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> Slot:
        """An admission for one call, as ``async with scheduler.slot(...) as admission:``.

        `tokens` is the estimate (prompt + max output) and `cost` the money
        estimate; settle the real usage with ``admission.settle(...)``. When the
        block ends the admission is released first; a 429 raised inside the block
        is then answered (cooldown, adaptation) and re-raised. `tenant` names the
        tenant whose share the call takes (default: the one of `ratekit.tenant`'s
        block, else none).
        """
        return Slot(self, tokens, cost, model, priority, timeout, tenant)

    async def admit(
        self,
        *,
        tokens: float = 0,
        cost: float = 0,
        model: str | None = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - a predicted wait fails at once
        tenant: str | None = None,
    ) -> Admission:
        """Wait for and return a granted admission of one call (see `slot`).

        For call sites that hold an admission beyond one block (a stream, a
        transport): end it with `finish` exactly once, on every path.
        """
        limiter = self._group(model).limiter
        if tenant is None:
            tenant = current_tenant()
        admission = limiter.acquire(
            tokens=tokens, cost=cost, timeout=timeout, priority=priority, tenant=tenant
        )
        if self.loop_token is None and not self.sync_closed:
            self.loop_token = anyio.lowlevel.current_token()
        if not self._tier_synced:
            await self._sync_tier(timeout)
        self._emit(Queued(model, priority, tokens, admission.tenant))
        started = self._clock.now()
        await admission
        admission.admitted_at_s = admitted_s = self._clock.now()
        waited_s = admitted_s - started
        self._record_wait(priority, waited_s)
        self._emit(Admitted(model, priority, waited_s, admission.tenant, self.account_name))
        return admission

    async def offer(
        self,
        *,
        tokens: float = 0,
        cost: float = 0,
        model: str | None = None,
        tenant: str | None = None,
    ) -> Admission | Refusal | None:
        """Admit one call now or not at all: the granted admission (end it with `finish`),
        the refusal (its `wait_s` says when the same call would fit), or None when callers
        of this scheduler already wait for that limiter (they go first).

        What a pool of accounts asks each account (see `ratekit.Pool`); bad amounts
        raise as in `admit`. The admission counts in `statistics` once `admitted` says how
        long it waited.
        """
        limiter = self._group(model).limiter
        if tenant is None:
            tenant = current_tenant()
        demand = limiter._demand(1, tokens, cost)
        if self.loop_token is None and not self.sync_closed:
            self.loop_token = anyio.lowlevel.current_token()
        if not self._tier_synced:
            await self._sync_tier()
        return await limiter._offer(demand, tenant)

    def admitted(
        self, admission: Admission, model: str | None, priority: int, waited_s: float
    ) -> None:
        """Count `admission`, granted by `offer` after `waited_s` seconds of waiting
        elsewhere (a pool's queue), as `admit` counts its own."""
        admission.admitted_at_s = self._clock.now()
        self._record_wait(priority, waited_s)
        self._emit(Admitted(model, priority, waited_s, admission.tenant, self.account_name))

    async def finish(
        self,
        admission: Admission,
        error: BaseException | None = None,
        *,
        model: str | None = None,
    ) -> None:
        """End a call admitted by `admit`: release the admission, then answer `error`.

        The release comes first, in a ``finally`` and shielded, so that nothing
        after it (a classifier, the 429 policy, a hook) can keep the capacity.
        When `error` is a provider's rate-limit answer, the account is then paused
        and adapted (see `rate_limited`). Events: `Settled` after the release.
        Idempotent for the release; call it once per admission.
        """
        granted = admission.granted
        await admission.release()  # first: nothing below can keep the capacity
        if error is not None and not isinstance(error, anyio.get_cancelled_exc_class()):
            signal = self._signal(error)
            if signal is not None:
                with anyio.CancelScope(shield=True):
                    await self.rate_limited(model, signal, admitted_at_s=admission.admitted_at_s)
        if granted:
            usage = admission.usage
            self._emit(
                Settled(model, usage.tokens, usage.cost, admission.tenant, self.account_name)
            )

    async def submit(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        tokens: float = 0,
        cost: float = 0,
        model: str | None = None,
        priority: int = 0,
        # A predicted wait fails at once, which a cancel scope (fail_after) cannot do.
        timeout: float | None = None,  # noqa: ASYNC109
        usage: Callable[[T], float | None] | None = None,
        tenant: str | None = None,
    ) -> T:
        """Run ``await fn(*args)`` when admitted, retrying on 429; return its result.

        Keyword arguments belong to the scheduler; give the call's own with a
        lambda or `functools.partial` (``submit(lambda: client.create(model=m, ...),
        model=m, tokens=n)``), so that names like `model` and `timeout` never clash.

        `usage`, if given, reads the real token count from the result for the
        settle. `timeout` bounds the whole wait for admissions (seconds); a wait
        predicted to be longer fails at once with `AcquireTimeout`. Up to
        `max_attempts` tries, each a new admission; the last 429 is re-raised.
        """
        if not callable(fn):
            raise InvalidArgumentError(f"Scheduler.submit: fn must be callable, got {fn!r}")
        timeout = check_timeout(timeout)
        check_priority(priority)
        check_amount("tokens", tokens)
        check_amount("cost", cost)
        deadline_s = None if timeout is None else self._clock.now() + timeout
        async for attempt in self.retrying():
            with attempt:
                left = None if deadline_s is None else max(deadline_s - self._clock.now(), 0.0)
                async with self.slot(
                    tokens=tokens,
                    cost=cost,
                    model=model,
                    priority=priority,
                    timeout=left,
                    tenant=tenant,
                ) as admission:
                    awaitable = fn(*args)
                    if not inspect.isawaitable(awaitable):
                        raise InvalidArgumentError(
                            "Scheduler.submit: fn must return an awaitable (an async "
                            f"function, or a lambda calling one), got {awaitable!r}"
                        )
                    result = await awaitable
                    real = usage(result) if usage is not None else None
                    if real is not None:
                        admission.settle(tokens=real)
                return result
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def retrying(self) -> AsyncRetrying:
        """The retry policy of `submit`, for calls made another way::

            async for attempt in scheduler.retrying():
                with attempt:
                    async with scheduler.slot(...) as permit:
                        ...

        Retries what the classifier calls a retryable rate-limit answer, up to
        `max_attempts` tries, re-raising the last error.
        """
        return AsyncRetrying(**self.retry_policy(), sleep=self._sleep)

    def retry_policy(self) -> dict[str, Any]:
        """The retry policy as tenacity arguments (stop, retry, wait, reraise), shared by
        the async and the sync call sites."""
        return {
            "stop": stop_after_attempt(self._max_attempts),
            "retry": retry_if_exception(self._is_retryable),
            "wait": self._retry_wait,
            "reraise": True,
        }

    def limit(
        self,
        *,
        tokens: float | Callable[..., float] = 0,
        cost: float | Callable[..., float] = 0,
        model: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        usage: Callable[[Any], float | None] | None = None,
        tenant: str | Callable[..., str | None] | None = None,
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator admitting every call of an async (or sync) function; `tokens` and
        `cost` are numbers or functions of the call's arguments, `tenant` a name or a
        function of them that gives one (None: the tenant of the caller's
        `ratekit.tenant` block). See `ratekit.limit`."""
        from .integrations._calls import limit

        return limit(
            self,
            tokens=tokens,
            cost=cost,
            model=model,
            priority=priority,
            timeout=timeout,
            usage=usage,
            tenant=tenant,
        )

    def _is_retryable(self, error: BaseException) -> bool:
        signal = self._signal(error)
        return signal is not None and signal.retryable

    def _retry_wait(self, state: RetryCallState) -> float:
        # The cooldown already holds every caller back; a little jitter keeps the
        # retries of many callers from arriving in one burst.
        return random.uniform(0.0, 0.05 * state.attempt_number)

    async def _sleep(self, seconds: float) -> None:
        await self._clock.wait(anyio.Event(), seconds)

    def _signal(self, error: BaseException) -> RateLimitSignalLike | None:
        """The classifier's reading of `error`; a classifier that raises reads as None
        (and is logged): it never breaks a call or keeps an admission."""
        if self._classify is None:
            self._classify = _default_classifier(self._clock)
        try:
            return self._classify(error)
        except Exception:
            _log.exception("ratekit: the 429 classifier raised on %r; treated as no 429", error)
            return None

    # -- 429s -------------------------------------------------------------------------

    async def rate_limited(
        self,
        model: str | None,
        signal: RateLimitSignalLike,
        *,
        admitted_at_s: float | None = None,
    ) -> None:
        """Answer a provider's 429: pause the account, and adapt when 429s keep coming
        (not for an overloaded provider's 529, see `RateLimitSignal.overloaded`).

        `admitted_at_s` is when the refused call was admitted (default: now). The
        429s of calls admitted before the previous 429 was seen are one burst: they
        adapt the limits once, not once each.
        """
        self._rate_limited += 1
        self._emit(RateLimited(model, signal.retry_after_s, signal.message))
        name = self.account.group(model)
        group = self._group(model)
        now = self._clock.now()
        if admitted_at_s is None or math.isnan(admitted_at_s):
            admitted_at_s = now
        period_s = self._longest_period(group.limiter.limits)
        same_burst = admitted_at_s <= group.last_429_s
        if same_burst:
            # Already paused and adapted for; a longer Retry-After still lengthens the
            # pause (the backend keeps the longer of two).
            if signal.retry_after_s is not None and signal.retry_after_s > 0:
                await self._pause(name, group, signal.retry_after_s)
            return
        repeated = now - group.last_429_s < period_s
        group.last_429_s = now
        if signal.retry_after_s is not None:
            cooldown_s = signal.retry_after_s
        else:
            group.cooldown_s = (
                min(group.cooldown_s * 2, _MAX_COOLDOWN_S) if repeated else (_DEFAULT_COOLDOWN_S)
            )
            cooldown_s = group.cooldown_s
        if cooldown_s > 0:
            await self._pause(name, group, cooldown_s)
        # An overloaded provider (a 529) is busy for everyone: pause, keep the limits.
        overloaded = getattr(signal, "overloaded", False) is True
        if self._adapt and repeated and not overloaded and group.factor > _ADAPT_FLOOR:
            group.factor = max(group.factor * _ADAPT_DOWN, _ADAPT_FLOOR)
            group.last_step_s = now
            self._apply(group, model)
            self._emit(LimitsAdapted(name, group.factor, "429s within the limits"))

    async def _pause(self, name: str, group: _Group, seconds: float) -> None:
        lasts_s = await group.limiter.pause(min(seconds, _MAX_PAUSE_S))
        self._cooldowns += 1
        self._emit(Cooldown(name, lasts_s))

    def _recover(self, name: str, group: _Group, model: str | None) -> None:
        if group.factor >= 1.0:
            return
        now = self._clock.now()
        period_s = self._longest_period(group.limiter.limits)
        if now - max(group.last_429_s, group.last_step_s) >= period_s:
            group.factor = min(group.factor + _ADAPT_UP, 1.0)
            group.last_step_s = now
            self._apply(group, model)
            self._emit(LimitsAdapted(name, group.factor, "a period without 429"))

    @staticmethod
    def _longest_period(limits: Limits) -> float:
        periods = [rate.period_s for rate in limits.all_rates if rate.period_s < 86_400]
        return max(periods, default=60.0)

    def observe(self, headers: Mapping[str, str], *, model: str | None = None) -> None:
        """Read a response's ``x-ratelimit-limit-*`` (or ``anthropic-ratelimit-*-limit``)
        headers: when the provider allows fewer requests or tokens per minute than the
        tier says, run that dimension at the provider's number (the others keep the
        tier's) and report it. A unit the headers do not mention keeps what was seen."""
        reported = parse_provider_limits(headers, now_s=self._clock.wall())
        if reported is None:
            return
        limits = self.account.limits(model)
        group = self._group(model)
        changed: list[tuple[float, str]] = []
        for unit, field_name in _HEADER_FIELDS:
            theirs = reported.unit(unit)
            mine = getattr(limits, field_name)
            if theirs is None or theirs.limit is None or not mine:
                continue
            # A reported 0 would stop the account for good: keep a sliver to recover from.
            number = max(theirs.limit, mine * _ADAPT_FLOOR / 10)
            before = group.header_limits.get(unit)
            if number >= mine:
                if before is not None:
                    del group.header_limits[unit]
                    changed.append((1.0, ""))
            elif number != before:
                group.header_limits[unit] = number
                reason = f"the provider reports {unit} limit {theirs.limit:g}, the tier {mine:g}"
                changed.append((number / mine, reason))
        if changed:
            self._apply(group, model)
            name = self.account.group(model)
            for share, reason in changed:
                if share < 1.0:
                    self._emit(LimitsAdapted(name, share, reason))

    def estimate_cost(
        self,
        model: str,
        *,
        input_tokens: float,
        output_tokens: float,
        cached_input_tokens: float = 0,
        cache_write_tokens: float = 0,
    ) -> float:
        """What a call of `model` costs at most, from the profile's prices (its currency).

        `input_tokens` are the prompt tokens outside the cache; `cached_input_tokens`
        (cache hits) and `cache_write_tokens` are priced at the model's cache prices
        (the input price where it has none). Pass it as ``cost=`` so that a money rate
        (a spend budget) admits it.
        """
        prices = self.account.profile.model(model).prices
        return prices.cost_of_tokens(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            cache_write_tokens=cache_write_tokens,
        )

    # -- observing ----------------------------------------------------------------------

    def add_hook(self, hook: Hook) -> None:
        """Tell `hook` every event from now on too (a metrics collector attached to a
        scheduler that exists already). Adding a hook twice tells it once."""
        if not callable(hook):
            raise InvalidArgumentError(f"Scheduler.add_hook: a hook must be callable, got {hook!r}")
        if hook not in self._hooks:
            self._hooks = (*self._hooks, hook)

    def _emit(self, event: Event) -> None:
        """Tell every hook; a hook that raises is logged and never breaks a call."""
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                _log.exception("ratekit: hook %r raised on %r", hook, event)

    def _record_wait(self, priority: int, waited_s: float) -> None:
        self._admitted += 1
        self._admitted_by_priority[priority] = self._admitted_by_priority.get(priority, 0) + 1
        samples = self._waits.setdefault(priority, deque(maxlen=_SAMPLES))
        samples.append(waited_s)

    async def statistics(self) -> SchedulerStatistics:
        """A frozen snapshot: queue, admissions, waits per priority, utilisation, 429s."""
        utilisation: dict[str, dict[str, float]] = {}
        waiting: dict[int, int] = {}
        # A copy: a group may be made while a snapshot awaits its backend.
        for name, group in list(self._groups.items()):
            snapshot = await group.limiter.statistics()
            utilisation[name] = {
                d.name: (d.used / d.limit if d.limit else 0.0) for d in snapshot.dimensions
            }
            for priority, count in snapshot.waiting_by_priority.items():
                waiting[priority] = waiting.get(priority, 0) + count
        priorities = {}
        for priority in set(self._waits) | set(waiting):
            samples = sorted(self._waits.get(priority, ()))
            priorities[priority] = PriorityStatistics(
                admitted=self._admitted_by_priority.get(priority, 0),
                waiting=waiting.get(priority, 0),
                wait_p50_s=_percentile(samples, 0.50),
                wait_p99_s=_percentile(samples, 0.99),
            )
        return SchedulerStatistics(
            tier=self.account.tier.name,
            queued=sum(waiting.values()),
            admitted=self._admitted,
            rate_limited=self._rate_limited,
            cooldowns=self._cooldowns,
            priorities=priorities,
            utilisation=utilisation,
            factors={name: group.factor for name, group in self._groups.items()},
            estimates=self.estimates.statistics(),
            reported={
                name: dict(group.header_limits)
                for name, group in self._groups.items()
                if group.header_limits
            },
        )


def _percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    if len(samples) == 1:
        return samples[0]
    return stats.quantiles(samples, n=100, method="inclusive")[min(int(q * 100), 99) - 1]


class Slot:
    """One admission through a scheduler, as an ``async with`` block; see `Scheduler.slot`."""

    __slots__ = (
        "_admission",
        "_cost",
        "_model",
        "_priority",
        "_scheduler",
        "_tenant",
        "_timeout",
        "_tokens",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        tokens: float,
        cost: float,
        model: str | None,
        priority: int,
        timeout: float | None,
        tenant: str | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._tenant = tenant
        self._tokens = tokens
        self._cost = cost
        self._model = model
        self._priority = priority
        self._timeout = timeout
        self._admission: Admission | None = None

    @property
    def permit(self) -> Admission | None:
        """The admission once granted."""
        return self._admission

    async def __aenter__(self) -> Admission:
        if self._admission is not None:
            raise PermitError("this slot was already entered; take one slot per call")
        self._admission = await self._scheduler.admit(
            tokens=self._tokens,
            cost=self._cost,
            model=self._model,
            priority=self._priority,
            timeout=self._timeout,
            tenant=self._tenant,
        )
        return self._admission

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        admission = self._admission
        assert admission is not None
        await self._scheduler.finish(admission, exc, model=self._model)
