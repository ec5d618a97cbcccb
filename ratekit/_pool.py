"""A pool: several accounts (keys, relay channels, providers) behind one admission.

Each account keeps its own scheduler: its tier, its limits, its backend (a Redis
namespace of its own, shared with other pods), its 429 cooldown. The pool adds one
queue per model in front of them. The caller at its head asks the accounts that
serve the model, in the pool's order of preference, to admit the call now
(`Scheduler.offer`): each ask is that account's own atomic admission, so nothing
is checked first and taken later. The first account that admits serves the call;
when none does, the head waits for the earliest moment one said it would, or for
capacity freed on any of them.

A 429 pauses only the account that got it (its scheduler's cooldown, shared with
every pod through its backend). A spent quota or balance (a refusal that retrying
cannot help, see `RateLimitSignal.retryable`) takes the account out of the pool for
`out_s` seconds, in every pod: its backend pauses it as "out", so another pod's pool
knows why it refuses. Afterwards one call probes it; the others follow once that
call is answered without a spent quota.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio

from ._admission import Admission, check_priority, check_timeout
from ._clock import SystemClock
from ._errors import (
    AcquireTimeout,
    BackendUnavailableError,
    CostExceedsLimitError,
    InvalidArgumentError,
    PermitError,
    PoolExhaustedError,
    RatekitError,
)
from ._events import AccountOut, Event, Hook, Queued
from ._limits import check_amount, show
from ._queue import Waiter, WaitQueue
from ._scheduler import Scheduler
from .backends._base import OUT, UNAVAILABLE, Refusal, is_forecast

T = TypeVar("T")
# The end of the dimension a pool's wait names when its account's store is down.
_STORE_DOWN = f": {UNAVAILABLE}"

_log = logging.getLogger("ratekit")

PREFERENCES = ("order", "cheapest", "headroom")
"""How a pool orders the accounts it asks: as declared; the lowest price of the model
first (input plus output price, times the account's `discount`); the most headroom
first (the largest free share of the account's tightest limit)."""

_DEFAULT_OUT_S = 300.0
# How soon the head looks again at an account whose own scheduler has callers waiting
# (they go first, and their ends are not announced to the pool).
_BUSY_S = 0.05


def _models_of(where: str, models: object) -> Mapping[str, str] | None:
    if models is None:
        return None
    if isinstance(models, Mapping):
        pairs = dict(models)
    elif isinstance(models, Iterable) and not isinstance(models, str | bytes):
        pairs = {name: name for name in models}
    else:
        raise InvalidArgumentError(
            f"{where} must be None (any model), model names, or a mapping of the pool's "
            f"model names to this account's, got {show(models)}"
        )
    if not pairs:
        raise InvalidArgumentError(
            f"{where} names no model: give None to serve every model, or the models served"
        )
    for key, value in pairs.items():
        if not isinstance(key, str) or not key or not isinstance(value, str) or not value:
            raise InvalidArgumentError(
                f"{where}: model names must be non-empty strs, got {key!r}: {value!r}"
            )
    return pairs


@dataclass(frozen=True, slots=True)
class Member:
    """One account of a pool: its `scheduler` (profile, tier, backend) and, for calls
    sent through the pool, its `client` (an SDK client with its credentials and base
    URL).

    `models`: None serves every model under the name the caller gives; model names
    serve those; a mapping serves its keys, each sent under the account's own name
    (``{"kimi-k2": "moonshotai/kimi-k2"}`` on a relay). `discount` multiplies the
    model's listed prices (a relay channel's discount) for ``prefer="cheapest"``.
    `name` is the pool's key for it.
    """

    scheduler: Scheduler
    client: Any = None
    models: Mapping[str, str] | Iterable[str] | None = None
    discount: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.scheduler, Scheduler):
            raise InvalidArgumentError(
                f"Member.scheduler must be a ratekit.Scheduler, got {show(self.scheduler)}"
            )
        if not isinstance(self.name, str):
            raise InvalidArgumentError(f"Member.name must be a str, got {show(self.name)}")
        object.__setattr__(self, "models", _models_of("Member.models", self.models))
        discount = self.discount
        if (
            isinstance(discount, bool)
            or not isinstance(discount, int | float)
            or not 0 < discount <= 1e6
            or not math.isfinite(discount)
        ):
            raise InvalidArgumentError(
                f"Member.discount must be a number in (0, 1e6], got {show(discount)}"
            )

    def serves(self, model: str | None) -> bool:
        """Whether calls of `model` may go to this account."""
        return model is None or self.models is None or model in self.models

    def model_for(self, model: str | None) -> str | None:
        """The account's own name for the pool's `model`."""
        names = cast("Mapping[str, str] | None", self.models)  # made a mapping at init
        if model is None or names is None:
            return model
        return names[model]

    def price(self, model: str | None) -> float:
        """Input plus output price of `model` per 1M tokens times `discount`; inf when the
        profile does not price it (an unknown price is never taken for the cheapest)."""
        own = self.model_for(model)
        if own is None:
            return math.inf
        profile = self.scheduler.account.profile
        if own.casefold() not in {name.casefold() for name in profile.model_names}:
            return math.inf
        prices = profile.model(own).prices
        if prices.input_per_1m_tokens is None and prices.output_per_1m_tokens is None:
            return math.inf
        listed = (prices.input_per_1m_tokens or 0.0) + (prices.output_per_1m_tokens or 0.0)
        return listed * self.discount


class Served:
    """A call admitted by a pool: the account serving it and its admission.

    Send the call with `client` (the account's client, with the SDK's own retries
    off: each try is one admission) under `model` (the account's name for it), and
    settle it with `settle` as a plain admission.
    """

    __slots__ = ("admission", "client", "member", "model")

    def __init__(self, member: Member, model: str | None, admission: Admission, client: Any):
        self.member = member
        self.model = model
        self.admission = admission
        self.client = client

    @property
    def account(self) -> str:
        """The name of the account serving the call."""
        return self.member.name

    def settle(self, *, tokens: float | None = None, cost: float | None = None) -> None:
        """Record the call's real usage (see `Admission.settle`)."""
        self.admission.settle(tokens=tokens, cost=cost)

    def __repr__(self) -> str:
        return f"Served(account={self.account!r}, model={self.model!r})"


@dataclass(frozen=True, slots=True)
class AccountStatistics:
    """One account of a pool: calls it was given, its rate-limit answers (429, 529), the
    times a spent quota or balance took it out, and, when it is out, for how many more
    seconds. `refused` counts the asks it refused (each a round trip to a shared
    store): asks per call are ``(admitted + refused) / admitted``."""

    admitted: int
    rate_limited: int
    exhausted: int
    out_for_s: float
    refused: int = 0


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool: per account, and how many callers wait."""

    accounts: dict[str, AccountStatistics] = field(default_factory=dict)
    waiting: int = 0


# An account's probe while the ask that claimed it awaits its store (see `Pool._try`).
_CLAIMED: Any = object()


class _Account:
    """What the pool knows of one account besides its scheduler."""

    __slots__ = (
        "admitted",
        "exhausted",
        "out_reason",
        "out_until_s",
        "probe",
        "probing",
        "rate_limited",
        "refused",
    )

    def __init__(self) -> None:
        self.admitted = 0
        self.refused = 0
        self.rate_limited = 0
        self.exhausted = 0
        self.out_until_s = -math.inf
        self.out_reason = ""
        # Once back from out: one call (`probe`, until it is answered) goes there, and
        # the rest only after that call was not refused for a spent quota.
        self.probing = False
        self.probe: Admission | None = None  # or _CLAIMED while its ask is under way


def _quiet(client: Any) -> Any:
    """`client` without the SDK's own retries: each try must be an admission."""
    if client is not None and isinstance(getattr(client, "max_retries", None), int):
        options = getattr(client, "with_options", None)
        if callable(options):
            return options(max_retries=0)
    return client


Ask = Callable[[Member, "str | None"], tuple[float, float]]


class Pool:
    """Several accounts behind one admission; see the module's docstring.

    `members` maps each account's name to a `Member` (or a bare `Scheduler`, which
    serves every model). `prefer` orders the accounts asked: ``"order"`` (as given),
    ``"cheapest"`` (all members priced in one currency) or ``"headroom"`` (each ask
    reads every account's usage first: a round trip each on Redis). `max_attempts`
    bounds the tries of `submit` (each on the best account then). `out_s` is how long
    an account that answered "quota or balance spent" stays out. `hooks` receive the
    pool's events (`Queued`, `AccountOut`) and its accounts' schedulers' (`Admitted`
    and `Settled` name the account: each scheduler is told its name in the pool).
    Callers waiting for a model are served by priority, FIFO within one (`max_queue`,
    `lower_share` as for a `Scheduler`).

    The members' schedulers must share one clock (the first one's is the pool's).
    One event loop, any number of tasks.
    """

    def __init__(
        self,
        members: Mapping[str, Member | Scheduler],
        *,
        prefer: str = "order",
        max_attempts: int = 5,
        out_s: float = _DEFAULT_OUT_S,
        hooks: Sequence[Hook] = (),
        max_queue: int | None = None,
        lower_share: float = 0.1,
    ) -> None:
        if not isinstance(members, Mapping) or not members:
            raise InvalidArgumentError(
                "Pool.members must be a non-empty mapping of account names to "
                f"ratekit.Member (or Scheduler), got {show(members)}"
            )
        accounts: dict[str, Member] = {}
        for name, member in members.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(
                    f"Pool.members: names must be non-empty strs, got {name!r}"
                )
            if isinstance(member, Scheduler):
                member = Member(member)
            elif not isinstance(member, Member):
                raise InvalidArgumentError(
                    f"Pool.members[{name!r}] must be a ratekit.Member or Scheduler, "
                    f"got {show(member)}"
                )
            accounts[name] = Member(
                member.scheduler, member.client, member.models, member.discount, name
            )
        if prefer not in PREFERENCES:
            raise InvalidArgumentError(
                f"Pool.prefer must be one of {', '.join(PREFERENCES)}, got {show(prefer)}"
            )
        if prefer == "cheapest":
            currencies = {m.scheduler.account.profile.currency for m in accounts.values()}
            if len(currencies) > 1:
                raise InvalidArgumentError(
                    "Pool: prefer='cheapest' compares prices in one currency, and the "
                    f"members' profiles price in {', '.join(sorted(map(str, currencies)))}"
                )
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidArgumentError(
                f"Pool.max_attempts must be an int of at least 1, got {show(max_attempts)}"
            )
        self.out_s = check_amount("Pool.out_s", out_s)
        if (
            not isinstance(hooks, Iterable)
            or isinstance(hooks, str | bytes)
            or not all(callable(hook) for hook in hooks)
        ):
            raise InvalidArgumentError(f"Pool.hooks must be callables, got {hooks!r}")
        WaitQueue(lower_share=lower_share, max_size=max_queue)  # checks both
        schedulers = [m.scheduler for m in accounts.values()]
        if len({id(s) for s in schedulers}) != len(schedulers):
            raise InvalidArgumentError(
                "Pool.members: each account needs a scheduler of its own (two members share one)"
            )
        first = schedulers[0]
        self._clock = first._clock
        for member in accounts.values():
            theirs = member.scheduler._clock
            both_system = isinstance(theirs, SystemClock) and isinstance(self._clock, SystemClock)
            if not both_system and theirs is not self._clock:
                raise InvalidArgumentError(
                    f"Pool.members[{member.name!r}]: its scheduler has a clock other than "
                    "the first member's; give every member's scheduler the same clock"
                )
        for name, member in accounts.items():
            named = member.scheduler.account_name
            if named not in (None, name):
                raise InvalidArgumentError(
                    f"Pool.members[{name!r}]: its scheduler is account {named!r} of another "
                    "pool; give each pool's accounts schedulers of their own"
                )
        for name, member in accounts.items():
            # Its events name it; the pool's hooks hear them.
            member.scheduler.account_name = name
            for hook in hooks:
                member.scheduler.add_hook(hook)
        self.members: Mapping[str, Member] = accounts
        self.prefer = prefer
        self.max_attempts = max_attempts
        self._hooks: tuple[Hook, ...] = tuple(hooks)
        self._max_queue = max_queue
        self._lower_share = lower_share
        self._state = {name: _Account() for name in accounts}
        self._clients = {name: _quiet(m.client) for name, m in accounts.items()}
        self._queues: dict[str | None, WaitQueue] = {}
        self._tickets = itertools.count()
        # Set when capacity may have been freed on an account; the heads wait on it.
        self._changed = anyio.Event()
        # The limiters whose freed capacity wakes the heads (by id: subscribed once).
        self._watched: dict[int, _Freed] = {}
        # Callers watching `_changed` (asking the accounts, or waiting after a refusal).
        self._heads = 0
        # What each account (and model) said when it refused: until when a demand of at
        # least these tokens and cost cannot fit, and the dimension; cleared whenever
        # capacity may have been freed (see `_notify`).
        self._refused: dict[tuple[str, str | None], tuple[float, float, float, str]] = {}
        # The accounts serving each model, in the order given.
        self._serving: dict[str | None, list[Member]] = {}

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
    ) -> PoolSlot:
        """One call as ``async with pool.slot(model=..., tokens=n) as served:``; send it
        with ``served.client`` under ``served.model``. When the block ends the admission
        is released first; a 429 raised inside is then answered on its account (a
        cooldown there) and a spent quota takes the account out; the error is re-raised.
        `tokens` and `cost` are asked of whichever account serves the call."""
        return PoolSlot(
            self,
            lambda member, own: (tokens, cost),
            model,
            priority,
            timeout,
            tenant,
            (tokens, cost),
        )

    async def admit(
        self,
        *,
        tokens: float = 0,
        cost: float = 0,
        model: str | None = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - a predicted wait fails at once
        tenant: str | None = None,
    ) -> Served:
        """Wait for and return a call admitted on one account (see `slot`); end it with
        `finish` exactly once."""
        check_amount("tokens", tokens)
        check_amount("cost", cost)
        return await self.admit_each(
            lambda member, own: (tokens, cost),
            model=model,
            priority=priority,
            timeout=timeout,
            tenant=tenant,
        )

    async def admit_each(
        self,
        ask: Ask,
        *,
        model: str | None = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
        tenant: str | None = None,
    ) -> Served:
        """`admit` with a demand per account: ``ask(member, own_model)`` gives the
        (tokens, cost) the call would take there (its tokenizer, its prices)."""
        candidates = self._candidates(model)
        priority = priority if priority.__class__ is int else check_priority(priority)
        timeout_s = None if timeout is None else check_timeout(timeout)
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = WaitQueue(
                lower_share=self._lower_share, max_size=self._max_queue
            )
        clock = self._clock
        started = clock.now()
        deadline = None if timeout_s is None else started + timeout_s
        if self._hooks:
            self._emit(Queued(model, priority, 0.0, tenant))
        tried: Served | tuple[float, str] | None = None
        # Watched from before the first ask: capacity freed while it is under way wakes
        # this caller (see `_notify`).
        self._heads += 1
        changed = self._changed
        try:
            if not queue:
                # Nobody waits: ask at once, without a place in the queue.
                tried = await self._try(candidates, ask, model, tenant)
                if isinstance(tried, Served):
                    return self._granted(tried, model, priority, started)
        finally:
            self._heads -= 1
        waiter = queue.push(priority, ticket=next(self._tickets))
        try:
            while True:
                if tried is None or queue.head() is not waiter:
                    tried = None
                    if queue.head() is not waiter:
                        waiter.turn = anyio.Event()
                        if queue.head() is not waiter:
                            await self._wait(waiter.turn, deadline, math.inf, "queue", timeout_s)
                            continue
                    self._heads += 1
                    changed = self._changed
                    try:
                        tried = await self._try(candidates, ask, model, tenant)
                    except BaseException:
                        self._heads -= 1
                        raise
                    if isinstance(tried, Served):
                        self._heads -= 1
                        queue.admitted(waiter)
                        self._leave(queue, waiter)
                        return self._granted(tried, model, priority, started)
                else:
                    self._heads += 1  # the first ask's refusal, before the queue
                assert not isinstance(tried, Served)
                wait_s, dimension = tried
                tried = None
                try:
                    await self._wait(changed, deadline, wait_s, dimension, timeout_s)
                finally:
                    self._heads -= 1
        except BaseException:
            if not waiter.gone:
                self._leave(queue, waiter)
            raise

    def _granted(self, served: Served, model: str | None, priority: int, started: float) -> Served:
        """Count a call admitted after waiting since `started`, and tell the hooks."""
        waited_s = self._clock.now() - started
        member = served.member
        self._state[member.name].admitted += 1
        # Its scheduler tells the hooks (`Admitted` names the account).
        member.scheduler.admitted(served.admission, served.model, priority, waited_s)
        return served

    def _leave(self, queue: WaitQueue, waiter: Waiter) -> None:
        queue.remove(waiter)
        head = queue.head()
        if head is not None:
            head.turn.set()

    async def _wait(
        self,
        event: anyio.Event,
        deadline: float | None,
        wait_s: float,
        dimension: str,
        timeout_s: float | None,
    ) -> None:
        """Wait on `event` at most `wait_s`; past the caller's deadline, `AcquireTimeout`
        (at once when the predicted wait already ends after it), or
        `BackendUnavailableError` when the account that would answer soonest has its
        store down (its wait says when to ask again, not when it admits)."""
        if deadline is not None:
            assert timeout_s is not None
            left = deadline - self._clock.now()
            if dimension.endswith(_STORE_DOWN):
                if left <= 0:
                    account = dimension.removesuffix(_STORE_DOWN)
                    raise BackendUnavailableError(
                        f"no permit within {timeout_s:g} s: the store of {account} was unreachable"
                    )
            elif left <= 0 or (wait_s > left and is_forecast(wait_s, dimension)):
                raise AcquireTimeout(timeout_s, wait_s, dimension)
            wait_s = min(wait_s, left)
        await self._clock.wait(event, wait_s)

    def _candidates(self, model: str | None) -> list[Member]:
        found = self._serving.get(model)
        if found is not None:
            return found
        if model is not None and not isinstance(model, str):
            raise InvalidArgumentError(f"Pool: model must be a str or None, got {show(model)}")
        found = [m for m in self.members.values() if m.serves(model)]
        if not found:
            served = sorted({name for m in self.members.values() for name in m.models or ()})
            raise InvalidArgumentError(
                f"Pool: no account serves model {model!r}; the pool serves {', '.join(served)}"
            )
        if len(self._serving) < 1024:  # model names are the callers': keep a bounded few
            self._serving[model] = found
        return found

    async def _order(self, candidates: list[Member], model: str | None) -> list[Member]:
        if self.prefer == "cheapest":
            return sorted(candidates, key=lambda m: m.price(model))
        if self.prefer == "headroom":
            room = {}
            for member in candidates:
                limiter = member.scheduler.limiter(member.model_for(model))
                snapshot = await limiter.statistics()
                shares = [(d.limit - d.used) / d.limit for d in snapshot.dimensions if d.limit]
                room[member.name] = min(shares, default=1.0)
            return sorted(candidates, key=lambda m: -room[m.name])
        return candidates

    async def _try(
        self, candidates: list[Member], ask: Ask, model: str | None, tenant: str | None
    ) -> Served | tuple[float, str]:
        """Ask each account in order to admit now: the first grant, else the shortest
        wait any account named and its dimension (inf: until capacity is freed)."""
        now = self._clock.now()
        ordered = candidates if self.prefer == "order" else await self._order(candidates, model)
        best_s, best = math.inf, "concurrency"
        out = 0
        refused = self._refused
        failed: list[Exception] = []
        for member in ordered:
            state = self._state[member.name]
            if state.out_until_s > now:
                out += 1
                continue
            if state.probe is not None:
                # Back from out, and its one probe is not answered yet: the others wait
                # for that answer (it wakes the heads, see `finish`).
                if math.isinf(best_s):
                    best = f"{member.name}: probe"
                continue
            own = member.model_for(model)
            tokens, cost = ask(member, own)
            known = refused.get((member.name, own)) if tenant is None else None
            if known is not None:
                until_s, at_least_tokens, at_least_cost, dimension = known
                if now < until_s and tokens >= at_least_tokens and cost >= at_least_cost:
                    # It said when a demand this large fits, and nothing was freed since:
                    # not asked again before then (no round trip to a store).
                    if until_s - now < best_s:
                        best_s, best = until_s - now, f"{member.name}: {dimension}"
                    continue
            limiter = member.scheduler.limiter(own)
            if id(limiter) not in self._watched:
                # Releases on this account (other pods' too, through its backend) wake
                # the heads at once.
                watch = self._watched[id(limiter)] = _Freed(self, (member.name, own))
                limiter.backend.subscribe(watch.freed)
            # Back from out: this ask claims the one probe before its round trip, so that
            # the callers asking meanwhile pass the account over.
            claimed = state.probing
            if claimed:
                state.probe = _CLAIMED
            try:
                outcome = await member.scheduler.offer(
                    tokens=tokens, cost=cost, model=own, tenant=tenant
                )
            except BaseException as error:
                if claimed:
                    self._unclaim(member.name, own)
                if not isinstance(error, CostExceedsLimitError | BackendUnavailableError):
                    raise
                # Too large for this account's limits, or its store is down: the others
                # may serve the call.
                failed.append(error)
                continue
            if not isinstance(outcome, Admission):
                if claimed:
                    self._unclaim(member.name, own)
                if outcome is not None:
                    state.refused += 1
            if outcome is None:
                # Callers of the account's own scheduler wait there and go first; no
                # instant is known: look again soon.
                if best_s > _BUSY_S:
                    best_s, best = _BUSY_S, f"{member.name}: its own queue"
                continue
            if isinstance(outcome, Admission):
                if claimed:
                    state.probe = outcome
                return Served(member, own, outcome, self._clients[member.name])
            if isinstance(outcome, Refusal):
                if outcome.dimension == UNAVAILABLE:
                    # Its store is down and the outage waited out: asked again after the
                    # store's backoff (not a forecast, so not kept in `refused`).
                    if outcome.wait_s < best_s:
                        best_s, best = outcome.wait_s, member.name + _STORE_DOWN
                    continue
                if outcome.dimension == OUT:
                    # Taken out by another process (its quota was spent there): out here
                    # too, told once (other asks under way meanwhile hear it as well).
                    if state.out_until_s <= self._clock.now():
                        self._out(member, outcome.wait_s, "quota spent (seen by another process)")
                    out += 1
                    continue
                if tenant is None and math.isfinite(outcome.wait_s):
                    refused[(member.name, own)] = (
                        self._clock.now() + outcome.wait_s,
                        tokens,
                        cost,
                        outcome.dimension,
                    )
                if outcome.wait_s < best_s:
                    best_s, best = outcome.wait_s, f"{member.name}: {outcome.dimension}"
        if failed and len(failed) + out == len(ordered):
            raise failed[-1]  # no account can take it: too large everywhere, or down
        if out == len(ordered):
            states = {m.name: self._state[m.name] for m in ordered}
            back_s = min(state.out_until_s for state in states.values()) - now
            raise PoolExhaustedError(
                model, {name: state.out_reason for name, state in states.items()}, back_s
            )
        return best_s, best

    def _notify(self, where: tuple[str, str | None] | None = None) -> None:
        """Capacity may have been freed (on account and model `where`; None: anywhere): the
        heads look again (a new event only while a caller watches one), and the account
        is asked again."""
        if self._refused:
            if where is None:
                self._refused.clear()
            else:
                self._refused.pop(where, None)
        if self._heads:
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def finish(self, served: Served, error: BaseException | None = None) -> None:
        """End a call admitted by `admit`: release its admission on its account, then
        answer `error` there (a 429: that account's cooldown; a spent quota: the account
        is out for `out_s`). Call it once per admission."""
        if not isinstance(served, Served):
            raise InvalidArgumentError(
                f"Pool.finish: served must be the Served call that Pool.admit returned, "
                f"got {show(served)}"
            )
        try:
            # First: nothing below can keep the capacity.
            await served.member.scheduler.finish(served.admission, error, model=served.model)
        except BaseException:
            self._probe_ended(served)  # not answered: the next call probes
            raise
        finally:
            self._notify((served.account, served.model))
        await self.answered(served, error)

    async def answered(self, served: Served, error: BaseException | None) -> None:
        """The pool's part of ending a call whose admission its account's scheduler has
        ended already (`Scheduler.finish`, which told the hooks `Settled`): count a
        rate-limit answer, and take the account out on a spent quota."""
        member = served.member
        state = self._state[member.name]
        cancelled = isinstance(error, anyio.get_cancelled_exc_class())
        signal = None if error is None or cancelled else member.scheduler._signal(error)
        spent = (
            signal is not None and not signal.retryable and not getattr(signal, "overloaded", False)
        )
        # Back in full on an answer of the provider's (a result, or a rate limit that is
        # not a spent quota); any other failure hands the probe to the next call.
        self._probe_ended(served, back=error is None or (signal is not None and not spent))
        if signal is not None and not spent:
            state.rate_limited += 1
        if signal is not None and spent:
            with anyio.CancelScope(shield=True):
                await self._take_out(member, served.model, signal.message or "quota spent")

    def _unclaim(self, name: str, model: str | None) -> None:
        """The ask that claimed `name`'s probe was not admitted: the next one may probe,
        and the callers that passed the account over look again."""
        self._state[name].probe = None
        self._notify((name, model))

    def _probe_ended(self, served: Served, *, back: bool = False) -> None:
        """A call ends without an answer the pool must act on (cancelled, say): if it was
        the probe of an account back from out, the next call probes instead (with
        `back`, the account answered and is back in full), and the callers that waited
        for it look again. Synchronous: safe in a cancelled task."""
        state = self._state[served.member.name]
        if state.probe is served.admission:
            state.probe = None
            if back and state.out_until_s <= self._clock.now():  # not out again meanwhile
                state.probing = False
            self._notify((served.member.name, served.model))

    def client(self, *, priority: int = 0, timeout: float | None = None) -> Any:
        """One SDK client for the whole pool: every call of ``chat.completions.create``
        (and the other admitted methods, see `ratekit.wrap`) is admitted by the pool and
        sent with the client of the account that admitted it, under that account's name
        for the model. Every member needs a `client`, all async and of one API (OpenAI's
        or Anthropic's). Rate-limit and quota answers are retried on the best account
        then (up to `max_attempts`); what the SDK would retry besides, up to the first
        client's own ``max_retries``. Other attributes are the first member's client's."""
        from .integrations._pool_client import pool_client

        return pool_client(self, priority=priority, timeout=timeout)

    async def _take_out(self, member: Member, model: str | None, reason: str) -> None:
        """The account's quota or balance is spent: nobody is sent there for `out_s`
        (every pod: its limiter pauses through its backend)."""
        state = self._state[member.name]
        now = self._clock.now()
        if state.out_until_s > now:
            return  # the answer of a call sent before the account was taken out
        state.exhausted += 1
        self._out(member, self.out_s, reason)
        await member.scheduler.limiter(model).pause(self.out_s, out=True)

    def _out(self, member: Member, seconds: float, reason: str) -> None:
        """Nobody is sent to `member` for `seconds` from now; the hooks hear why."""
        state = self._state[member.name]
        state.out_until_s = self._clock.now() + seconds
        state.out_reason = reason
        state.probing = True
        self._emit(AccountOut(member.name, seconds, reason))

    async def submit(
        self,
        fn: Callable[[Served], Awaitable[T]],
        *,
        tokens: float = 0,
        cost: float = 0,
        model: str | None = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
        tenant: str | None = None,
    ) -> T:
        """Run ``await fn(served)`` on the account that admits the call, and return its
        result. A rate-limit or quota answer is retried on the best account then (the
        one that answered is paused or out), up to `max_attempts` tries; the last error
        is re-raised. `timeout` bounds the waits for admission over every try."""
        if not callable(fn):
            raise InvalidArgumentError(f"Pool.submit: fn must be callable, got {fn!r}")
        timeout = None if timeout is None else check_timeout(timeout)
        deadline_s = None if timeout is None else self._clock.now() + timeout
        last: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            left = None if deadline_s is None else max(deadline_s - self._clock.now(), 0.0)
            try:
                async with self.slot(
                    tokens=tokens,
                    cost=cost,
                    model=model,
                    priority=priority,
                    timeout=left,
                    tenant=tenant,
                ) as served:
                    awaitable = fn(served)
                    if not inspect.isawaitable(awaitable):
                        raise InvalidArgumentError(
                            "Pool.submit: fn must return an awaitable (an async function "
                            f"of the Served call), got {awaitable!r}"
                        )
                    return await awaitable
            except PoolExhaustedError as error:
                raise error from last
            except Exception as error:
                if attempt == self.max_attempts or not self._retryable(error):
                    raise
                last = error
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retryable(self, error: BaseException) -> bool:
        """A rate-limit or quota answer of any account: another account (or this one after
        its cooldown) may serve the call."""
        if isinstance(error, RatekitError):
            return False
        return any(m.scheduler._signal(error) is not None for m in self.members.values())

    # -- observing --------------------------------------------------------------------

    def add_hook(self, hook: Hook) -> None:
        """Tell `hook` every event of the pool and of its accounts' schedulers from now on
        (`Admitted` and `Settled` name the account)."""
        if not callable(hook):
            raise InvalidArgumentError(f"Pool.add_hook: a hook must be callable, got {hook!r}")
        if hook not in self._hooks:
            self._hooks = (*self._hooks, hook)
        for member in self.members.values():
            member.scheduler.add_hook(hook)

    def _emit(self, event: Event) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                _log.exception("ratekit: hook %r raised on %r", hook, event)

    def statistics(self) -> PoolStatistics:
        """A snapshot: per account, its calls, 429s, spent quotas and time left out."""
        now = self._clock.now()
        accounts = {
            name: AccountStatistics(
                admitted=state.admitted,
                rate_limited=state.rate_limited,
                exhausted=state.exhausted,
                out_for_s=max(state.out_until_s - now, 0.0),
                refused=state.refused,
            )
            for name, state in self._state.items()
        }
        return PoolStatistics(accounts, sum(len(q) for q in self._queues.values()))

    def __repr__(self) -> str:
        return f"Pool({', '.join(self.members)}, prefer={self.prefer!r})"


class _Freed:
    """Told by an account's backend that capacity may have been freed there; held by the
    pool (a backend holds its bound method weakly, so a dropped pool is not kept)."""

    __slots__ = ("__weakref__", "pool", "where")

    def __init__(self, pool: Pool, where: tuple[str, str | None]) -> None:
        self.pool = pool
        self.where = where

    def freed(self) -> None:
        self.pool._notify(self.where)


class PoolSlot:
    """One call through a pool, as an ``async with`` block; see `Pool.slot`."""

    __slots__ = (
        "_ask",
        "_demand",
        "_model",
        "_pool",
        "_priority",
        "_served",
        "_tenant",
        "_timeout",
    )

    def __init__(
        self,
        pool: Pool,
        ask: Ask,
        model: str | None,
        priority: int,
        timeout: float | None,
        tenant: str | None,
        demand: tuple[float, float],
    ) -> None:
        self._pool = pool
        self._ask = ask
        self._model = model
        self._priority = priority
        self._timeout = timeout
        self._tenant = tenant
        self._demand = demand
        self._served: Served | None = None

    async def __aenter__(self) -> Served:
        if self._served is not None:
            raise PermitError("this pool slot was already entered; take one slot per call")
        tokens, cost = self._demand
        check_amount("tokens", tokens)
        check_amount("cost", cost)
        self._served = await self._pool.admit_each(
            self._ask,
            model=self._model,
            priority=self._priority,
            timeout=self._timeout,
            tenant=self._tenant,
        )
        return self._served

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        served = self._served
        assert served is not None
        await self._pool.finish(served, exc)
