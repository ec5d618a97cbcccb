"""Decorated call sites and synchronous code, on the scheduler's async core.

Nothing here admits, waits or retries by itself: an async function goes through
`Scheduler.submit`; a sync function's admission runs in the scheduler's event
loop (`anyio.from_thread`) and only the function itself runs in the caller's
thread, retried under the scheduler's own policy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import anyio.from_thread
import sniffio
from anyio.lowlevel import EventLoopToken
from tenacity import Retrying

from .._admission import Admission
from .._errors import InvalidArgumentError, NoEventLoopError
from .._tenants import check_tenant_name, current_tenant


class Scheduler(Protocol):
    """What these call sites use of a `ratekit.Scheduler`. Named by what it does, not
    imported: the scheduler imports this module (for its `limit`), not the other way."""

    loop_token: EventLoopToken | None
    sync_closed: bool

    @property
    def admit(self) -> Callable[..., Awaitable[Admission]]: ...

    @property
    def finish(self) -> Callable[..., Awaitable[None]]: ...

    @property
    def submit(self) -> Callable[..., Awaitable[Any]]: ...

    def retry_policy(self) -> dict[str, Any]: ...


class SyncLoop(Protocol):
    """A SyncScheduler's loop, as `on_loop` reaches it: ``run(fn, args, awaited)`` is one
    blocking hop that its `close` ends (see `SyncScheduler`)."""

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], awaited: bool) -> Any: ...


# The loop of each SyncScheduler, by the scheduler it runs (set by the SyncScheduler).
SYNC_LOOPS: weakref.WeakKeyDictionary[Any, SyncLoop] = weakref.WeakKeyDictionary()

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")

TokensArg = float | Callable[..., float]
# A decorated function's tenant: a name, or a function of the call's arguments that
# gives one (None: the one of the caller's `ratekit.tenant` block).
TenantArg = str | Callable[..., str | None] | None

_WHERE_TENANT = "limit(tenant=...)"
_ASYNC_IN_SYNC = (
    "a SyncScheduler runs sync functions in the calling thread; {fn!r} is async (or "
    "returns an awaitable): await it through the async Scheduler.submit instead"
)


# One call's arguments, as the decorated function was called: (args, kwargs).
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


def _of_arguments(value: Callable[..., V], fn: Callable[..., Any]) -> Callable[[Arguments], V]:
    """How `value`, a function of a decorated call's arguments (`tokens=`, `cost=`,
    `tenant=`), is called for each call of `fn`.

    One that names parameters of `fn` and no others (``lambda prompt, **_:``) gets
    them by name, whether the call passed them by position or by name; one the call
    left out comes with `fn`'s default, unless `value` has a default of its own for it.
    With ``**``, it also gets the call's other arguments, as passed. Any other (one
    naming no parameter of `fn`, or one `fn` lacks, or with ``*args``), and any call
    whose positional arguments `fn`'s own named parameters do not take, is called
    with the arguments as given.
    """

    def as_given(call: Arguments) -> V:
        return value(*call[0], **call[1])

    try:
        # The signature of `fn` itself: a wrapper's, if a decorator below wrapped it.
        target = inspect.signature(fn, follow_wrapped=False)
        own = inspect.signature(value)
    except (TypeError, ValueError):  # a callable without a signature Python can read
        return as_given
    kinds = [parameter.kind for parameter in own.parameters.values()]
    named = [
        parameter
        for parameter in own.parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    of_fn = {parameter.name: parameter for parameter in target.parameters.values()}
    if (
        not named
        or inspect.Parameter.VAR_POSITIONAL in kinds
        or inspect.Parameter.POSITIONAL_ONLY in kinds
        or any(
            of_fn.get(parameter.name) is None
            or of_fn[parameter.name].kind
            in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            for parameter in named
        )
    ):
        return as_given
    takes_all = inspect.Parameter.VAR_KEYWORD in kinds
    # Made once: the names `fn` gives its positional arguments, and the defaults of
    # `fn` that `value` takes for the names it has no default of its own for.
    positional = [
        parameter.name
        for parameter in target.parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    defaults = {
        parameter.name: of_fn[parameter.name].default
        for parameter in named
        if parameter.default is parameter.empty
        and of_fn[parameter.name].default is not inspect.Parameter.empty
    }
    names = [parameter.name for parameter in named]

    def by_name(call: Arguments) -> V:
        args, kwargs = call
        if len(args) > len(positional):
            return as_given(call)  # for `fn`'s *args: not by name
        arguments = {**defaults, **dict(zip(positional, args, strict=False)), **kwargs}
        if takes_all:
            return value(**arguments)
        return value(**{name: arguments[name] for name in names if name in arguments})

    return by_name


def _amount(value: Callable[[Arguments], float] | float, call: Arguments) -> float:
    return value(call) if callable(value) else value


def _tenant_of(
    value: Callable[[Arguments], str | None] | str | None, call: Arguments
) -> str | None:
    """The tenant of one call: `value`, or what it gives for the call's arguments."""
    if not callable(value):
        return value
    named = value(call)
    return None if named is None else check_tenant_name(named, _WHERE_TENANT)


def limit(
    scheduler: Scheduler,
    *,
    tokens: TokensArg = 0,
    cost: TokensArg = 0,
    model: str | None = None,
    priority: int = 0,
    timeout: float | None = None,
    usage: Callable[[Any], float | None] | None = None,
    tenant: TenantArg = None,
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A decorator that admits every call of a function through `scheduler`.

    `tokens` and `cost` are numbers or functions of the call's arguments. `tenant`
    names the tenant whose share each call takes: a str, or a function of the call's
    arguments that gives one (or None); without one, the tenant of the caller's
    `ratekit.tenant` block. A function of the arguments whose parameters are named
    after the decorated function's (``lambda prompt, **_: ...``) gets them by name,
    however the call passed them (see `_of_arguments`). Works on async functions and
    on sync ones; a sync one must run in a thread that can reach the scheduler's loop
    (a `SyncScheduler`, or ``anyio.to_thread``).
    """
    if tenant is not None and not callable(tenant):
        check_tenant_name(tenant, _WHERE_TENANT)

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        tokens_of = _of_arguments(tokens, fn) if callable(tokens) else tokens
        cost_of = _of_arguments(cost, fn) if callable(cost) else cost
        tenant_of = _of_arguments(tenant, fn) if callable(tenant) else tenant

        def submitted(submit: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
            # One call of `fn` handed to `submit` (the scheduler's, or `submit_sync`).
            call = (args, kwargs)
            return submit(
                functools.partial(fn, *args, **kwargs),
                tokens=_amount(tokens_of, call),
                cost=_amount(cost_of, call),
                model=model,
                priority=priority,
                timeout=timeout,
                usage=usage,
                tenant=_tenant_of(tenant_of, call),
            )

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def admitted(*args: Any, **kwargs: Any) -> Any:
                return await submitted(scheduler.submit, args, kwargs)

            return admitted  # type: ignore[return-value]

        @functools.wraps(fn)
        def admitted_sync(*args: Any, **kwargs: Any) -> T:
            return submitted(  # type: ignore[no-any-return]
                functools.partial(submit_sync, scheduler), args, kwargs
            )

        return admitted_sync

    return decorate


def _on_a_loop_thread() -> bool:
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


def on_loop(scheduler: Scheduler, fn: Callable[..., Any], *args: Any, awaited: bool = True) -> Any:
    """``fn(*args)`` run on the scheduler's loop from this thread (awaited when a coroutine
    function). A loop that stops meanwhile (its SyncScheduler closed) raises
    `NoEventLoopError`, not the cancellation of the loop's own tasks."""
    token = _token(scheduler)
    # A SyncScheduler's loop: its own hop, which its close() ends whenever it lands
    # (anyio's would wait forever for a loop that stopped before running it).
    sync_loop = SYNC_LOOPS.get(scheduler)
    if sync_loop is not None:
        return sync_loop.run(fn, args, awaited)
    try:
        if awaited:
            return anyio.from_thread.run(fn, *args, token=token)
        return anyio.from_thread.run_sync(fn, *args, token=token)
    except (asyncio.CancelledError, concurrent.futures.CancelledError, anyio.RunFinishedError):
        if scheduler.sync_closed or scheduler.loop_token is None:
            raise NoEventLoopError(
                "this SyncScheduler was closed while the call waited for its event loop"
            ) from None
        raise


def loop_of(scheduler: Scheduler) -> EventLoopToken:
    """The event loop a sync call is admitted on (see `_token`), for the wrapped clients."""
    return _token(scheduler)


def _token(scheduler: Scheduler) -> EventLoopToken:
    if _on_a_loop_thread():
        # Waiting here for the loop would block that very loop for good.
        raise NoEventLoopError(
            "a synchronous call admitted by ratekit ran on an event loop's own thread, "
            "where waiting for an admission would block the loop for good: run it in a "
            "worker thread (anyio.to_thread.run_sync) or use an async function"
        )
    token = scheduler.loop_token
    if token is None:
        if scheduler.sync_closed:
            raise NoEventLoopError(
                "this SyncScheduler is closed: its event loop has stopped, so no call can "
                "be admitted through it any more; make a new one"
            )
        raise NoEventLoopError(
            "this scheduler has no event loop for synchronous calls yet: use "
            "ratekit.SyncScheduler, or call from a worker thread of the scheduler's loop "
            "(anyio.to_thread.run_sync) after it has admitted an async call"
        )
    return token


@contextmanager
def slot_sync(
    scheduler: Scheduler,
    *,
    tokens: float = 0,
    cost: float = 0,
    model: str | None = None,
    priority: int = 0,
    timeout: float | None = None,
    tenant: str | None = None,
) -> Iterator[Admission]:
    """`Scheduler.slot` for a thread: ``with slot_sync(scheduler, tokens=n) as permit:``.

    Without `tenant`, the tenant of this thread's `ratekit.tenant` block, read here and
    carried to the scheduler's loop (which runs in another thread)."""
    if tenant is None:
        tenant = current_tenant()
    admission = on_loop(
        scheduler,
        functools.partial(
            scheduler.admit,
            tokens=tokens,
            cost=cost,
            model=model,
            priority=priority,
            timeout=timeout,
            tenant=tenant,
        ),
    )
    error: BaseException | None = None
    try:
        yield admission
    except BaseException as exc:
        error = exc
        raise
    finally:
        on_loop(scheduler, functools.partial(scheduler.finish, admission, error, model=model))


def submit_sync(
    scheduler: Scheduler,
    fn: Callable[..., T],
    *args: Any,
    tokens: float = 0,
    cost: float = 0,
    model: str | None = None,
    priority: int = 0,
    timeout: float | None = None,
    usage: Callable[[T], float | None] | None = None,
    tenant: str | None = None,
) -> T:
    """`Scheduler.submit` for a sync function, called from a thread: ``fn(*args)``; see
    `slot_sync` for `tenant`. An async function (or one that returns an awaitable)
    is refused with `InvalidArgumentError`: nothing here would run it."""
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise InvalidArgumentError(_ASYNC_IN_SYNC.format(fn=fn))
    for attempt in Retrying(**scheduler.retry_policy(), sleep=time.sleep):
        with (
            attempt,
            slot_sync(
                scheduler,
                tokens=tokens,
                cost=cost,
                model=model,
                priority=priority,
                timeout=timeout,
                tenant=tenant,
            ) as permit,
        ):
            result = fn(*args)
            if inspect.isawaitable(result) or inspect.isasyncgen(result):
                if inspect.iscoroutine(result):
                    result.close()  # never to run: no "never awaited" warning
                raise InvalidArgumentError(_ASYNC_IN_SYNC.format(fn=fn))
            real = usage(result) if usage is not None else None
            if real is not None:
                permit.settle(tokens=real)
            return result
    raise AssertionError("unreachable: tenacity re-raises the last error")
