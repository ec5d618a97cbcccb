"""`wrap`: an LLM client whose requests go through a scheduler.

The wrapped client is the same client: every attribute passes through, and its
create methods are admitted first. Two APIs are known (`_Api`): the OpenAI one
(``chat.completions.create`` plain and streaming, ``completions.create``,
``embeddings.create``, ``responses.create``) and the Anthropic Messages API
(``messages.create`` plain and streaming, and the ``messages.stream(...)``
helper), of async clients and of sync ones (on a `SyncScheduler`'s loop, see
`_sync`). Every HTTP request one of them sends is one admission: the SDK's own
retries are turned off (on a copy of the client, ``with_options(max_retries=0)``)
and ratekit retries instead, each attempt admitted anew. Each admission reserves
the prompt's estimated tokens plus the most the call may output, and the most it
may cost at the profile's prices; it settles with the answer's ``usage``. A stream
keeps its admission until it ends or is closed (an OpenAI chat stream asks for
usage in its last chunk without changing what the caller sees). Every answer's
rate-limit headers (``x-ratelimit-*``, ``anthropic-ratelimit-*``) go to
`Scheduler.observe`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import anyio
from anyio.lowlevel import EventLoopToken

from .._admission import Admission, check_priority, check_timeout
from .._errors import InvalidArgumentError
from .._scheduler import Scheduler
from .._tenants import current_tenant
from .._tokens import (
    BackgroundEstimator,
    TokenEstimator,
)
from ._calling import (
    _ANTHROPIC,
    _SENDING,
    CreateBase,
    HeldStream,
    HelperManager,
    SdkRetries,
    StreamReading,
    _admit_at_send,
    _api_of,
    _checked,
    _Deadline,
    _Plan,
    _Sending,
    _Settings,
    final_usage,
    plan_call,
    stream_params,
)
from ._counts import PendingCount, TokenCounts
from ._sending import stamp_when_sent
from ._sync_scheduler import SyncScheduler
from ._usage import read_usage
from ._wrap_sync import (
    SyncCreate,
    SyncStreamManager,
    admit_on_send_sync,
    observe_answer_sync,
)

R = TypeVar("R")
# The client's own type: `wrap` hands back a client used exactly as the one it was given.
C = TypeVar("C")

# Methods of the client that return a changed copy of it: the copy is wrapped too.
_COPIES = ("copy", "with_options")


def _is_sync(client: Any) -> bool:
    """Whether `client` sends its requests synchronously (``openai.OpenAI``,
    ``anthropic.Anthropic``): its HTTP client's ``send``, or its own ``post``, is not
    a coroutine function. A client with neither is taken for an async one."""
    for method in (
        getattr(getattr(client, "_client", None), "send", None),
        getattr(client, "post", None),
    ):
        if callable(method):
            return not inspect.iscoroutinefunction(method)
    # Neither (a test double, a hand-made client): the admitted methods themselves say.
    for path in _api_of(client).admitted:
        found: Any = client
        for name in path:
            found = getattr(found, name, None)
        if callable(found):
            return not inspect.iscoroutinefunction(found)
    return False


@runtime_checkable
class RetryingClient(Protocol):
    """A client that retries on its own (the openai and anthropic SDKs'): `max_retries`
    and a copy with other options. `wrap` turns the retries off on a copy and retries
    itself."""

    max_retries: int

    def with_options(self, **options: Any) -> Any: ...


def wrap(
    client: C,
    scheduler: Scheduler | SyncScheduler,
    *,
    estimator: TokenEstimator | None = None,
    priority: int = 0,
    timeout: float | None = None,
    count_tokens: bool | TokenCounts = False,
) -> C:
    """`client` with every request admitted through `scheduler`.

    `client` is an ``openai.AsyncOpenAI`` or ``anthropic.AsyncAnthropic`` (or a
    compatible one) with a `Scheduler`, or an ``openai.OpenAI`` or
    ``anthropic.Anthropic`` with a `SyncScheduler`, used from any number of threads.
    Admitted: ``chat.completions.create``, ``completions.create``,
    ``embeddings.create`` and ``responses.create`` of an OpenAI client;
    ``messages.create`` and the ``messages.stream(...)`` helper of an Anthropic one
    (``messages.count_tokens`` and everything else pass through unadmitted).

    Retries: a client that retries on its own (`RetryingClient`: the SDKs'
    ``max_retries``, 2 by default) is called through a copy with
    ``max_retries=0``, so that each HTTP request is an admission of its own, and
    ratekit retries in its place:

    - a rate-limit answer (429, the Anthropic API's 529 "overloaded", or a
      provider's own rate-limit code) is answered by the scheduler (the account
      pauses for its Retry-After; 429s that keep coming lower the limits) and,
      unless it says retrying cannot help (a spent quota, ``x-should-retry:
      false``), retried by the scheduler's policy (`Scheduler.retrying`: up to
      ``max_attempts`` tries, each after the pause);
    - what the SDK would retry besides (connection errors and timeouts, 408, 409
      and 5xx answers, or any answer saying ``x-should-retry: true``) is retried
      up to the client's own ``max_retries`` times, with the SDK's backoff.

    Each try is a new admission. A stream is retried the same way when it is
    refused on opening; once open it is never retried. Other methods of the
    client (``models.list``, ``with_raw_response``...) pass through unadmitted,
    on the original client with its own retries. ``with_options(...)`` and
    ``copy(...)`` return a wrapped copy. A client without ``max_retries`` and
    ``with_options`` is called as it is: ratekit retries its 429s, and any retries
    of its own are not seen.

    Every answer's rate-limit headers (``x-ratelimit-*``,
    ``anthropic-ratelimit-*``) are read by `Scheduler.observe`: a provider that
    reports lower limits than the tier is run at its own numbers.

    Money: a model the profile prices reserves ``cost=`` its prompt estimate and
    maximum output at those prices and settles the real cost from ``usage``
    (cache hits at the cached price when the usage reports them), so money rates
    (spend budgets) hold through `wrap`; an unpriced model costs 0. Tokens settle
    as the profile says its provider counts them (cache hits count toward the
    token rates unless the profile says they do not).

    `estimator` counts prompt tokens; by default a `BackgroundEstimator` of the
    profile, which never blocks the loop (the heuristic until tiktoken, if
    installed, has loaded in a thread). Per call, ``ratekit_tokens=`` gives an
    exact reservation, ``ratekit_cost=`` an exact money estimate,
    ``ratekit_priority=`` and ``ratekit_timeout=`` (seconds of waiting for
    admissions, over all tries) override the defaults, and ``ratekit_tenant=``
    names the tenant whose share the call takes (else the one of the caller's
    `ratekit.tenant` block, see `Scheduler.slot`); they are not sent.

    `count_tokens` (Anthropic clients): count each call's prompt exactly with the
    provider's free ``messages.count_tokens`` before admitting it, instead of
    estimating it. The counts are kept by prompt (a prompt sent again is not counted
    again); a count that fails or is slow falls back to the estimate. True uses a
    fresh `TokenCounts`; pass your own to read what the counts cost
    (`TokenCounts.statistics`).
    """
    if isinstance(client, _Proxy):
        raise InvalidArgumentError(
            "wrap: this client is wrapped already; wrapping it again would admit each call twice"
        )
    api = _api_of(client)
    if not any(hasattr(client, path[0]) for path in (*api.admitted, *api.helpers)):
        names = sorted({".".join(path) for path in api.admitted})
        raise InvalidArgumentError(
            f"wrap: client must be an LLM client with {', '.join(names)} (an openai or "
            f"anthropic client), got {client!r}"
        )
    sync = _is_sync(client)
    loop: EventLoopToken | None = None
    if isinstance(scheduler, SyncScheduler):
        if not sync:
            raise InvalidArgumentError(
                f"wrap: {type(client).__name__} is an async client, and a SyncScheduler is "
                "for sync ones (openai.OpenAI, anthropic.Anthropic): wrap it with a "
                "ratekit.Scheduler on your event loop"
            )
        scheduler = scheduler.scheduler
        loop = scheduler.loop_token
    elif not isinstance(scheduler, Scheduler):
        raise InvalidArgumentError(
            f"wrap: scheduler must be a ratekit.Scheduler (or a SyncScheduler for a sync "
            f"client), got {scheduler!r}"
        )
    elif sync:
        raise InvalidArgumentError(
            f"wrap: {type(client).__name__} is a sync client: wrap it with a "
            "ratekit.SyncScheduler, whose event loop runs in a thread of its own"
        )
    if estimator is None:
        estimator = BackgroundEstimator(scheduler.account.profile)
    elif not isinstance(estimator, TokenEstimator):
        raise InvalidArgumentError(
            f"wrap: estimator must have count(text) -> int (a TokenEstimator), got {estimator!r}"
        )
    priority = _checked("wrap: priority", check_priority, priority)
    timeout = _checked("wrap: timeout", check_timeout, timeout)
    counts: TokenCounts | None = None
    if isinstance(count_tokens, TokenCounts):
        counts = count_tokens
    elif count_tokens is True:
        counts = TokenCounts()
    elif count_tokens is not False:
        raise InvalidArgumentError(
            f"wrap: count_tokens must be True, False or a ratekit.TokenCounts, got {count_tokens!r}"
        )
    if counts is not None and api is not _ANTHROPIC:
        raise InvalidArgumentError(
            "wrap: count_tokens needs a client whose API counts tokens for free "
            "(the Anthropic Messages API: anthropic.AsyncAnthropic or anthropic.Anthropic)"
        )
    hooks = (
        (_admit_on_send, _observe_answer)
        if loop is None
        else (admit_on_send_sync, observe_answer_sync)
    )
    settings = _Settings(scheduler, estimator, priority, timeout, api, loop, counts, hooks)
    # A proxy with every attribute of `client`: typed as the client, so that a type
    # checker sees the SDK's own signatures and answers.
    return cast(C, _wrap_client(client, settings))


def _wrap_client(client: Any, settings: _Settings) -> _Proxy:
    if isinstance(client, RetryingClient):
        retries = client.max_retries
        quiet = client.with_options(max_retries=0)
    else:
        retries = 0
        quiet = client
    owner = quiet if _admit_at_send(quiet, settings) else None
    return _Proxy(client, quiet, (), settings, retries, owner)


async def _admit_on_send(request: Any) -> None:
    """httpx request hook: admit the wrapped call this request belongs to, if any, and
    have it counted from when its body has been written (`stamp_when_sent`)."""
    sending = _SENDING.get()
    if sending is None or sending.done:
        return
    await sending.admit()
    if sending.admission is not None:
        stamp_when_sent(request, sending.admission)


async def _observe_answer(response: Any) -> None:
    """httpx response hook: the answer's rate-limit headers, to the scheduler."""
    sending = _SENDING.get()
    if sending is not None and not sending.done:
        sending.observe(response)


class _Proxy:
    """Passes every attribute through, except along the paths to the admitted creates."""

    __slots__ = ("_owner", "_path", "_quiet", "_retries", "_settings", "_target")

    def __init__(
        self,
        target: Any,
        quiet: Any,
        path: tuple[str, ...],
        settings: _Settings,
        retries: int,
        owner: Any,
    ) -> None:
        self._target = target  # the caller's object, with its own retries
        self._quiet = quiet  # the same object on the copy without retries
        self._path = path
        self._settings = settings
        self._retries = retries  # the client's own max_retries, for failures other than 429
        # The client (without retries) whose HTTP client admits in its request hook;
        # None: admitted before the SDK runs.
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        api = self._settings.api
        path = (*self._path, name)
        if path in api.prefixes:
            quiet = getattr(self._quiet, name)
            return _Proxy(value, quiet, path, self._settings, self._retries, self._owner)
        if path in api.admitted:
            return self._create(getattr(self._quiet, name), api.admitted[path])
        if path in api.helpers:
            create = self._create(getattr(self._quiet, name), api.helpers[path])
            return _stream_helper(create, self._settings)
        if name in _COPIES and not self._path:
            return _wrapped_copy(value, self._settings)
        return value

    def _create(self, method: Callable[..., Any], kind: str) -> Any:
        count = None
        if self._settings.counts is not None:
            count = getattr(self._quiet, "count_tokens", None)
        if self._settings.loop is not None:
            return SyncCreate(method, kind, self._settings, self._retries, self._owner, count)
        return _Create(method, kind, self._settings, self._retries, self._owner, count)

    # A client used as a context manager (``async with wrap(AsyncOpenAI(), s) as client``)
    # closes itself at the end: the block gets the wrapped client.
    async def __aenter__(self) -> _Proxy:
        await self._target.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._target.__aexit__(*exc_info)

    def __enter__(self) -> _Proxy:
        self._target.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._target.__exit__(*exc_info)

    def __repr__(self) -> str:
        return f"ratekit.wrap({self._target!r})"


def _stream_helper(create: Any, settings: _Settings) -> Callable[..., Any]:
    """A stream helper (``messages.stream``) whose stream holds an admission."""
    if settings.loop is not None:
        return lambda **params: SyncStreamManager(create, params)
    return lambda **params: _StreamManager(create, params)


def _wrapped_copy(method: Callable[..., Any], settings: _Settings) -> Callable[..., _Proxy]:
    """`method` (a client's ``copy``/``with_options``) returning a wrapped copy."""

    def wrapped(*args: Any, **options: Any) -> _Proxy:
        return _wrap_client(method(*args, **options), settings)

    return wrapped


class _Create(CreateBase):
    """One admitted ``create`` of an async client."""

    __slots__ = ()

    async def _plan(self, params: dict[str, Any]) -> _Plan:
        """`plan_call`, with the prompt counted by the provider when asked (and kept)."""
        counted = self._counted(params)
        if isinstance(counted, PendingCount):
            try:
                answer = await counted.ask()
            except Exception:
                answer = None
            counted = counted.done(answer)
        return plan_call(self._settings, self._kind, params, counted, tenant=current_tenant())

    async def __call__(self, **params: Any) -> Any:
        plan = await self._plan(params)
        if not params.get("stream"):
            return await self._retried(lambda left: self._call(params, plan, left), plan)
        params, hide_usage = stream_params(self._kind, params)
        return await self._retried(lambda left: self._open(params, plan, left, hide_usage), plan)

    async def _retried(self, attempt: Callable[[float | None], Awaitable[R]], plan: _Plan) -> R:
        """Run `attempt` (one admission, one request) until it succeeds or may not retry.

        Rate limits are the scheduler's to retry; what the SDK would have retried
        besides, up to the client's ``max_retries`` times, with its backoff. `attempt`
        is given the seconds left for waiting for admission (None: no bound).
        """
        scheduler = self._settings.scheduler
        left = _Deadline(scheduler, plan)
        retries = SdkRetries(self._retries)
        async for tried in scheduler.retrying():
            with tried:
                while True:
                    try:
                        return await attempt(left.seconds())
                    except Exception as error:
                        wait_s = retries.wait_after(error)
                        if wait_s is None:
                            raise
                    await anyio.sleep(wait_s)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _sent(
        self,
        send: Callable[[], Awaitable[Any]],
        plan: _Plan,
        left: float | None,
        admitted: Admission | None = None,
    ) -> tuple[Any, Admission]:
        """One request sent (`send`) through one admission: the SDK's answer and the
        admission.

        The admission is made by the HTTP client's request hook as the request leaves
        (see `_admit_at_send`), else here before the SDK runs; or it was made already
        (`admitted`, by a pool), and the hook only says when the request left. An error
        raised before the request was admitted needs no ending; a failed admission
        raises its own error, not the SDK's wrapping of it.
        """
        sending = _Sending(self._settings.scheduler, plan, left)
        sending.admission = admitted
        # Checked at each call: a client whose hooks were replaced since `wrap` gets ours
        # back (or, without an HTTP client of that kind, is admitted before it runs).
        hooked = self._owner is not None and _admit_at_send(self._owner, self._settings)
        if not hooked and admitted is None:
            await sending.admit()
        token = _SENDING.set(sending)
        try:
            answer = await send()
        except BaseException as error:
            if sending.error is not None:
                raise sending.error from None
            admission = sending.take()
            if admission is not None:
                await self._settings.scheduler.finish(admission, error, model=plan.model)
            raise
        finally:
            _SENDING.reset(token)
        if sending.admission is None:
            # The client sent nothing through its HTTP client (a test double, or an SDK
            # that answers from elsewhere): admitted now, so that the call is counted.
            await sending.admit()
        admission = sending.take()
        assert admission is not None
        return answer, admission

    async def _call(
        self,
        params: dict[str, Any],
        plan: _Plan,
        left: float | None,
        admitted: Admission | None = None,
    ) -> Any:
        """One admission, one request, settled with the answer's usage."""
        result, admission = await self._sent(lambda: self._create(**params), plan, left, admitted)
        try:
            plan.settle(admission, read_usage(result))
        finally:
            await self._settings.scheduler.finish(admission, None, model=plan.model)
        return result

    async def _open(
        self,
        params: dict[str, Any],
        plan: _Plan,
        left: float | None,
        hide_usage: bool,
        admitted: Admission | None = None,
    ) -> _AdmittedStream:
        """One admission, one stream opened: the stream holds the admission from here."""
        stream, admission = await self._sent(lambda: self._create(**params), plan, left, admitted)
        reading = StreamReading(self._settings.api.stream_usage, hide_usage)
        return _AdmittedStream(stream, self._settings.scheduler, admission, plan, reading)

    async def enter(self, params: dict[str, Any]) -> tuple[Any, Any, Admission, _Plan]:
        """Open a stream helper's stream (``async with client.messages.stream(...)``):
        the helper's manager, the stream it gave, and the admission that holds it."""
        plan = await self._plan(params)

        async def open_(left: float | None) -> tuple[Any, Any, Admission]:
            manager = self._create(**params)

            async def send() -> Any:
                return await manager.__aenter__()

            stream, admission = await self._sent(send, plan, left)
            return manager, stream, admission

        manager, stream, admission = await self._retried(open_, plan)
        return manager, stream, admission, plan

    @property
    def scheduler(self) -> Scheduler:
        return self._settings.scheduler


class _AdmittedStream(HeldStream):
    """A provider stream that holds its admission until it ends or is closed.

    Iterate it as the original (``async for chunk in stream``); ``async with
    stream`` or ``await stream.close()`` ends it early. Its usage chunk, if the
    caller did not ask for one, is read for the settle and not shown. A stream
    dropped unfinished (a loop broken out of without closing) is reported by its
    admission's finalizer, which hands the capacity back on the scheduler's loop.
    """

    def __init__(
        self,
        stream: Any,
        scheduler: Scheduler,
        admission: Admission,
        plan: _Plan,
        reading: StreamReading,
    ) -> None:
        super().__init__(stream, plan, admission, reading)
        self._scheduler = scheduler
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _AdmittedStream:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._stream.__aiter__()
        try:
            while True:
                chunk = await self._iterator.__anext__()
                if not self._reading.hides(chunk):
                    return chunk
        except StopAsyncIteration:
            await self._finish(None)
            raise
        except BaseException as error:
            await self._finish(error)
            raise

    async def close(self) -> None:
        """Close the provider stream and end the admission."""
        try:
            await self._stream.close()
        finally:
            await self._finish(None)

    async def __aenter__(self) -> _AdmittedStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stream.close()
        finally:
            await self._finish(exc)  # a rate-limit answer raised in the block is answered

    async def _finish(self, error: BaseException | None) -> None:
        admission = self._take()
        if admission is None:
            return
        try:
            self._plan.settle(admission, self._reading.usage)
        finally:
            await self._scheduler.finish(admission, error, model=self._plan.model)


class _StreamManager(HelperManager[_Create, _Plan]):
    """``async with client.messages.stream(...) as stream:`` of a wrapped client: the
    helper's stream, opened through one admission and holding it until the block ends.
    The stream is the helper's own (``text_stream``, ``get_final_message()``...); it is
    settled with the usage it has seen when the block ends."""

    async def __aenter__(self) -> Any:
        manager, stream, admission, plan = await self._create.enter(self._params_to_open())
        return self._hold(manager, stream, admission, plan)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        opened = self._take()
        if opened is None:
            return
        manager, admission, plan = opened
        try:
            await manager.__aexit__(exc_type, exc, tb)
        finally:
            try:
                plan.settle(admission, final_usage(self._stream))
            finally:
                await self._create.scheduler.finish(admission, exc, model=plan.model)
