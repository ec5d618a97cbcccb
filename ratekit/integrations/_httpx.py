"""`RateLimitedTransport`: an httpx transport that admits LLM calls through a scheduler.

For OpenAI-compatible clients other than the `openai` package (or plain
``httpx.AsyncClient`` code): every ``POST`` with a JSON object body to a path
ending in ``/chat/completions``, ``/completions``, ``/embeddings`` or
``/responses`` is one admission (`Scheduler.admit`: prompt + max output tokens,
the money they may cost, the body's ``model``) before it is sent; any other
request passes through unadmitted. The answer is read (or, for an event stream,
scanned as it is read) for its ``usage``, which settles the reservation. A
rate-limit answer (a 429, or a provider's own rate-limit code) pauses the account
and is returned unchanged: retrying it is the client's business, and each request
the client sends again is a new admission.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from .._admission import Admission, check_priority, check_timeout
from .._calibration import PromptEstimate
from .._errors import InvalidArgumentError, InvalidCostError
from .._limits import check_amount
from .._scheduler import Scheduler
from .._signals import classify
from .._tenants import check_tenant_name
from .._tokens import BackgroundEstimator, TokenEstimator, estimate_request_tokens
from ._sending import stamp_when_sent
from ._usage import CallPrice, Usage, read_usage, usage_tokens

__all__ = ["RateLimitedTransport", "usage_tokens"]

# Path endings that are admitted, and the request kind their body is estimated as.
# Longest first: "/chat/completions" also ends in "/completions".
_KINDS = (
    ("/chat/completions", "chat.completions.create"),
    ("/completions", "completions.create"),
    ("/embeddings", "embeddings.create"),
    ("/responses", "responses.create"),
)
# Per-request overrides, given as ``extensions={...}`` on an httpx request; not sent.
TOKENS_EXTENSION = "ratekit_tokens"
COST_EXTENSION = "ratekit_cost"
PRIORITY_EXTENSION = "ratekit_priority"

# A request's tenant: a name, or a function of the request that gives one (or None).
TenantOf = str | Callable[[httpx.Request], str | None] | None


def _kind_of(request: httpx.Request) -> str | None:
    if request.method != "POST":
        return None
    path = request.url.path.rstrip("/")
    for ending, kind in _KINDS:
        if path.endswith(ending):
            return kind
    return None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


class RateLimitedTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` whose LLM calls go through `scheduler`.

    ``httpx.AsyncClient(transport=RateLimitedTransport(scheduler))``. `transport`
    sends the requests (a new ``httpx.AsyncHTTPTransport()`` by default; closed
    with this one). `estimator` counts prompt tokens (by default a
    `BackgroundEstimator` of the account's profile, which never blocks the loop);
    `priority` and `timeout` (seconds of waiting for admission, None for no bound)
    are those of `Scheduler.admit`. Per request, ``extensions={"ratekit_tokens": n,
    "ratekit_cost": c, "ratekit_priority": p}`` override the estimates and the
    priority. `tenant` names the tenant whose share each request takes: a str, or a
    function of the ``httpx.Request`` that gives one (say, from a header), or None;
    a request without one is the tenant of the `ratekit.tenant` block it is sent in.

    Every request of those sent (each one the client sends again included) is one
    admission, ended once (`Scheduler.finish`) on every path. A model the profile
    prices reserves the most its prompt and maximum output cost, and settles the
    real cost from the answer's usage, so money rates (spend budgets) hold; an
    unpriced model costs 0.

    A plain answer is read whole here, settles with its ``usage`` and ends its
    admission before it is returned. An event stream (``"stream": true``) keeps
    its admission until it is read to its end or closed, settling with the last
    ``usage`` among its ``data:`` events (ask for one with ``stream_options:
    {"include_usage": true}``; a stream without one, or a compressed one, keeps
    its estimate: the safe side). A stream dropped without being closed gives its
    capacity back on the scheduler's loop, never from the garbage collector: its
    byte iterator is closed there, or its admission's finalizer warns and hands
    it back; close it (``async with client.stream(...)``). A rate-limit
    answer ends its admission and is then answered by the scheduler (the account
    pauses). A request that never reached the provider (``httpx.ConnectError``)
    hands its reservation back.

    Use one per event loop, shared by any number of tasks and clients.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        estimator: TokenEstimator | None = None,
        priority: int = 0,
        timeout: float | None = None,
        tenant: TenantOf = None,
    ) -> None:
        if not isinstance(scheduler, Scheduler):
            raise InvalidArgumentError(
                f"RateLimitedTransport: scheduler must be a ratekit.Scheduler, got {scheduler!r}"
            )
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise InvalidArgumentError(
                "RateLimitedTransport: transport must be an httpx.AsyncBaseTransport or None, "
                f"got {transport!r}"
            )
        if estimator is None:
            estimator = BackgroundEstimator(scheduler.account.profile)
        elif not isinstance(estimator, TokenEstimator):
            raise InvalidArgumentError(
                "RateLimitedTransport: estimator must have count(text) -> int (a "
                f"TokenEstimator), got {estimator!r}"
            )
        try:
            self._priority = check_priority(priority)
            self._timeout = check_timeout(timeout)
        except (InvalidArgumentError, InvalidCostError) as error:
            raise type(error)(f"RateLimitedTransport: {error}") from None
        if tenant is not None and not callable(tenant):
            check_tenant_name(tenant, "RateLimitedTransport: tenant")
        self._tenant = tenant
        self.scheduler = scheduler
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._estimator = estimator

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = _kind_of(request)
        if kind is None:
            return await self._transport.handle_async_request(request)
        body = _json_object(await request.aread())
        if body is None:
            return await self._transport.handle_async_request(request)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        price = CallPrice(self.scheduler, model)
        tokens, cost, prompt = self._estimate(request, kind, body, price)
        admission = await self.scheduler.admit(
            tokens=tokens,
            cost=cost,
            model=model,
            priority=request.extensions.get(PRIORITY_EXTENSION, self._priority),
            timeout=self._timeout,
            tenant=self._tenant_of(request),
        )
        let_go = stamp_when_sent(request, admission)
        try:
            response = await self._transport.handle_async_request(request)
        except BaseException as error:
            try:
                if isinstance(error, httpx.ConnectError):
                    await admission.refund()  # never sent: nothing counts
            finally:
                await self.scheduler.finish(admission, error, model=model)
            raise
        finally:
            let_go()  # the body was written by now, or never will be: the response it
            # is kept with must not keep the admission (and its limiter)
        if body.get("stream") is True and _is_event_stream(response):
            stream = _AdmittedByteStream(response, self.scheduler, admission, model, price, prompt)
            return _with_stream(response, stream)
        return await self._read_and_finish(request, response, admission, model, price, prompt)

    def _tenant_of(self, request: httpx.Request) -> str | None:
        """The tenant of `request` (None: the one of its `ratekit.tenant` block, if any)."""
        tenant = self._tenant
        if not callable(tenant):
            return tenant
        named = tenant(request)
        return None if named is None else check_tenant_name(named, "RateLimitedTransport: tenant")

    def _estimate(
        self, request: httpx.Request, kind: str, body: dict[str, Any], price: CallPrice
    ) -> tuple[float, float, PromptEstimate | None]:
        """(tokens, cost) to reserve: the extensions', else estimated from the body (its
        prompt scaled as the scheduler learned, see `Scheduler.estimates`)."""
        exact_tokens = request.extensions.get(TOKENS_EXTENSION)
        exact_cost = request.extensions.get(COST_EXTENSION)
        prompt: PromptEstimate | None = None
        if exact_tokens is not None:
            tokens = check_amount(f"extensions[{TOKENS_EXTENSION!r}]", exact_tokens)
            cost = price.estimate_total(tokens)
        else:
            estimate, output = estimate_request_tokens(kind, body, self._estimator)
            model = body.get("model") if isinstance(body.get("model"), str) else None
            ceiling = self.scheduler.limiter(model).max_tokens
            prompt = PromptEstimate(self.scheduler.estimates, model, estimate, output, ceiling)
            tokens = float(prompt.reserved + output)
            cost = price.estimate(prompt.reserved, output)
        if exact_cost is not None:
            cost = check_amount(f"extensions[{COST_EXTENSION!r}]", exact_cost)
        return tokens, cost, prompt

    async def _read_and_finish(
        self,
        request: httpx.Request,
        response: httpx.Response,
        admission: Admission,
        model: str | None,
        price: CallPrice,
        prompt: PromptEstimate | None,
    ) -> httpx.Response:
        """Read `response` whole, settle it, and end the admission (answering a rate limit)."""
        error: BaseException | None = None
        # Read whole already (the answer of a mock transport): parsed and returned as it is.
        returned: httpx.Response | None = response if response.is_stream_consumed else None
        raw = b""
        try:
            if returned is not None:
                decoded = returned
            else:
                try:
                    raw = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()
                # A twin to decode (content-encoding) and parse; the caller gets an unread copy.
                decoded = _with_stream(response, httpx.ByteStream(raw))
                await decoded.aread()
            if response.status_code >= 400 or classify(decoded, now_s=time.time()) is not None:
                # Answered by the scheduler as a raised 429 would be, but returned, not raised.
                error = httpx.HTTPStatusError("refused", request=request, response=decoded)
            else:
                usage = read_usage(_json_object(decoded.content))
                counted = None
                if prompt is not None and usage is not None:
                    prompt.learn(usage.input_tokens)
                    counted = prompt.counted(usage.input_tokens)
                price.settle(admission, usage, counted)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await self.scheduler.finish(admission, error, model=model)
        return returned if returned is not None else _with_stream(response, httpx.ByteStream(raw))

    async def aclose(self) -> None:
        await self._transport.aclose()


def _is_event_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return 200 <= response.status_code < 300 and content_type.startswith("text/event-stream")


def _with_stream(response: httpx.Response, stream: httpx.AsyncByteStream) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        extensions=response.extensions,
    )


class _AdmittedByteStream(httpx.AsyncByteStream):
    """An event stream that holds its admission until it ends or is closed.

    Passes the bytes through unchanged and scans complete ``data:`` lines for a
    ``usage`` object; the last one found settles the reservation.
    """

    def __init__(
        self,
        response: httpx.Response,
        scheduler: Scheduler,
        admission: Admission,
        model: str | None,
        price: CallPrice,
        prompt: PromptEstimate | None,
    ) -> None:
        self._stream = response.stream
        self._scheduler = scheduler
        self._admission: Admission | None = admission  # None once ended
        self._model = model
        self._price = price
        self._prompt = prompt
        # Only an unencoded stream can be scanned as it goes.
        self._scan = response.headers.get("content-encoding", "identity") == "identity"
        # The bytes after the last newline, waiting for the rest of their line.
        self._partial = b""
        self._usage: Usage | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        try:
            async for chunk in self._stream:
                if self._scan:
                    self._read_lines(chunk)
                yield chunk
        except GeneratorExit:  # the iterator closed early: as aclose()
            await self._end(None)
            raise
        except BaseException as error:
            await self._end(error)
            raise
        # The connection goes back to the pool before the admission ends, so that the
        # call admitted next finds it instead of opening one (a delay the margin covers).
        await self.aclose()

    def _read_lines(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                usage = read_usage(_json_object(line[5:].strip()))
                if usage is not None:
                    self._usage = usage

    async def aclose(self) -> None:
        try:
            if isinstance(self._stream, httpx.AsyncByteStream):
                await self._stream.aclose()
        finally:
            await self._end(None)

    async def _end(self, error: BaseException | None) -> None:
        admission, self._admission = self._admission, None
        if admission is None:
            return
        try:
            counted = None
            if self._prompt is not None and self._usage is not None:
                self._prompt.learn(self._usage.input_tokens)
                counted = self._prompt.counted(self._usage.input_tokens)
            self._price.settle(admission, self._usage, counted)
        finally:
            await self._scheduler.finish(admission, error, model=self._model)

    def __del__(self) -> None:
        # Dropped unclosed: the admission's own finalizer warns and hands it back on
        # the scheduler's loop. Only the usage already seen is recorded on it here,
        # which touches nothing shared.
        admission = self._admission
        if admission is not None and admission.granted and self._usage is not None:
            self._price.settle(admission, self._usage)
