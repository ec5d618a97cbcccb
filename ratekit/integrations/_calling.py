"""What every wrapped call goes through, async or sync: the APIs `wrap` knows, the
call's plan (its estimate, reservation and settle), its admission as its request leaves,
the SDK-like retries, and the reading of a stream's usage. No client is called here:
`_wrap` (async clients, and `wrap` itself) and `_wrap_sync` (sync clients) do that.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from anyio.lowlevel import EventLoopToken

from .._admission import Admission, check_priority, check_timeout
from .._calibration import PromptEstimate
from .._errors import InvalidArgumentError, InvalidCostError
from .._limits import check_amount
from .._scheduler import Scheduler
from .._signals import parse_retry_after
from .._tenants import check_tenant_name
from .._tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    RequestShapeError,
    TokenEstimator,
    estimate_request_tokens,
)
from ._counts import PendingCount, TokenCounts, lookup
from ._usage import CallPrice, Usage, message_event_usage, read_usage

R = TypeVar("R")


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


def _checked(where: str, check: Callable[[Any], R], value: object) -> R:
    """`check(value)`, its error naming `where` (the argument as the caller gave it)."""
    try:
        return check(value)
    except (InvalidArgumentError, InvalidCostError) as error:
        raise type(error)(f"{where}: {error}") from None


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
    request_hook, response_hook = settings.hooks
    if request_hook not in hooks["request"] or response_hook not in hooks["response"]:
        if request_hook not in hooks["request"]:
            hooks["request"].append(request_hook)
        if response_hook not in hooks["response"]:
            hooks["response"].append(response_hook)
        http.event_hooks = hooks  # type: ignore[union-attr]
    return True


class _Settings:
    """What `wrap` was given, for every call of the wrapped client."""

    __slots__ = (
        "api",
        "counts",
        "estimator",
        "hooks",
        "loop",
        "priority",
        "scheduler",
        "timeout",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        estimator: TokenEstimator,
        priority: int,
        timeout: float | None,
        api: _Api,
        loop: EventLoopToken | None,
        counts: TokenCounts | None,
        hooks: tuple[Callable[[Any], Any], Callable[[Any], Any]],
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
        # The request and response hooks of the client's HTTP client (async or sync).
        self.hooks = hooks


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
    # The tenant whose share the call takes: ``ratekit_tenant=``, else the one of the
    # caller's `ratekit.tenant` block when the call was made; None: no tenant.
    tenant: str | None = None

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
    settings: _Settings,
    kind: str,
    params: dict[str, Any],
    counted: int | None = None,
    *,
    tenant: str | None = None,
) -> _Plan:
    """Take the ``ratekit_*`` options out of `params` and estimate the call; `counted` is
    the prompt's exact count by the provider, when it was asked (see `TokenCounts`).

    `tenant` is the tenant of the caller's `ratekit.tenant` block, read in the caller's
    own task or thread (a sync call is planned on the scheduler's loop, another thread);
    ``ratekit_tenant=`` wins over it.
    """
    exact_tokens = params.pop("ratekit_tokens", None)
    exact_cost = params.pop("ratekit_cost", None)
    named = params.pop("ratekit_tenant", None)
    if named is not None:
        tenant = check_tenant_name(named, "ratekit_tenant")
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
        cost = price.estimate(counted, output, writes_cache=_writes_cache(price, params))
    elif exact_tokens is None:
        estimate, output = _estimate(kind, params, settings.estimator)
        ceiling = scheduler.limiter(model).max_tokens
        prompt = PromptEstimate(scheduler.estimates, model, estimate, output, ceiling)
        tokens = prompt.reserved + output
        cost = price.estimate(prompt.reserved, output, writes_cache=_writes_cache(price, params))
    else:
        tokens = check_amount("ratekit_tokens", exact_tokens)
        cost = price.estimate_total(tokens)
    if exact_cost is not None:
        cost = check_amount("ratekit_cost", exact_cost)
    reads_count = scheduler.account.profile.cache_reads_count
    return _Plan(tokens, cost, model, priority, timeout, price, prompt, reads_count, tenant)


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


def _writes_cache(price: CallPrice, params: Mapping[str, Any]) -> bool:
    """Whether a priced request marks a prompt prefix for the provider's cache
    (``cache_control`` anywhere in it): its prompt may then be billed at the cache-write
    price. An unpriced one is not read (a whole prompt's JSON, for nothing)."""
    if not price.priced:
        return False
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

    def _counted(self, params: Mapping[str, Any]) -> int | PendingCount | None:
        """The provider's count of the call's prompt when it is to be counted: the count
        kept from an earlier call, or the count to ask (`PendingCount`); None: estimated."""
        counts = self._settings.counts
        if self._count is None or counts is None or "ratekit_tokens" in params:
            return None
        return lookup(counts, self._count, params)


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
                tenant=plan.tenant,
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


class HeldStream:
    """What an admitted stream holds, async or sync: the provider's stream (every other
    attribute passes through to it), the admission until the stream ends, and what its
    chunks said. No I/O: each wrapper ends the admission in its own way."""

    def __init__(
        self, stream: Any, plan: _Plan, admission: Admission, reading: StreamReading
    ) -> None:
        self._stream = stream
        self._plan = plan
        self._admission: Admission | None = admission  # None once finished
        self._reading = reading

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _take(self) -> Admission | None:
        """The admission, to end now (None: ended already)."""
        admission, self._admission = self._admission, None
        return admission

    def __del__(self) -> None:
        # Dropped unfinished: the admission's own finalizer warns and hands it back on
        # the scheduler's loop.
        if self._admission is not None:
            self._plan.settle_dropped(self._admission, self._reading.usage)


# A stream helper's manager: the wrapped create that opens its stream, and what ends
# the stream's admission (the plan, or the sending of a sync client).
_Opener = TypeVar("_Opener")
_Ender = TypeVar("_Ender")


class HelperManager(Generic[_Opener, _Ender]):
    """What the manager of a wrapped client's stream helper (``messages.stream(...)``)
    holds, async or sync: one stream, opened through one admission that it holds until
    its block ends. No I/O: each wrapper opens and ends it in its own way."""

    def __init__(self, create: _Opener, params: dict[str, Any]) -> None:
        self._create = create
        self._params = params
        # The helper's own manager, the admission and what ends it, while open.
        self._opened: tuple[Any, Admission, _Ender] | None = None
        self._stream: Any = None

    def _params_to_open(self) -> dict[str, Any]:
        """The call's params, for the one stream this manager opens."""
        if self._opened is not None or self._stream is not None:
            raise RuntimeError("this stream was already opened; call messages.stream() again")
        return dict(self._params)

    def _hold(self, manager: Any, stream: Any, admission: Admission, ender: _Ender) -> Any:
        """Keep what the opened `stream` needs to end; returns the stream."""
        self._opened = (manager, admission, ender)
        self._stream = stream
        return stream

    def _take(self) -> tuple[Any, Admission, _Ender] | None:
        """What ends the stream, to end it now (None: ended already, or never opened)."""
        opened, self._opened = self._opened, None
        return opened


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


def final_usage(stream: Any) -> Usage | None:
    """The usage a stream helper's stream (an Anthropic ``MessageStream``) has seen: its
    message so far, None before its first event."""
    try:
        snapshot = stream.current_message_snapshot
    except (AssertionError, AttributeError, RuntimeError):
        return None
    return read_usage(snapshot)
