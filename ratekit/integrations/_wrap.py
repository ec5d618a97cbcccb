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
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import anyio
from anyio.lowlevel import EventLoopToken

from .._admission import Admission, check_priority, check_timeout
from .._calibration import PromptEstimate
from .._errors import InvalidArgumentError, InvalidCostError
from .._limits import check_amount
from .._scheduler import Scheduler
from .._signals import parse_retry_after
from .._tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    BackgroundEstimator,
    RequestShapeError,
    TokenEstimator,
    estimate_request_tokens,
)
from ._calls import SyncScheduler
from ._counts import TokenCounts, count_params, counted_fields
from ._sending import stamp_when_sent
from ._usage import CallPrice, Usage, message_event_usage, read_usage

R = TypeVar("R")
# The client's own type: `wrap` hands back a client used exactly as the one it was given.
C = TypeVar("C")

# The SDKs' own retry timing (openai/_constants.py, anthropic/_constants.py: the same),
# which ratekit's retries of failures other than rate limits follow: 0.5 s doubling up
# to 8 s, less up to 25 % of jitter, or the answer's Retry-After when it asks for at
# most two minutes (beyond: no retry).
_INITIAL_RETRY_DELAY_S = 0.5
_MAX_RETRY_DELAY_S = 8.0
_MAX_RETRY_AFTER_S = 120.0
# What the SDKs retry besides rate limits (left to the scheduler): a timed-out request,
# a lock timeout, and the server's errors.
_RETRIED_STATUSES = frozenset({408, 409})
# Answers that are the scheduler's to retry, with a cooldown: a rate limit, and the
# Anthropic API's "overloaded" (529).
_RATE_LIMIT_STATUSES = frozenset({429, 529})
# Methods of the client that return a changed copy of it: the copy is wrapped too.
_COPIES = ("copy", "with_options")


def _chunk_usage(seen: Usage | None, chunk: object) -> Usage | None:
    """An OpenAI stream's usage after `chunk`: the last one that says any."""
    return read_usage(chunk) or seen


@dataclass(frozen=True, slots=True)
class _Api:
    """What `wrap` knows of one API's client: which methods it admits, under which
    request kind (see `estimate_request_tokens`), which stream helpers it holds an
    admission through, and how a stream tells its usage."""

    name: str
    # The methods that are admitted, by their attribute path, and their request kind.
    admitted: Mapping[tuple[str, ...], str]
    # Stream helpers (``messages.stream``), by their path, and their request kind.
    helpers: Mapping[tuple[str, ...], str]
    stream_usage: Callable[[Usage | None, object], Usage | None]

    @property
    def prefixes(self) -> frozenset[tuple[str, ...]]:
        """The paths that lead to an admitted method (the method's own excluded)."""
        paths = [*self.admitted, *self.helpers]
        return frozenset(path[:depth] for path in paths for depth in range(1, len(path)))


_OPENAI = _Api(
    "openai",
    admitted={
        ("chat", "completions", "create"): "chat.completions.create",
        ("chat", "completions", "parse"): "chat.completions.create",
        ("completions", "create"): "completions.create",
        ("embeddings", "create"): "embeddings.create",
        ("responses", "create"): "responses.create",
    },
    helpers={},
    stream_usage=_chunk_usage,
)
_ANTHROPIC = _Api(
    "anthropic",
    admitted={
        ("messages", "create"): "messages.create",
        ("beta", "messages", "create"): "messages.create",
    },
    helpers={("messages", "stream"): "messages.create"},
    stream_usage=message_event_usage,
)


def _api_of(client: Any) -> _Api:
    """The API of `client`: the Anthropic one for the ``anthropic`` package's clients
    (and any client with ``messages`` but no ``chat``), else the OpenAI one."""
    package = type(client).__module__.partition(".")[0]
    if package == "anthropic":
        return _ANTHROPIC
    if package != "openai" and hasattr(client, "messages") and not hasattr(client, "chat"):
        return _ANTHROPIC
    return _OPENAI


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
    admissions, over all tries) override the defaults; they are not sent.

    `count_tokens` (Anthropic clients): count each call's prompt exactly with the
    provider's free ``messages.count_tokens`` before admitting it, instead of
    estimating it. The counts are kept by prompt (a prompt sent again is not counted
    again); a count that fails or is slow falls back to the estimate. True uses a
    fresh `TokenCounts`; pass your own to read what the counts cost
    (`TokenCounts.statistics`).
    """
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
    api = _api_of(client)
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
    settings = _Settings(scheduler, estimator, priority, timeout, api, loop, counts)
    # A proxy with every attribute of `client`: typed as the client, so that a type
    # checker sees the SDK's own signatures and answers.
    return cast(C, _wrap_client(client, settings))


def _checked(where: str, check: Callable[[Any], R], value: object) -> R:
    """`check(value)`, its error naming `where` (the argument as the caller gave it)."""
    try:
        return check(value)
    except (InvalidArgumentError, InvalidCostError) as error:
        raise type(error)(f"{where}: {error}") from None


def _wrap_client(client: Any, settings: _Settings) -> _Proxy:
    if isinstance(client, RetryingClient):
        retries = client.max_retries
        quiet = client.with_options(max_retries=0)
    else:
        retries = 0
        quiet = client
    owner = quiet if _admit_at_send(quiet, settings) else None
    return _Proxy(client, quiet, (), settings, retries, owner)


# The call being sent in this task (or thread), for the hooks of its HTTP client.
_SENDING: ContextVar[_Sending | None] = ContextVar("ratekit_sending", default=None)


def _admit_at_send(client: Any, settings: _Settings) -> bool:
    """Admit `client`'s calls when their request is handed to its HTTP client.

    The SDKs build each request (validation, serialisation, headers) before they
    send it: under load that CPU is milliseconds a call, and hundreds of calls
    admitted at once leave the process up to hundreds of milliseconds after their
    admission, while the provider counts them at arrival. A request hook on the
    client's ``httpx`` client (httpx runs request hooks just before the
    transport) admits there instead, and a response hook reads the answer's
    rate-limit headers; both do nothing for requests that ratekit did not wrap.
    Returns False for a client without one (the call is then admitted before the
    SDK runs).
    """
    http = getattr(client, "_client", None)
    # An httpx client (or the openai SDK's httpx2 one, the same interface).
    hooks = getattr(http, "event_hooks", None)
    send = getattr(http, "send", None)
    if not (
        isinstance(hooks, dict)
        and isinstance(hooks.get("request"), list)
        and isinstance(hooks.get("response"), list)
        and callable(send)
        and inspect.iscoroutinefunction(send) != (settings.loop is not None)
    ):
        return False
    if settings.loop is None:
        request_hook: Callable[[Any], Any] = _admit_on_send
        response_hook: Callable[[Any], Any] = _observe_answer
    else:
        from ._wrap_sync import admit_on_send_sync, observe_answer_sync

        request_hook, response_hook = admit_on_send_sync, observe_answer_sync
    if request_hook not in hooks["request"] or response_hook not in hooks["response"]:
        if request_hook not in hooks["request"]:
            hooks["request"].append(request_hook)
        if response_hook not in hooks["response"]:
            hooks["response"].append(response_hook)
        http.event_hooks = hooks  # type: ignore[union-attr]
    return True


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


class _Settings:
    __slots__ = ("api", "counts", "estimator", "loop", "priority", "scheduler", "timeout")

    def __init__(
        self,
        scheduler: Scheduler,
        estimator: TokenEstimator,
        priority: int,
        timeout: float | None,
        api: _Api,
        loop: EventLoopToken | None,
        counts: TokenCounts | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.estimator = estimator
        self.priority = priority
        self.timeout = timeout  # seconds of waiting for admissions per call, None: no bound
        self.api = api
        # The scheduler's event loop, for a sync client called from threads; None: the
        # client is async and runs on that loop.
        self.loop = loop
        # Exact prompt counts from the provider (None: estimated).
        self.counts = counts


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
            from ._wrap_sync import SyncCreate

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
        from ._wrap_sync import SyncStreamManager

        return lambda **params: SyncStreamManager(create, params)
    return lambda **params: _StreamManager(create, params)


def _wrapped_copy(method: Callable[..., Any], settings: _Settings) -> Callable[..., _Proxy]:
    """`method` (a client's ``copy``/``with_options``) returning a wrapped copy."""

    def wrapped(*args: Any, **options: Any) -> _Proxy:
        return _wrap_client(method(*args, **options), settings)

    return wrapped


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one call asks of the scheduler, the same for each of its tries."""

    tokens: float  # prompt estimate + most output
    cost: float  # money estimate, in the profile's currency
    model: str | None
    priority: int
    timeout: float | None  # seconds of waiting for admissions, over all tries
    price: CallPrice
    prompt: PromptEstimate | None  # None: the caller gave exact tokens
    cache_reads_count: bool  # whether cache hits count toward the token rates

    def settle(self, admission: Admission, usage: Usage | None) -> None:
        """Settle `admission` with the answer's usage; learn how the prompt was counted."""
        counted = None
        if self.prompt is not None and usage is not None:
            self.prompt.learn(usage.input_tokens)
            counted = self.prompt.counted(usage.input_tokens)
            if counted is not None and not self.cache_reads_count:
                counted = max(counted - usage.cached_input_tokens, 0.0)
        self.price.settle(admission, self.as_counted(usage), counted)

    def settle_dropped(self, admission: Admission, usage: Usage | None) -> None:
        """Record on a dropped stream's admission the usage its chunks said (its finalizer
        then hands it back): touches nothing shared, as a finalizer must not."""
        if admission.granted and usage is not None:
            self.price.settle(admission, self.as_counted(usage))

    def as_counted(self, usage: Usage | None) -> Usage | None:
        """`usage` as the provider counts it toward its token rates (see `cache_reads_count`)."""
        if usage is not None and not self.cache_reads_count:
            return usage.without_cache_reads()
        return usage


def plan_call(
    settings: _Settings, kind: str, params: dict[str, Any], counted: int | None = None
) -> _Plan:
    """Take the ``ratekit_*`` options out of `params` and estimate the call; `counted` is
    the prompt's exact count by the provider, when it was asked (see `TokenCounts`)."""
    exact_tokens = params.pop("ratekit_tokens", None)
    exact_cost = params.pop("ratekit_cost", None)
    priority = _checked(
        "ratekit_priority", check_priority, params.pop("ratekit_priority", settings.priority)
    )
    timeout = _checked(
        "ratekit_timeout", check_timeout, params.pop("ratekit_timeout", settings.timeout)
    )
    scheduler = settings.scheduler
    model = params.get("model")
    model = model if isinstance(model, str) else None
    price = CallPrice(scheduler, model)
    prompt: PromptEstimate | None = None
    tokens: float
    if exact_tokens is None and counted is not None:
        output = _output_cap(kind, params)
        tokens = counted + output
        cost = price.estimate(counted, output, writes_cache=_writes_cache(params))
    elif exact_tokens is None:
        estimate, output = _estimate(kind, params, settings.estimator)
        ceiling = scheduler.limiter(model).max_tokens
        prompt = PromptEstimate(scheduler.estimates, model, estimate, output, ceiling)
        tokens = prompt.reserved + output
        cost = price.estimate(prompt.reserved, output, writes_cache=_writes_cache(params))
    else:
        tokens = check_amount("ratekit_tokens", exact_tokens)
        cost = price.estimate_total(tokens)
    if exact_cost is not None:
        cost = check_amount("ratekit_cost", exact_cost)
    reads_count = scheduler.account.profile.cache_reads_count
    return _Plan(tokens, cost, model, priority, timeout, price, prompt, reads_count)


def _estimate(kind: str, params: Mapping[str, Any], estimator: TokenEstimator) -> tuple[int, int]:
    """(prompt, most output) of a request: `estimate_request_tokens`, or for a request
    whose shape the estimator does not know (the provider is the judge of that, not
    ratekit), every text in it and the request's own output cap."""
    try:
        return estimate_request_tokens(kind, params, estimator)
    except RequestShapeError:
        text = json.dumps(params, ensure_ascii=False, default=str)
        return estimator.count(text), _output_cap(kind, params)


def _output_cap(kind: str, params: Mapping[str, Any]) -> int:
    """The most a request may output, as `estimate_request_tokens` reads it (its default
    when the request sets none it can read)."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return DEFAULT_MAX_OUTPUT_TOKENS


def _writes_cache(params: Mapping[str, Any]) -> bool:
    """Whether a request marks a prompt prefix for the provider's cache (``cache_control``
    anywhere in it): its prompt may then be billed at the cache-write price."""
    if "cache_control" in params:
        return True
    try:
        text = json.dumps(params, default=str)
    except (TypeError, ValueError, RecursionError):
        return False
    return '"cache_control"' in text


def stream_params(kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """`params` of a streamed call as sent, and whether the stream's usage chunk is
    ratekit's to read and not the caller's: an OpenAI chat stream is asked for its
    usage (``stream_options.include_usage``) when the caller did not ask."""
    if kind != "chat.completions.create" or _asks_for_usage(params):
        return params, False
    options = dict(params.get("stream_options") or {})
    options["include_usage"] = True
    return {**params, "stream_options": options}, True


class CreateBase:
    """What an admitted ``create`` (or stream helper) holds, async or sync."""

    __slots__ = ("_count", "_create", "_kind", "_owner", "_retries", "_settings")

    def __init__(
        self,
        create: Callable[..., Any],
        kind: str,
        settings: _Settings,
        retries: int,
        owner: Any,
        count: Callable[..., Any] | None = None,
    ) -> None:
        self._create = create  # the create (or stream helper) of the copy without retries
        self._kind = kind
        self._settings = settings
        self._retries = retries  # the client's own max_retries, for failures other than 429
        # The client whose HTTP client admits in its request hook (None: before the SDK).
        self._owner = owner
        self._count = count  # the provider's token count (None: not asked)


class _Create(CreateBase):
    """One admitted ``create`` of an async client."""

    __slots__ = ()

    async def _plan(self, params: dict[str, Any]) -> _Plan:
        """`plan_call`, with the prompt counted by the provider when asked (and kept)."""
        counts = self._settings.counts
        if self._count is None or counts is None or "ratekit_tokens" in params:
            return plan_call(self._settings, self._kind, params)
        fields = counted_fields(self._count)
        key = counts.key(params, fields)
        counted = counts.kept(key)
        if counted is None:
            started = counts.started()
            answer = None
            try:
                arguments = count_params(params, fields)
                answer = await self._count(**arguments, timeout=counts.timeout_s)
            except Exception:
                answer = None
            counted = counts.done(key, started, getattr(answer, "input_tokens", None))
        return plan_call(self._settings, self._kind, params, counted)

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
        self, send: Callable[[], Awaitable[Any]], plan: _Plan, left: float | None
    ) -> tuple[Any, Admission]:
        """One request sent (`send`) through one admission: the SDK's answer and the
        admission.

        The admission is made by the HTTP client's request hook as the request leaves
        (see `_admit_at_send`), else here before the SDK runs. An error raised before
        the request was admitted needs no ending; a failed admission raises its own
        error, not the SDK's wrapping of it.
        """
        sending = _Sending(self._settings.scheduler, plan, left)
        # Checked at each call: a client whose hooks were replaced since `wrap` gets ours
        # back (or, without an HTTP client of that kind, is admitted before it runs).
        if self._owner is None or not _admit_at_send(self._owner, self._settings):
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

    async def _call(self, params: dict[str, Any], plan: _Plan, left: float | None) -> Any:
        """One admission, one request, settled with the answer's usage."""
        result, admission = await self._sent(lambda: self._create(**params), plan, left)
        try:
            plan.settle(admission, read_usage(result))
        finally:
            await self._settings.scheduler.finish(admission, None, model=plan.model)
        return result

    async def _open(
        self, params: dict[str, Any], plan: _Plan, left: float | None, hide_usage: bool
    ) -> _AdmittedStream:
        """One admission, one stream opened: the stream holds the admission from here."""
        stream, admission = await self._sent(lambda: self._create(**params), plan, left)
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


class _Sending:
    """The admission of one request of a wrapped call, made once: before the SDK runs,
    or by the HTTP client's request hook as the request leaves."""

    __slots__ = ("_left", "admission", "done", "error", "plan", "scheduler")

    def __init__(self, scheduler: Scheduler, plan: _Plan, left: float | None) -> None:
        self.scheduler = scheduler
        self.plan = plan
        self._left = left
        self.admission: Admission | None = None
        self.error: Exception | None = None  # why the admission failed
        # The call is over: a task spawned while it was sent, which keeps this object
        # in its context, sends requests of its own that are not this call's.
        self.done = False

    async def admit(self) -> None:
        if self.admission is not None or self.done:
            return  # a redirect's second request belongs to the same admission
        plan = self.plan
        try:
            self.admission = await self.scheduler.admit(
                tokens=plan.tokens,
                cost=plan.cost,
                model=plan.model,
                priority=plan.priority,
                timeout=self._left,
            )
        except Exception as error:
            self.error = error
            raise

    def observe(self, response: Any) -> None:
        """Read the rate-limit headers of the answer to this call's request."""
        headers = getattr(response, "headers", None)
        if headers is not None:
            self.scheduler.observe(headers, model=self.plan.model)

    def take(self) -> Admission | None:
        """The admission, handed to the caller: a task spawned while the request was
        sent keeps this object in its context, and must not keep the admission alive."""
        admission, self.admission = self.admission, None
        self.done = True
        return admission


class _Deadline:
    """The seconds left of a call's `timeout` for waiting for admissions, over its tries,
    on the scheduler's clock."""

    __slots__ = ("_clock", "_deadline_s")

    def __init__(self, scheduler: Scheduler, plan: _Plan) -> None:
        self._clock = scheduler.limiter(plan.model).clock if plan.timeout is not None else None
        self._deadline_s = 0.0
        if self._clock is not None and plan.timeout is not None:
            self._deadline_s = self._clock.now() + plan.timeout

    def seconds(self) -> float | None:
        """Seconds left (never below 0), None for no bound."""
        if self._clock is None:
            return None
        return max(self._deadline_s - self._clock.now(), 0.0)


def _asks_for_usage(params: Mapping[str, Any]) -> bool:
    options = params.get("stream_options")
    return bool(isinstance(options, Mapping) and options.get("include_usage"))


def _sdk_failure(error: BaseException) -> tuple[int | None, Mapping[str, str]] | None:
    """(HTTP status or None for a connection error, headers) of an SDK's API error
    (openai's or anthropic's, whichever is loaded), else None."""
    for name in ("openai", "anthropic"):
        sdk = sys.modules.get(name)
        if sdk is None:
            continue
        if isinstance(error, sdk.APIStatusError):
            return error.status_code, error.response.headers
        if isinstance(error, sdk.APIConnectionError):  # timeouts are these too
            return None, {}
    return None


class SdkRetries:
    """The retries a call still has of what its SDK would retry (`sdk_retry_wait`): at
    most the client's ``max_retries``, with the SDK's backoff. No I/O: the async and the
    sync wrappers each wait in their own way."""

    __slots__ = ("_retried", "_retries")

    def __init__(self, retries: int) -> None:
        self._retries = retries
        self._retried = 0

    def wait_after(self, error: BaseException) -> float | None:
        """Seconds to wait before trying again after `error`, or None: raise it."""
        if self._retried >= self._retries:
            return None
        wait_s = sdk_retry_wait(error, self._retried)
        if wait_s is not None:
            self._retried += 1
        return wait_s


class StreamReading:
    """What a stream's chunks said so far: the usage (read by the API's reader), and
    whether a chunk is the usage chunk ratekit asked for and the caller did not (hidden).
    No I/O: the async and the sync admitted streams share it."""

    __slots__ = ("_hide_usage_chunk", "_read", "usage")

    def __init__(
        self, read: Callable[[Usage | None, object], Usage | None], hide_usage_chunk: bool
    ) -> None:
        self._read = read
        self._hide_usage_chunk = hide_usage_chunk
        self.usage: Usage | None = None

    def hides(self, chunk: object) -> bool:
        """Read `chunk`; True when it is to be kept from the caller."""
        usage = self._read(self.usage, chunk)
        if usage is self.usage:
            return False
        self.usage = usage
        return self._hide_usage_chunk and not getattr(chunk, "choices", None)


def sdk_retry_wait(error: BaseException, retried: int) -> float | None:
    """Seconds to wait before another try of a call that failed with `error`, as the
    SDKs would retry it, or None when they would not (rate limits: the scheduler's).

    `retried` is how many tries were retried already, for the backoff.
    """
    failure = _sdk_failure(error)
    if failure is None:
        return None
    status, headers = failure
    if status is not None:
        should_retry = headers.get("x-should-retry")
        if status in _RATE_LIMIT_STATUSES or should_retry == "false":
            return None
        wanted = should_retry == "true" or status in _RETRIED_STATUSES or status >= 500
        if not wanted:
            return None
    asked = {name: headers[name] for name in ("retry-after-ms", "retry-after") if name in headers}
    retry_after_s = parse_retry_after(asked, now_s=time.time()) if asked else None
    if retry_after_s is not None and retry_after_s > _MAX_RETRY_AFTER_S:
        return None
    if retry_after_s is not None and retry_after_s > 0:
        return retry_after_s
    backoff_s = min(_INITIAL_RETRY_DELAY_S * 2.0 ** min(retried, 30), _MAX_RETRY_DELAY_S)
    return backoff_s * (1 - 0.25 * random.random())


class _AdmittedStream:
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
        self._stream = stream
        self._scheduler = scheduler
        self._admission: Admission | None = admission  # None once finished
        self._plan = plan
        self._reading = reading
        self._iterator: AsyncIterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

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
        admission, self._admission = self._admission, None
        if admission is None:
            return
        try:
            self._plan.settle(admission, self._reading.usage)
        finally:
            await self._scheduler.finish(admission, error, model=self._plan.model)

    def __del__(self) -> None:
        # Dropped unfinished: the admission's own finalizer warns and hands it back on
        # the scheduler's loop.
        if self._admission is not None:
            self._plan.settle_dropped(self._admission, self._reading.usage)


def final_usage(stream: Any) -> Usage | None:
    """The usage a stream helper's stream (an Anthropic ``MessageStream``) has seen: its
    message so far, None before its first event."""
    try:
        snapshot = stream.current_message_snapshot
    except (AssertionError, AttributeError, RuntimeError):
        return None
    return read_usage(snapshot)


class _StreamManager:
    """``async with client.messages.stream(...) as stream:`` of a wrapped client: the
    helper's stream, opened through one admission and holding it until the block ends.
    The stream is the helper's own (``text_stream``, ``get_final_message()``...); it is
    settled with the usage it has seen when the block ends."""

    def __init__(self, create: _Create, params: dict[str, Any]) -> None:
        self._create = create
        self._params = params
        self._opened: tuple[Any, Admission, _Plan] | None = None
        self._stream: Any = None

    async def __aenter__(self) -> Any:
        if self._opened is not None or self._stream is not None:
            raise RuntimeError("this stream was already opened; call messages.stream() again")
        manager, stream, admission, plan = await self._create.enter(dict(self._params))
        self._opened = (manager, admission, plan)
        self._stream = stream
        return stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        opened, self._opened = self._opened, None
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
