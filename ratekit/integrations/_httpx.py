"""`RateLimitedTransport`: an httpx transport that admits LLM calls through a scheduler.

For OpenAI-compatible clients other than the `openai` package (or plain
``httpx.AsyncClient`` code): every ``POST`` with a JSON object body to a path
ending in ``/chat/completions``, ``/completions``, ``/embeddings`` or
``/responses`` waits for `Scheduler.slot` (prompt + max output tokens, the
body's ``model``) before it is sent; any other request passes through
unadmitted. The answer is read (or, for an event stream, scanned as it is read)
for its ``usage``, which settles the reservation. A rate-limit answer (a 429, or
a provider's own rate-limit code) pauses the account and is returned unchanged:
retrying it is the client's business.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx

from .._scheduler import Scheduler, Slot
from .._signals import classify
from .._tokens import TokenEstimator, default_estimator, estimate_request_tokens
from ._usage import usage_tokens

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
PRIORITY_EXTENSION = "ratekit_priority"


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
    with this one). `estimator` counts prompt tokens (`default_estimator` of the
    account's profile by default); `priority` and `timeout` (seconds of waiting
    for admission, None for no bound) are those of `Scheduler.slot`. Per request,
    ``extensions={"ratekit_tokens": n, "ratekit_priority": p}`` override the
    estimate and the priority.

    A plain answer is read whole here and settles with its ``usage``. An event
    stream (``"stream": true``) keeps its admission until it is read to its end
    or closed, settling with the last ``usage`` among its ``data:`` events (ask
    for one with ``stream_options: {"include_usage": true}``; a stream without
    one, or a compressed one, keeps its estimate: the safe side). A request that
    never reached the provider (``httpx.ConnectError``) hands its reservation back.

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
    ) -> None:
        self.scheduler = scheduler
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._estimator = estimator or default_estimator(scheduler.account.profile)
        self._priority = priority
        self._timeout = timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = _kind_of(request)
        if kind is None:
            return await self._transport.handle_async_request(request)
        body = _json_object(await request.aread())
        if body is None:
            return await self._transport.handle_async_request(request)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        slot = self.scheduler.slot(
            tokens=self._tokens(request, kind, body),
            model=model,
            priority=int(request.extensions.get(PRIORITY_EXTENSION, self._priority)),
            timeout=self._timeout,
        )
        await slot.__aenter__()
        try:
            response = await self._transport.handle_async_request(request)
            if body.get("stream") is True and _is_event_stream(response):
                return _with_stream(response, _AdmittedByteStream(response, slot))
            return await self._read_and_settle(request, response, slot)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if isinstance(exc, httpx.ConnectError) and slot.permit is not None:
                    await slot.permit.refund()
                await slot.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    def _tokens(self, request: httpx.Request, kind: str, body: dict[str, Any]) -> float:
        exact = request.extensions.get(TOKENS_EXTENSION)
        if exact is not None:
            return float(exact)
        prompt, output = estimate_request_tokens(kind, body, self._estimator)
        return float(prompt + output)

    async def _read_and_settle(
        self, request: httpx.Request, response: httpx.Response, slot: Slot
    ) -> httpx.Response:
        """Read `response` whole, settle or answer a rate limit, and release the slot."""
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        # A twin to decode (content-encoding) and parse; the caller gets an unread copy.
        decoded = _with_stream(response, httpx.ByteStream(raw))
        await decoded.aread()
        if classify(decoded, now_s=time.time()) is not None:
            # Answered by the slot as a raised 429 would be (the scheduler's classifier,
            # one pause per burst), but returned, not raised.
            refusal = httpx.HTTPStatusError("rate limited", request=request, response=decoded)
            with anyio.CancelScope(shield=True):
                await slot.__aexit__(type(refusal), refusal, None)
        else:
            used = usage_tokens(_json_object(decoded.content))
            if used is not None and slot.permit is not None:
                slot.permit.settle(tokens=used)
            await slot.__aexit__(None, None, None)
        return _with_stream(response, httpx.ByteStream(raw))

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

    def __init__(self, response: httpx.Response, slot: Slot) -> None:
        self._stream = response.stream
        self._slot: Slot | None = slot
        # Only an unencoded stream can be scanned as it goes.
        self._scan = response.headers.get("content-encoding", "identity") == "identity"
        # The bytes after the last newline, waiting for the rest of their line.
        self._partial = b""
        self._usage: float | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        async for chunk in self._stream:
            if self._scan:
                self._read_lines(chunk)
            yield chunk
        # The connection goes back to the pool before the slot frees, so that the call
        # admitted next finds it instead of opening one (a delay the margin must cover).
        await self.aclose()

    def _read_lines(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                used = usage_tokens(_json_object(line[5:].strip()))
                if used is not None:
                    self._usage = used

    async def aclose(self) -> None:
        try:
            if isinstance(self._stream, httpx.AsyncByteStream):
                await self._stream.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()

    async def _finish(self) -> None:
        slot, self._slot = self._slot, None
        if slot is None:
            return
        if self._usage is not None and slot.permit is not None:
            slot.permit.settle(tokens=self._usage)
        await slot.__aexit__(None, None, None)

    def __del__(self) -> None:
        # Dropped unclosed: give the slot back where that needs no I/O (memory);
        # on a shared backend the permit's finaliser warns and its lease lapses.
        slot, self._slot = self._slot, None
        permit = slot.permit if slot is not None else None
        if permit is not None and permit.granted:
            if self._usage is not None:
                permit.settle(tokens=self._usage)
            permit.release_nowait()
