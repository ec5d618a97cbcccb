"""A local provider that enforces a tier strictly, over HTTP: OpenAI's API and Anthropic's.

`MockProvider` serves ``/v1/chat/completions`` (plain and SSE streaming),
``/v1/embeddings``, ``/v1/responses`` (plain only) and ``/v1/models`` on
127.0.0.1, so that the real `openai` client (``base_url=server.base_url``, any
API key) can be run against a provider that counts rolling windows exactly
(`StrictWindows`, the same math as `simulation.StrictProvider`) and answers 429
on any excess. The same server, with the same windows (one account, whichever API
a call uses), serves Anthropic's ``/v1/messages`` (plain and streaming) and
``/v1/messages/count_tokens`` to the real `anthropic` client
(``base_url=server.anthropic_base_url``, which has no ``/v1``).

The provider is an ASGI application (`MockProvider` itself is the callable), served
by uvicorn over HTTP/1.1 with its pure-Python h11 protocol (the ``cli`` extra;
without uvicorn, importing this module raises `MissingExtraError`): keep-alive,
Content-Length or chunked request bodies, streamed answers sent chunk by chunk as
their tokens are produced; a malformed request gets a 400 and a body over 32 MiB a
413. A client that goes away before its answer is complete ends its call at once:
its concurrency slot is freed and `CallRecord.completed` is false. It runs on
asyncio (not trio). In-process without a port, ``httpx.ASGITransport(app=server)``
serves every endpoint (no `start` needed), but httpx collects a whole answer before
returning it: a stream arrives in one piece, after all its latency.

Time compression: with ``speed=60`` every period of the limits is divided by 60
(`Limits.compressed`), so a minute lasts a second, and so are the latencies
(given in provider seconds). Header values (``Retry-After``, ``retry-after-ms``,
``x-ratelimit-reset-*``) are in real, compressed seconds: what a client must wait.

Tokens, deterministic so that tests can check settled usage:

- a text's tokens are ``ceil(n / 4) + c`` where ``c`` counts CJK ideographs and
  ``n`` every other character; a prompt's tokens sum its messages' text contents
  (images and other parts count 0);
- the output has ``min(max_tokens, completion_tokens)`` tokens of filler words, one
  token a word, where ``max_tokens`` is the request's ``max_completion_tokens``,
  ``max_tokens`` or ``max_output_tokens``, else `default_max_tokens`;
- the reservation (``reserve`` counting) is prompt + ``max_tokens``; the usage
  (``usage`` counting) is prompt + output, recorded when the call ends.

Messages calls count their prompt the same way: the text of ``system``, of text
blocks and of tool results (tool definitions, images and tool calls count 0), and
``max_tokens`` is required. A block carrying ``cache_control`` ends a cacheable
prefix (tools, then system, then messages, up to and including that block, keyed
by model; at most 4; a ``cache_control`` on the request marks the last block).
The first call with a prefix reports its tokens as ``cache_creation_input_tokens``,
later ones as ``cache_read_input_tokens`` (the longest prefix already seen), and
``input_tokens`` is the rest, as Anthropic reports it. The cache never expires and
has no minimum length. Cache reads count toward the token rates unless
``count_cache_reads=False``; cache writes always do.

Every response to a ``/v1`` call carries ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` and the
same for ``-tokens`` (for the rate of that unit with the least remaining; none
when no rate of that unit is enforced). A 429 also carries ``Retry-After``
(whole seconds, rounded up) and ``retry-after-ms`` (rounded up), except when the
request can never be admitted (then ``x-should-retry: false``).

Every answer to a ``/v1/messages`` call carries ``request-id`` and, per unit,
``anthropic-ratelimit-requests-{limit,remaining,reset}`` and the same for
``tokens``, ``input-tokens`` and ``output-tokens`` (all three the token rate with
the least remaining; reset as an RFC 3339 instant, to the millisecond). Its 429s
and 529s carry ``retry-after`` (whole seconds, rounded up; no ``retry-after-ms``)
and errors are ``{"type": "error", "error": {"type": ..., "message": ...}}``.

Admin endpoints, for a server in another process: ``POST /admin/limits`` with
``{"rpm": 10, "tpm": null, ...}`` (provider numbers, ``null`` for unlimited),
``POST /admin/inject`` with ``{"count": 3, "retry_after_s": 1.0}`` (``count``
``null`` for every call until a count of 0; ``"status": 529`` for overloads of
Messages calls), and ``GET /admin/stats``.

Run one with ``ratekit mock-provider --provider moonshot --tier tier1`` (or ``python -m
ratekit.testing.mock_provider`` with the same options).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import enum
import hashlib
import itertools
import json
import math
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import LimitsError, MissingExtraError, RatekitError
from .._limits import Limits, TokenCounting
from .._pricing import character_class
from ._strict import (
    CONCURRENCY,
    RateState,
    StrictRefusal,
    StrictWindows,
    Ticket,
    provider_counting,
)

try:
    import uvicorn
except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] != "uvicorn":
        raise
    raise MissingExtraError("ratekit.testing.mock_provider", "uvicorn", "cli") from None

DEFAULT_MODEL = "mock-model"
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
# Anthropic's error type for each status this server answers.
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_MAX_CACHE_BREAKPOINTS = 4
_ADMIN_LIMIT_KEYS = ("concurrency", "rpm", "tpm", "tpd")
_MAX_BODY_BYTES = 32 * 1024 * 1024
# How long an idle keep-alive connection stays open (s): longer than clients keep theirs
# (httpx: 5 s), so that the server never closes one that a client is about to reuse.
_KEEP_ALIVE_S = 600
# How long `MockProvider.close` waits for the calls of dropped connections to end (s).
_CLOSE_WAIT_S = 5.0


# --- tokens ---------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Tokens in `text`: one per CJK ideograph plus ``ceil(other characters / 4)``."""
    # ASCII is never an ideograph: only the other characters are looked up (this runs on
    # every prompt the server admits).
    cjk = 0
    if not text.isascii():
        cjk = sum(1 for char in text if not char.isascii() and character_class(char) == "chinese")
    return cjk + math.ceil((len(text) - cjk) / 4)


def _content_text(content: object) -> str:
    """The text of a message's content: a string, or the ``text`` of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _filler_words(count: int) -> list[str]:
    """`count` words of filler, one token each; every word but the first has a leading space."""
    return [("" if i == 0 else " ") + _FILLER[i % len(_FILLER)] for i in range(count)]


def _embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit-free vector in [-1, 1] of `dimensions` floats for `text`."""
    values: list[float] = []
    for block in itertools.count():
        digest = hashlib.sha256(f"{block}:{text}".encode()).digest()
        values.extend(byte / 127.5 - 1.0 for byte in digest)
        if len(values) >= dimensions:
            return values[:dimensions]
    raise AssertionError("unreachable")


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One admitted call: times on the server's clock (s) and its tokens.

    `endpoint` is ``"chat.completions"``, ``"embeddings"``, ``"responses"`` or
    ``"messages"``. `prompt_tokens` is every input token, cached or not;
    `cache_read_tokens` and `cache_creation_tokens` are the parts of it read from
    and written to the prompt cache (Messages calls only). `reserved_tokens` is
    what ``reserve`` counts at `arrived_s`: prompt + max output, less the cache reads
    when the server does not count them; prompt + completion, less the same, is what
    ``usage`` counts at `finished_s`. `completed` is false when the client went away
    before the answer was sent.
    """

    endpoint: str
    model: str
    arrived_s: float
    finished_s: float
    prompt_tokens: int
    completion_tokens: int
    reserved_tokens: int
    completed: bool
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0


_CALL_FIELDS = [field.name for field in dataclasses.fields(CallRecord)]


@dataclass(frozen=True, slots=True)
class MockProviderStatistics:
    """A snapshot of what the server did.

    Every count covers both APIs. `rejected` counts 429s by the first dimension
    over its limit (a rate's name, ``"concurrency"``, ``"injected"``, or ``"quota"``
    for a spent quota);
    `peak_use` maps each dimension to (the largest amount seen in any window, its
    limit), concurrency included; `max_concurrency` is the most calls ever in
    flight at once. `overloaded` counts 529s (Messages calls only).
    `served_by_endpoint` and `rejected_by_endpoint` split `served` and the 429s by
    `CallRecord.endpoint` (``"messages"`` is Anthropic's API, the others OpenAI's).
    """

    served: int
    rejected: dict[str, int]
    bad_requests: int
    in_flight: int
    max_concurrency: int
    peak_use: dict[str, tuple[float, float]]
    overloaded: int
    served_by_endpoint: dict[str, int]
    rejected_by_endpoint: dict[str, int]


class _Api(enum.Enum):
    """Whose dialect an answer speaks: its error envelope and rate-limit headers."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def _api_of(path: str) -> _Api:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return _Api.ANTHROPIC
    return _Api.OPENAI


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one call will cost and produce, decided from its request body.

    `prompt_tokens` is every input token; `uncounted_tokens` the part of it that the
    token rates do not count (cache reads, when the server does not count them).
    """

    endpoint: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    reserved_tokens: int
    api: _Api = _Api.OPENAI
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    uncounted_tokens: int = 0

    @property
    def used_tokens(self) -> int:
        """What ``usage`` counting records when the call ends."""
        return self.prompt_tokens - self.uncounted_tokens + self.completion_tokens


# --- HTTP -----------------------------------------------------------------------------


class _HttpError(Exception):
    """An error answer: a status and a body in the dialect of the API called.

    OpenAI's is ``{"error": {"message", "type", "param", "code"}}``; Anthropic's is
    ``{"type": "error", "error": {"type", "message"}}`` with the type the status
    implies (`type_`, `param` and `code` are OpenAI's).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.anthropic_body = {
            "type": "error",
            "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message},
        }

    def body_for(self, api: _Api) -> dict[str, Any]:
        return self.anthropic_body if api is _Api.ANTHROPIC else self.body


# ASGI's messages and callables, as this application reads and writes them.
_Message = Mapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


async def _read_body(receive: _Receive, headers: dict[str, str]) -> bytes | None:
    """The whole body of a request (the server has undone any chunked framing), or None
    when the client went away first; 413 when it is over `_MAX_BODY_BYTES`."""
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > _MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        body += message.get("body", b"")
        if len(body) > _MAX_BODY_BYTES:
            raise _too_large()
        if not message.get("more_body", False):
            return bytes(body)


def _too_large() -> _HttpError:
    return _HttpError(413, f"The request body is over {_MAX_BODY_BYTES} bytes.")


class _Reply:
    """The answer to one request, written through ASGI's ``send``: `json` in one piece, or
    `start`, `part` as each piece is produced (the server sends it at once, chunked) and
    `end`. `finished` is set as the last piece goes. `receive` is the request's ASGI
    ``receive``, which says when the client goes away (see `_unless_client_leaves`)."""

    __slots__ = ("_send", "finished", "receive")

    def __init__(self, receive: _Receive, send: _Send) -> None:
        self.receive = receive
        self._send = send
        self.finished = False

    async def start(self, status: int, headers: dict[str, str]) -> None:
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def part(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def json(self, status: int, payload: object, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        length = str(len(data))
        await self.start(
            status, {**headers, "content-type": "application/json", "content-length": length}
        )
        await self.end(data)


async def _unless_client_leaves(reply: _Reply, answering: Awaitable[None]) -> bool:
    """Await `answering` (the request body already read), cancelled if the client goes away
    before the answer is complete: True when it completed, False when the client left."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        while (await reply.receive())["type"] != "http.disconnect":
            pass
        if not reply.finished:
            left = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await answering
    except asyncio.CancelledError:
        # Cancelled by `watch`, and by nothing else (which is passed on).
        if not left or task.uncancel() > 0:
            raise
        return False
    finally:
        watcher.cancel()
    return True


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _sse_event(payload: dict[str, Any]) -> bytes:
    """One named SSE event, as Anthropic streams: the event is the payload's ``type``."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host` and `port` (0: any free one), not yet listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def openai_duration(seconds: float) -> str:
    """A wait as OpenAI's reset headers write it: ``"250ms"``, ``"1.5s"``, ``"6m0s"``.

    Rounded up to the millisecond; zero or less is ``"0s"``.
    """
    total_ms = math.ceil(seconds * 1000 - 1e-6)
    if total_ms <= 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    minutes, ms = divmod(total_ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _tightest(states: Iterable[RateState]) -> dict[str, RateState]:
    """Per unit, the rate with the least remaining."""
    tightest: dict[str, RateState] = {}
    for state in states:
        kept = tightest.get(state.unit)
        if kept is None or state.remaining < kept.remaining:
            tightest[state.unit] = state
    return tightest


def _limit_headers(states: Iterable[RateState]) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers: per unit, the rate with the least remaining."""
    headers: dict[str, str] = {}
    for unit, state in _tightest(states).items():
        headers[f"x-ratelimit-limit-{unit}"] = _number(state.limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(math.floor(state.remaining))
        headers[f"x-ratelimit-reset-{unit}"] = openai_duration(state.reset_s)
    return headers


def format_rfc3339(wall_s: float) -> str:
    """A Unix time (s) as Anthropic's reset headers write it, rounded up to the millisecond:
    ``"2025-01-02T03:04:05.250Z"``."""
    whole_ms = math.ceil(wall_s * 1000 - 1e-6)
    instant = datetime.datetime.fromtimestamp(whole_ms / 1000, datetime.UTC)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _anthropic_limit_headers(states: Iterable[RateState], wall_s: float) -> dict[str, str]:
    """The ``anthropic-ratelimit-*`` headers at Unix time `wall_s`: per unit, the rate with
    the least remaining; ``tokens``, ``input-tokens`` and ``output-tokens`` all name the
    token rate (this server has no separate input and output rates)."""
    headers: dict[str, str] = {}
    for unit, state in _tightest(states).items():
        names = ("requests",) if unit == "requests" else ("tokens", "input-tokens", "output-tokens")
        for name in names:
            headers[f"anthropic-ratelimit-{name}-limit"] = _number(state.limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(math.floor(state.remaining))
            headers[f"anthropic-ratelimit-{name}-reset"] = format_rfc3339(wall_s + state.reset_s)
    return headers


def _retry_headers(retry_after_s: float, api: _Api = _Api.OPENAI) -> dict[str, str]:
    """``Retry-After`` in whole seconds and (OpenAI only) ``retry-after-ms``, both rounded
    up; ``x-should-retry: false`` when no wait can help."""
    if math.isinf(retry_after_s):
        return {"x-should-retry": "false"}
    wait_ms = max(math.ceil(retry_after_s * 1000 - 1e-6), 0)
    headers = {"retry-after": str(math.ceil(wait_ms / 1000))}
    if api is _Api.OPENAI:
        headers["retry-after-ms"] = str(wait_ms)
    return headers


# --- request validation ---------------------------------------------------------------


def _json_object(request: _Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _HttpError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise _HttpError(400, "The request body must be a JSON object.")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _HttpError(400, "You must provide a model parameter.", param="model")
    return model


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _HttpError(400, f"{key} must be a positive integer, got {value!r}.", param=key)
    return value


def _messages_text(messages: object, key: str) -> str:
    """The concatenated text of a list of messages; 400 unless it is one."""
    if not isinstance(messages, list) or not messages:
        raise _HttpError(400, f"'{key}' must be a non-empty array of messages.", param=key)
    texts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _HttpError(400, f"'{key}[{index}]' must be an object with a role.", param=key)
        texts.append(_content_text(message.get("content")))
    return "".join(texts)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _HttpError(400, f"{key} must be a boolean, got {value!r}.", param=key)
    return value


# --- Anthropic Messages requests ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Block:
    """One block of a Messages request, in the prompt cache's order (tools, system, messages).

    `place` (``"tools"``, ``"system"`` or ``"messages.<i>.<role>"``) and `content` (the
    block without its ``cache_control``) identify it in a cache key; `text` is what
    the token count reads; `breakpoint` says it carries ``cache_control``.
    """

    place: str
    content: Any
    text: str
    breakpoint: bool


def _cache_breakpoint(holder: dict[str, Any], where: str) -> bool:
    """Whether `holder` (a block, or the request) carries a valid ``cache_control``; 400 when
    it is malformed. `where` names `holder` in the message (``""`` for the request)."""
    control = holder.get("cache_control")
    if control is None:
        return False
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        field = f"{where}.cache_control" if where else "cache_control"
        raise _HttpError(400, f"{field}.type: Input should be 'ephemeral'")
    return True


def _uncontrolled(block: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in block.items() if key != "cache_control"}


def _block_text(block: dict[str, Any]) -> str:
    """The text a content block counts: a text block's text, a tool result's content."""
    if block.get("type") == "tool_result":
        return _content_text(block.get("content"))
    return _content_text([block])


def _content_blocks(content: object, where: str) -> list[dict[str, Any]]:
    """A string or an array of typed blocks as blocks; 400 otherwise."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _HttpError(400, f"{where}: Input should be a valid string or array of blocks")
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _HttpError(400, f"{where}.{index}: Input should be an object with a type")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise _HttpError(400, f"{where}.{index}.text: Field required")
    return content


def _message_blocks(body: dict[str, Any]) -> list[_Block]:
    """The tools, system and message blocks of a Messages request, in cache order; 400 if
    any is malformed or more than 4 carry ``cache_control``.

    A ``cache_control`` on the request itself (automatic caching) marks the last block.
    """
    blocks: list[_Block] = []
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise _HttpError(400, "tools: Input should be a valid array of objects")
    for index, tool in enumerate(tools):
        breakpoint_ = _cache_breakpoint(tool, f"tools.{index}")
        blocks.append(_Block("tools", _uncontrolled(tool), "", breakpoint_))
    system = body.get("system")
    if system is not None:
        for index, block in enumerate(_content_blocks(system, "system")):
            if block["type"] != "text":
                raise _HttpError(400, f"system.{index}.type: Input should be 'text'")
            breakpoint_ = _cache_breakpoint(block, f"system.{index}")
            blocks.append(_Block("system", _uncontrolled(block), block["text"], breakpoint_))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _HttpError(400, "messages: Input should be a non-empty array of messages")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant", "system"):
            raise _HttpError(
                400, f"messages.{index}.role: Input should be 'user', 'assistant' or 'system'"
            )
        where = f"messages.{index}.content"
        for number, block in enumerate(_content_blocks(message.get("content"), where)):
            breakpoint_ = _cache_breakpoint(block, f"{where}.{number}")
            place = f"messages.{index}.{role}"
            blocks.append(_Block(place, _uncontrolled(block), _block_text(block), breakpoint_))
    if _cache_breakpoint(body, "") and blocks:
        blocks[-1] = dataclasses.replace(blocks[-1], breakpoint=True)
    breakpoints = sum(block.breakpoint for block in blocks)
    if breakpoints > _MAX_CACHE_BREAKPOINTS:
        raise _HttpError(
            400,
            f"A maximum of {_MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {breakpoints}.",
        )
    return blocks


def _cache_prefixes(
    model: str, blocks: list[_Block], count: Callable[[str], int]
) -> list[tuple[str, int]]:
    """(key, tokens counted by `count`) of each cacheable prefix, shortest first.

    A prefix is every block up to and including one that carries ``cache_control``;
    its key digests the model and those blocks (``cache_control`` left out).
    """
    digest = hashlib.sha256(model.encode())
    texts: list[str] = []
    prefixes: list[tuple[str, int]] = []
    for block in blocks:
        digest.update(json.dumps([block.place, block.content], sort_keys=True).encode() + b"\n")
        texts.append(block.text)
        if block.breakpoint:
            prefixes.append((digest.hexdigest(), count("".join(texts))))
    return prefixes


def _cache_split(prefixes: list[tuple[str, int]], cached: set[str]) -> tuple[int, int]:
    """(tokens read from the cache, tokens written to it) for a call with `prefixes`.

    It reads the longest prefix already in `cached` and writes the rest up to its
    longest prefix, as Anthropic reports a call with several breakpoints.
    """
    if not prefixes:
        return 0, 0
    read = max((tokens for key, tokens in prefixes if key in cached), default=0)
    return read, prefixes[-1][1] - read


def _message_usage(plan: _Plan) -> dict[str, int]:
    cached = plan.cache_read_tokens + plan.cache_creation_tokens
    return {
        "input_tokens": plan.prompt_tokens - cached,
        "output_tokens": plan.completion_tokens,
        "cache_creation_input_tokens": plan.cache_creation_tokens,
        "cache_read_input_tokens": plan.cache_read_tokens,
    }


# --- the server -----------------------------------------------------------------------

_Handler = Callable[[_Request, _Reply], Awaitable[None]]


class _Faults:
    """Injected errors: how many calls are still to get one, and the wait it names."""

    __slots__ = ("left", "retry_after_s")

    def __init__(self) -> None:
        # Calls still to answer with the error (None: every call until re-armed).
        self.left: int | None = 0
        # The wait its headers name, real seconds.
        self.retry_after_s = 1.0

    def arm(self, count: int | None, retry_after_s: float, verb: str) -> None:
        if count is not None and (isinstance(count, bool) or count < 0):
            raise ValueError(f"{verb}: count must be a non-negative int or None, got {count!r}")
        self.left = count
        self.retry_after_s = retry_after_s

    def take(self) -> bool:
        """Whether this call gets the error (counting it down)."""
        if self.left is None:
            return True
        if self.left > 0:
            self.left -= 1
            return True
        return False


class MockProvider:
    """An OpenAI- and Anthropic-compatible HTTP provider on 127.0.0.1 that enforces
    `limits` exactly, over one set of windows for both APIs.

    `limits` are the provider's own numbers (a minute is 60 s); `speed` divides
    every period and latency (60: a minute per second). `token_counting` is how the
    provider counts tokens (``"reserve"`` or ``"usage"``, see `ratekit.TokenCounting`).
    Each call takes ``(latency_s + latency_per_token_s * output tokens) / speed``
    real seconds and holds a concurrency slot meanwhile. `port` 0 picks a free port.
    `clock` returns the seconds the windows count in (`time.monotonic` by default;
    a fake clock makes the window math exact in tests). `models` is what
    ``/v1/models`` lists; any model name is accepted. `count_cache_reads` says
    whether the prompt-cache reads of Messages calls count toward the token rates
    (True, the safe default: every input token counts; False: as Anthropic's input
    token limits for most models); cache writes always count.

    Use ``async with MockProvider(limits) as server`` or `start_mock_provider`;
    `base_url` is then ready for ``openai.AsyncOpenAI(base_url=...)`` and
    `anthropic_base_url` for ``anthropic.AsyncAnthropic(base_url=...)``. The provider
    is also an ASGI application, for any ASGI server or in-process transport (see the
    module's docstring). One event loop; not thread-safe.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        speed: float = 1.0,
        port: int = 0,
        host: str = "127.0.0.1",
        token_counting: TokenCounting | str = TokenCounting.RESERVE,
        completion_tokens: int = 16,
        default_max_tokens: int = 1024,
        latency_s: float = 0.0,
        latency_per_token_s: float = 0.0,
        embedding_dimensions: int = 8,
        models: Iterable[str] = (DEFAULT_MODEL,),
        clock: Callable[[], float] = time.monotonic,
        tokenizer_factor: float = 1.0,
        count_cache_reads: bool = True,
    ) -> None:
        if not speed > 0 or math.isinf(speed):
            raise LimitsError(f"MockProvider.speed must be positive and finite, got {speed!r}")
        if latency_s < 0 or latency_per_token_s < 0:
            raise LimitsError("MockProvider latencies must be non-negative")
        if not 0.01 <= tokenizer_factor <= 100:
            raise LimitsError(
                f"MockProvider.tokenizer_factor must be in [0.01, 100], got {tokenizer_factor!r}"
            )
        for name, value in (
            ("completion_tokens", completion_tokens),
            ("default_max_tokens", default_max_tokens),
            ("embedding_dimensions", embedding_dimensions),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LimitsError(f"MockProvider.{name} must be a positive int, got {value!r}")
        self.speed = speed
        self.host = host
        self.port = port
        self.completion_tokens = completion_tokens
        self.default_max_tokens = default_max_tokens
        self.latency_s = latency_s
        self.latency_per_token_s = latency_per_token_s
        self.embedding_dimensions = embedding_dimensions
        self.tokenizer_factor = tokenizer_factor
        self.count_cache_reads = count_cache_reads
        self.models = tuple(models)
        self._clock = clock
        self._limits = limits
        self._windows = StrictWindows(limits.compressed(speed), token_counting)
        # Every admitted call, in order of ending.
        self.calls: list[CallRecord] = []
        self._served = 0
        self._bad_requests = 0
        # Calls answered, and 429s, by endpoint.
        self._served_by_endpoint: dict[str, int] = {}
        self._rejected_by_endpoint: dict[str, int] = {}
        # 529s answered.
        self._overloaded = 0
        # Injected 429s (any call) and 529s (Messages calls) still to answer.
        self._injected_429s = _Faults()
        self._injected_529s = _Faults()
        # Every call is answered "quota spent" while set (`spend_quota`).
        self._quota_spent = False
        # Keys of the prompt-cache prefixes written so far (see `_cache_prefixes`).
        self._cached_prefixes: set[str] = set()
        self._ids = itertools.count(1)
        # The uvicorn server while started.
        self._server: uvicorn.Server | None = None
        self._routes: dict[tuple[str, str], _Handler] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/responses"): self._responses,
            ("GET", "/v1/models"): self._list_models,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/admin/limits"): self._admin_limits,
            ("POST", "/admin/inject"): self._admin_inject,
            ("GET", "/admin/stats"): self._admin_stats,
            ("GET", "/admin/calls"): self._admin_calls,
        }

    # --- lifecycle ---

    async def start(self) -> None:
        """Bind and start serving; `port` and `base_url` are then known."""
        if self._server is not None:
            return
        config = uvicorn.Config(
            self,
            http="h11",
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=_KEEP_ALIVE_S,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        listener = _listening_socket(self.host, self.port)
        try:
            await server.startup(sockets=[listener])
        except BaseException:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._server = server

    async def close(self) -> None:
        """Stop listening and drop every open connection (calls in flight end as when their
        client goes away: not completed)."""
        server, self._server = self._server, None
        if server is None:
            return
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.transport.abort()
        calls = set(server.server_state.tasks)
        if calls:
            _, stuck = await asyncio.wait(calls, timeout=_CLOSE_WAIT_S)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
        for listener in server.servers:
            await listener.wait_closed()

    async def __aenter__(self) -> MockProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, for ``openai.AsyncOpenAI(base_url=...)``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """``http://host:port``, for ``anthropic.AsyncAnthropic(base_url=...)`` (which adds
        the ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    # --- control ---

    @property
    def limits(self) -> Limits:
        """The provider's limits, uncompressed (a minute is 60 s)."""
        return self._limits

    @property
    def effective_limits(self) -> Limits:
        """The limits enforced: `limits` with every period divided by `speed`."""
        return self._windows.limits

    def set_limits(self, limits: Limits) -> None:
        """Enforce `limits` (uncompressed) from now on; traffic already counted still counts."""
        self._limits = limits
        self._windows.set_limits(limits.compressed(self.speed), self._clock())

    def inject_429s(self, count: int | None, *, retry_after_s: float = 1.0) -> None:
        """Answer the next `count` calls with 429 (None: every call until a count of 0).

        `retry_after_s` (real seconds) is the wait their headers name. Injected 429s
        count nothing in the windows and are reported as dimension ``"injected"``.
        Both APIs' calls get them.
        """
        self._injected_429s.arm(count, retry_after_s, "inject_429s")

    def spend_quota(self, spent: bool = True) -> None:
        """Answer every call with the 429 of a spent quota or balance (OpenAI's
        ``insufficient_quota``, which retrying does not help) while `spent`; False
        serves again. Such calls count nothing in the windows and are reported as
        dimension ``"quota"``. Injected 429s (`inject_429s`) are answered first."""
        self._quota_spent = bool(spent)

    def inject_529s(self, count: int | None, *, retry_after_s: float = 1.0) -> None:
        """Answer the next `count` Messages calls with 529 ``overloaded_error`` (None: every
        Messages call until a count of 0).

        `retry_after_s` (real seconds) is the wait their ``retry-after`` names, rounded up.
        Overloaded calls count nothing in the windows (`statistics().overloaded` counts
        them); OpenAI-style calls are not affected and do not use up the count. An
        injected 429 (`inject_429s`) is answered first.
        """
        self._injected_529s.arm(count, retry_after_s, "inject_529s")

    def statistics(self) -> MockProviderStatistics:
        """What the server has done so far."""
        return MockProviderStatistics(
            served=self._served,
            rejected=dict(self._windows.rejected),
            bad_requests=self._bad_requests,
            in_flight=self._windows.in_flight,
            max_concurrency=self._windows.peak_in_flight,
            peak_use=self._windows.peak_use(),
            overloaded=self._overloaded,
            served_by_endpoint=dict(self._served_by_endpoint),
            rejected_by_endpoint=dict(self._rejected_by_endpoint),
        )

    # --- ASGI ---

    async def __call__(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        """The ASGI application: HTTP requests, and the lifespan protocol (nothing to do)."""
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{event}.complete"})
                if event == "shutdown":
                    return
        else:
            raise ValueError(f"MockProvider serves HTTP only, not {scope['type']!r}")

    async def _http(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        """One request: its whole body, then its answer (or a 413 for too large a body, and
        nothing when the client goes away before sending it all)."""
        reply = _Reply(receive, send)
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        request = _Request(scope["method"], scope["path"], headers, b"")
        try:
            body = await _read_body(receive, headers)
        except _HttpError as error:
            await self._send_error(reply, request, error, {"connection": "close"})
            return
        if body is None:
            return  # the client went away before sending all of it
        await self._dispatch(dataclasses.replace(request, body=body), reply)

    async def _dispatch(self, request: _Request, reply: _Reply) -> None:
        handler = self._routes.get((request.method, request.path))
        try:
            if handler is None:
                raise _HttpError(404, f"Invalid URL ({request.method} {request.path})")
            await handler(request, reply)
        except _HttpError as error:
            await self._send_error(reply, request, error)

    async def _send_error(
        self,
        reply: _Reply,
        request: _Request,
        error: _HttpError,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        """`error`'s answer, in the dialect of the API that `request` called."""
        if error.status == 400:
            self._bad_requests += 1
        api = _api_of(request.path)
        headers = {**self._api_headers(api, self._clock()), **(extra_headers or {})}
        await reply.json(error.status, error.body_for(api), headers)

    def _api_headers(self, api: _Api, now_s: float) -> dict[str, str]:
        """The rate-limit headers of an answer at `now_s`, in `api`'s dialect."""
        states = self._windows.states(now_s)
        if api is _Api.OPENAI:
            return _limit_headers(states)
        headers = _anthropic_limit_headers(states, time.time())
        headers["request-id"] = self._next_id("req_")
        return headers

    # --- admission ---

    def _latency_s(self, completion_tokens: int) -> float:
        """Real seconds a call producing `completion_tokens` takes."""
        return (self.latency_s + self.latency_per_token_s * completion_tokens) / self.speed

    def _tokens(self, text: str) -> int:
        """The provider's count of `text`: `estimate_tokens` times `tokenizer_factor`."""
        counted = estimate_tokens(text)
        if self.tokenizer_factor == 1.0:
            return counted
        return math.ceil(counted * self.tokenizer_factor)

    async def _run(
        self,
        reply: _Reply,
        plan: _Plan,
        respond: Callable[[dict[str, str]], Awaitable[None]],
    ) -> None:
        """Admit `plan` (or answer 429 or 529), let `respond` answer, and count the call.

        `respond` starts without a suspension after the admission.
        """
        now = self._clock()
        if self._injected_429s.take():
            self._windows.rejected["injected"] = self._windows.rejected.get("injected", 0) + 1
            refusal = StrictRefusal("injected", "injected", self._injected_429s.retry_after_s)
            await self._send_429(reply, plan, refusal, now)
            return
        if self._quota_spent:
            self._windows.rejected["quota"] = self._windows.rejected.get("quota", 0) + 1
            _tally(self._rejected_by_endpoint, plan.endpoint)
            message = "You exceeded your current quota, please check your plan and billing."
            error = _HttpError(429, message, type_="insufficient_quota", code="insufficient_quota")
            await reply.json(429, error.body_for(plan.api), self._api_headers(plan.api, now))
            return
        if plan.api is _Api.ANTHROPIC and self._injected_529s.take():
            await self._send_overloaded(reply, plan, now)
            return
        until = now + self._latency_s(plan.completion_tokens)
        admitted = self._windows.try_admit(now, tokens=plan.reserved_tokens, until_s=until)
        if isinstance(admitted, StrictRefusal):
            await self._send_429(reply, plan, admitted, now)
            return
        headers = self._api_headers(plan.api, now)
        await self._answer(reply, admitted, now, plan, respond(headers))

    async def _answer(
        self,
        reply: _Reply,
        ticket: Ticket,
        arrived_s: float,
        plan: _Plan,
        answering: Awaitable[None],
    ) -> None:
        """Await `answering` (the call's answer) and count the call, in its windows and
        records, whether it completes or not. A call that takes time ends as soon as its
        client goes away (its slot freed, not completed); one without latency is answered
        at once, with nothing to wait for."""
        completed = False
        try:
            if self._latency_s(plan.completion_tokens) > 0:
                completed = await _unless_client_leaves(reply, answering)
            else:
                await answering
                completed = True
            if completed:
                self._served += 1
                _tally(self._served_by_endpoint, plan.endpoint)
        finally:
            finished_s = self._clock()
            self._windows.finish(ticket, finished_s, used_tokens=plan.used_tokens)
            self.calls.append(
                CallRecord(
                    plan.endpoint,
                    plan.model,
                    arrived_s,
                    finished_s,
                    plan.prompt_tokens,
                    plan.completion_tokens,
                    plan.reserved_tokens,
                    completed,
                    plan.cache_read_tokens,
                    plan.cache_creation_tokens,
                )
            )

    async def _send_429(
        self, reply: _Reply, plan: _Plan, refusal: StrictRefusal, now_s: float
    ) -> None:
        _tally(self._rejected_by_endpoint, plan.endpoint)
        headers = self._api_headers(plan.api, now_s)
        headers.update(_retry_headers(refusal.retry_after_s, plan.api))
        kind = refusal.unit if refusal.unit in ("requests", "tokens") else "rate_limit_exceeded"
        message = self._refusal_message(plan, refusal)
        error = _HttpError(429, message, type_=kind, code="rate_limit_exceeded")
        await reply.json(429, error.body_for(plan.api), headers)

    async def _send_overloaded(self, reply: _Reply, plan: _Plan, now_s: float) -> None:
        self._overloaded += 1
        headers = self._api_headers(plan.api, now_s)
        headers.update(_retry_headers(self._injected_529s.retry_after_s, plan.api))
        await reply.json(529, _HttpError(529, "Overloaded").anthropic_body, headers)

    def _refusal_message(self, plan: _Plan, refusal: StrictRefusal) -> str:
        if refusal.dimension == "injected":
            message = "The service is at capacity (an injected 429). Please try again later."
        elif refusal.dimension == CONCURRENCY:
            cap = self.effective_limits.concurrency
            message = f"Rate limit reached for {plan.model}: at most {cap} requests in flight."
        else:
            rate = next(r for r in self.effective_limits.all_rates if r.name == refusal.dimension)
            too_large = "Request too large. " if refusal.never else ""
            message = (
                f"{too_large}Rate limit reached for {plan.model} on {refusal.dimension}: "
                f"limit {_number(rate.limit)} {rate.unit} per {rate.period_s:g} s, "
                f"requested {plan.reserved_tokens if rate.unit == 'tokens' else 1}."
            )
            if not refusal.never:
                message += f" Please try again in {openai_duration(refusal.retry_after_s)}."
        return message

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}mock{next(self._ids)}"

    def _output_tokens(self, requested_max: int | None) -> tuple[int, int]:
        """(output tokens produced, max output tokens reserved) for a requested maximum."""
        max_tokens = requested_max if requested_max is not None else self.default_max_tokens
        return min(max_tokens, self.completion_tokens), max_tokens

    # --- /v1/chat/completions ---

    async def _chat(self, request: _Request, reply: _Reply) -> None:
        body = _json_object(request)
        model = _model(body)
        prompt = self._tokens(_messages_text(body.get("messages"), "messages"))
        requested = _positive_int(body, "max_completion_tokens") or _positive_int(
            body, "max_tokens"
        )
        completion, max_tokens = self._output_tokens(requested)
        plan = _Plan("chat.completions", model, prompt, completion, prompt + max_tokens)
        finish_reason = "length" if completion == max_tokens else "stop"
        if _bool(body, "stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True

            async def stream(headers: dict[str, str]) -> None:
                await self._stream_chat(reply, plan, headers, finish_reason, include_usage)

            await self._run(reply, plan, stream)
            return

        async def answer(headers: dict[str, str]) -> None:
            await asyncio.sleep(self._latency_s(plan.completion_tokens))
            await reply.json(200, self._chat_body(plan, finish_reason), headers)

        await self._run(reply, plan, answer)

    def _chat_body(self, plan: _Plan, finish_reason: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(_filler_words(plan.completion_tokens))}
        return {
            "id": self._next_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": _usage(plan),
        }

    async def _stream_chat(
        self,
        reply: _Reply,
        plan: _Plan,
        headers: dict[str, str],
        finish_reason: str,
        include_usage: bool,
    ) -> None:
        """SSE: a role chunk after the fixed latency, one chunk a token, then [DONE]."""
        base = {
            "id": self._next_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": plan.model,
        }
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        await asyncio.sleep(self.latency_s / self.speed)
        await reply.start(200, {**headers, "content-type": "text/event-stream"})
        await reply.part(_sse(chunk({"role": "assistant", "content": ""})))
        per_token_s = self.latency_per_token_s / self.speed
        for word in _filler_words(plan.completion_tokens):
            if per_token_s > 0:
                await asyncio.sleep(per_token_s)
            await reply.part(_sse(chunk({"content": word})))
        tail = _sse(chunk({}, finish_reason))
        if include_usage:
            tail += _sse({**base, "choices": [], "usage": _usage(plan)})
        await reply.end(tail + b"data: [DONE]\n\n")

    # --- /v1/embeddings ---

    async def _embeddings(self, request: _Request, reply: _Reply) -> None:
        body = _json_object(request)
        model = _model(body)
        inputs, prompt = _embedding_inputs(body.get("input"), self._tokens)
        dimensions = _positive_int(body, "dimensions") or self.embedding_dimensions
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _HttpError(400, f"Unknown encoding_format {encoding!r}.", param="encoding_format")
        plan = _Plan("embeddings", model, prompt, 0, prompt)

        async def answer(headers: dict[str, str]) -> None:
            await asyncio.sleep(self._latency_s(0))
            data = [
                {"object": "embedding", "index": i, "embedding": _encode(v, dimensions, encoding)}
                for i, v in enumerate(inputs)
            ]
            usage = {"prompt_tokens": prompt, "total_tokens": prompt}
            vectors = {"object": "list", "data": data, "model": model, "usage": usage}
            await reply.json(200, vectors, headers)

        await self._run(reply, plan, answer)

    # --- /v1/responses ---

    async def _responses(self, request: _Request, reply: _Reply) -> None:
        body = _json_object(request)
        model = _model(body)
        if _bool(body, "stream"):
            raise _HttpError(
                400, "The mock provider does not stream /v1/responses.", param="stream"
            )
        prompt = self._tokens(_response_input_text(body))
        completion, max_tokens = self._output_tokens(_positive_int(body, "max_output_tokens"))
        plan = _Plan("responses", model, prompt, completion, prompt + max_tokens)

        async def answer(headers: dict[str, str]) -> None:
            await asyncio.sleep(self._latency_s(plan.completion_tokens))
            await reply.json(200, self._response_body(plan), headers)

        await self._run(reply, plan, answer)

    def _response_body(self, plan: _Plan) -> dict[str, Any]:
        text = "".join(_filler_words(plan.completion_tokens))
        content = [{"type": "output_text", "text": text, "annotations": []}]
        message = {
            "type": "message",
            "id": self._next_id("msg_"),
            "status": "completed",
            "role": "assistant",
            "content": content,
        }
        return {
            "id": self._next_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "model": plan.model,
            "status": "completed",
            "output": [message],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": plan.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": plan.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": plan.prompt_tokens + plan.completion_tokens,
            },
        }

    # --- /v1/messages (Anthropic) ---

    async def _messages(self, request: _Request, reply: _Reply) -> None:
        body = _json_object(request)
        model = _model(body)
        requested = _positive_int(body, "max_tokens")
        if requested is None:
            raise _HttpError(400, "max_tokens: Field required", param="max_tokens")
        blocks = _message_blocks(body)
        streamed = _bool(body, "stream")
        prompt = self._blocks_tokens(blocks)
        prefixes = _cache_prefixes(model, blocks, self._tokens)
        read, written = _cache_split(prefixes, self._cached_prefixes)
        uncounted = 0 if self.count_cache_reads else read
        completion, max_tokens = self._output_tokens(requested)
        plan = _Plan(
            "messages",
            model,
            prompt,
            completion,
            prompt - uncounted + max_tokens,
            api=_Api.ANTHROPIC,
            cache_read_tokens=read,
            cache_creation_tokens=written,
            uncounted_tokens=uncounted,
        )
        stop_reason = "max_tokens" if completion == max_tokens else "end_turn"

        async def answer(headers: dict[str, str]) -> None:
            # Admitted: the prefixes are written now, before any other call is planned.
            self._cached_prefixes.update(key for key, _ in prefixes)
            if streamed:
                await self._stream_message(reply, plan, headers, stop_reason)
                return
            await asyncio.sleep(self._latency_s(plan.completion_tokens))
            await reply.json(200, self._message_body(plan, stop_reason), headers)

        await self._run(reply, plan, answer)

    def _message_body(self, plan: _Plan, stop_reason: str | None) -> dict[str, Any]:
        text = "".join(_filler_words(plan.completion_tokens))
        return {
            "id": self._next_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": _message_usage(plan),
        }

    async def _stream_message(
        self, reply: _Reply, plan: _Plan, headers: dict[str, str], stop_reason: str
    ) -> None:
        """SSE after the fixed latency: message_start, a text block of one delta a token,
        message_delta with the stop reason and usage, message_stop."""
        usage = _message_usage(plan)
        start = self._message_body(plan, None)
        start.update(content=[], usage={**usage, "output_tokens": 1})
        await asyncio.sleep(self.latency_s / self.speed)
        await reply.start(200, {**headers, "content-type": "text/event-stream"})
        block = {"type": "text", "text": ""}
        await reply.part(
            _sse_event({"type": "message_start", "message": start})
            + _sse_event({"type": "content_block_start", "index": 0, "content_block": block})
            + _sse_event({"type": "ping"})
        )
        per_token_s = self.latency_per_token_s / self.speed
        for word in _filler_words(plan.completion_tokens):
            if per_token_s > 0:
                await asyncio.sleep(per_token_s)
            delta = {"type": "text_delta", "text": word}
            await reply.part(
                _sse_event({"type": "content_block_delta", "index": 0, "delta": delta})
            )
        stop = {"stop_reason": stop_reason, "stop_sequence": None}
        await reply.end(
            _sse_event({"type": "content_block_stop", "index": 0})
            + _sse_event({"type": "message_delta", "delta": stop, "usage": usage})
            + _sse_event({"type": "message_stop"})
        )

    async def _count_tokens(self, request: _Request, reply: _Reply) -> None:
        """``/v1/messages/count_tokens``: the prompt's tokens, cached or not; no window is used."""
        body = _json_object(request)
        _model(body)
        blocks = _message_blocks(body)
        headers = self._api_headers(_Api.ANTHROPIC, self._clock())
        await reply.json(200, {"input_tokens": self._blocks_tokens(blocks)}, headers)

    def _blocks_tokens(self, blocks: list[_Block]) -> int:
        """A Messages prompt's tokens: its text counted as a chat completion's is."""
        return self._tokens("".join(block.text for block in blocks))

    # --- /v1/models ---

    async def _list_models(self, request: _Request, reply: _Reply) -> None:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "ratekit-mock"}
            for name in self.models
        ]
        headers = _limit_headers(self._windows.states(self._clock()))
        await reply.json(200, {"object": "list", "data": data}, headers)

    # --- /admin ---

    async def _admin_limits(self, request: _Request, reply: _Reply) -> None:
        body = _json_object(request)
        unknown = [key for key in body if key not in _ADMIN_LIMIT_KEYS]
        if unknown:
            known = ", ".join(_ADMIN_LIMIT_KEYS)
            raise _HttpError(
                400, f"Unknown limit {unknown[0]!r}; known: {known}.", param=unknown[0]
            )
        try:
            self.set_limits(self._limits.replace(**body))
        except (LimitsError, TypeError) as exc:
            raise _HttpError(400, str(exc)) from None
        numbers = {key: getattr(self._limits, key) for key in _ADMIN_LIMIT_KEYS}
        await reply.json(200, {"limits": numbers}, {})

    async def _admin_inject(self, request: _Request, reply: _Reply) -> None:
        body = _json_object(request)
        count = body.get("count", 1)
        retry_after_s = body.get("retry_after_s", 1.0)
        status = body.get("status", 429)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise _HttpError(400, f"count must be an integer or null, got {count!r}.")
        if isinstance(retry_after_s, bool) or not isinstance(retry_after_s, int | float):
            raise _HttpError(400, f"retry_after_s must be a number, got {retry_after_s!r}.")
        inject = {429: self.inject_429s, 529: self.inject_529s}.get(status)
        if inject is None:
            raise _HttpError(400, f"status must be 429 or 529, got {status!r}.", param="status")
        try:
            inject(count, retry_after_s=float(retry_after_s))
        except ValueError as exc:
            raise _HttpError(400, str(exc)) from None
        answer = {"count": count, "retry_after_s": retry_after_s, "status": status}
        await reply.json(200, answer, {})

    async def _admin_stats(self, request: _Request, reply: _Reply) -> None:
        await reply.json(200, dataclasses.asdict(self.statistics()), {})

    async def _admin_calls(self, request: _Request, reply: _Reply) -> None:
        calls = [dataclasses.astuple(call) for call in self.calls]
        await reply.json(200, {"fields": _CALL_FIELDS, "calls": calls}, {})


def _tally(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _usage(plan: _Plan) -> dict[str, int]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    }


def _embedding_inputs(value: object, count: Callable[[str], int]) -> tuple[list[str], int]:
    """The inputs as strings (token arrays joined) and their total tokens (texts counted by
    `count`); 400 if malformed."""
    if isinstance(value, str) and value:
        return [value], count(value)
    if isinstance(value, list) and value:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [json.dumps(value)], len(value)
        if all(isinstance(item, str) and item for item in value):
            return list(value), sum(count(item) for item in value)
        if all(isinstance(item, list) and item for item in value):
            return [json.dumps(item) for item in value], sum(len(item) for item in value)
    raise _HttpError(
        400, "'input' must be a non-empty string, or an array of them or of tokens.", param="input"
    )


def _encode(text: str, dimensions: int, encoding: str) -> list[float] | str:
    vector = _embedding(text, dimensions)
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")


def _response_input_text(body: dict[str, Any]) -> str:
    """The text of a /v1/responses request: instructions plus input (a string or messages)."""
    value = body.get("input")
    instructions = body.get("instructions")
    prefix = instructions if isinstance(instructions, str) else ""
    if isinstance(value, str) and value:
        return prefix + value
    if isinstance(value, list) and value:
        return prefix + _messages_text(value, "input")
    raise _HttpError(400, "'input' must be a non-empty string or array.", param="input")


async def start_mock_provider(limits: Limits, **options: Any) -> MockProvider:
    """A started `MockProvider` (see its parameters); call ``await server.close()`` after."""
    server = MockProvider(limits, **options)
    await server.start()
    return server


# --- in a process of its own ------------------------------------------------------------


class ProviderProcess:
    """A `MockProvider` served by a child process: its own interpreter, loop and clock
    readings, as a real provider is, so that a busy client cannot delay its stamps.

    `limits` may hold concurrency, rpm, tpm and tpd (what ``/admin/limits`` sets);
    `options` are `MockProvider`'s (speed, token_counting, latency_s,
    latency_per_token_s, completion_tokens, tokenizer_factor, count_cache_reads).
    Arrival stamps are ``time.monotonic()`` of the child, which on one machine is the
    parent's clock. Use ``async with ProviderProcess(limits, speed=30) as provider``;
    `calls`, `statistics`, `set_limits`, `inject_429s` and `inject_529s` ask the
    child over HTTP.
    """

    def __init__(self, limits: Limits, **options: Any) -> None:
        extra = [rate.name for rate in limits.rates]
        if extra:
            raise LimitsError(
                f"ProviderProcess serves concurrency, rpm, tpm and tpd only, not {extra}"
            )
        self._limits = limits
        self._options = options
        self._process: asyncio.subprocess.Process | None = None
        # ``http://host:port/v1`` once started (see `MockProvider.base_url`).
        self.base_url = ""
        self._host = ""
        self._port = 0

    def _command(self) -> list[str]:
        options = self._options
        counting = provider_counting(options.get("token_counting", TokenCounting.RESERVE))
        limits = {key: getattr(self._limits, key) for key in _ADMIN_LIMIT_KEYS}
        return [
            sys.executable,
            "-m",
            "ratekit.testing.mock_provider",
            "--port",
            "0",
            "--until-stdin-closes",
            "--limits",
            json.dumps(limits),
            "--speed",
            repr(float(options.get("speed", 1.0))),
            "--counting",
            counting.value,
            "--latency-ms",
            repr(float(options.get("latency_s", 0.0)) * 1000),
            "--ms-per-token",
            repr(float(options.get("latency_per_token_s", 0.0)) * 1000),
            "--completion-tokens",
            str(int(options.get("completion_tokens", 16))),
            "--tokenizer-factor",
            repr(float(options.get("tokenizer_factor", 1.0))),
            *([] if options.get("count_cache_reads", True) else ["--no-count-cache-reads"]),
        ]

    @property
    def anthropic_base_url(self) -> str:
        """``http://host:port`` once started, for ``anthropic.AsyncAnthropic(base_url=...)``."""
        return self.base_url.removesuffix("/v1")

    async def start(self) -> None:
        """Start the child and wait (at most 30 s) until it serves."""
        unknown = set(self._options) - _PROCESS_OPTIONS
        if unknown:
            raise LimitsError(f"ProviderProcess: unknown options {sorted(unknown)}")
        process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._process = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(30):
                while not self.base_url:
                    line = (await process.stdout.readline()).decode()
                    if not line:
                        raise RatekitError("the mock provider's process ended before serving")
                    if line.startswith("http://"):
                        self.base_url = line.strip()
        except BaseException:
            await self.close()
            raise
        address = self.base_url.removeprefix("http://").split("/", 1)[0]
        host, port = address.rsplit(":", 1)
        self._host, self._port = host, int(port)

    async def close(self) -> None:
        """Stop the child (closing its stdin ends it; killed after 5 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> ProviderProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _ask(self, method: str, path: str, body: object = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(self._host, self._port)
        try:
            head = (
                f"{method} {path} HTTP/1.1\r\nhost: {self._host}\r\nconnection: close\r\n"
                f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
            )
            writer.write(head.encode() + data)
            await writer.drain()
            answer = await reader.read()
        finally:
            writer.close()
        head_bytes, _, payload = answer.partition(b"\r\n\r\n")
        status = int(head_bytes.split(b" ", 2)[1])
        if status != 200:
            raise RatekitError(f"mock provider {method} {path}: {status} {payload[:200]!r}")
        return json.loads(payload)

    async def calls(self) -> list[CallRecord]:
        """Every call the provider admitted so far, in order of ending."""
        answer = await self._ask("GET", "/admin/calls")
        return [CallRecord(*row) for row in answer["calls"]]

    async def statistics(self) -> MockProviderStatistics:
        """The child's `MockProvider.statistics`."""
        answer = await self._ask("GET", "/admin/stats")
        answer["peak_use"] = {name: tuple(pair) for name, pair in answer["peak_use"].items()}
        return MockProviderStatistics(**answer)

    async def set_limits(self, limits: Limits) -> None:
        """Enforce other limits from now (concurrency, rpm, tpm and tpd)."""
        body = {key: getattr(limits, key) for key in _ADMIN_LIMIT_KEYS}
        await self._ask("POST", "/admin/limits", body)

    async def inject_429s(self, count: int | None, *, retry_after_s: float = 1.0) -> None:
        """Answer the next `count` calls 429 (None: every call until a count of 0)."""
        await self._ask("POST", "/admin/inject", {"count": count, "retry_after_s": retry_after_s})

    async def inject_529s(self, count: int | None, *, retry_after_s: float = 1.0) -> None:
        """Answer the next `count` Messages calls 529 (see `MockProvider.inject_529s`)."""
        body = {"count": count, "retry_after_s": retry_after_s, "status": 529}
        await self._ask("POST", "/admin/inject", body)


_PROCESS_OPTIONS = frozenset(
    {
        "speed",
        "token_counting",
        "latency_s",
        "latency_per_token_s",
        "completion_tokens",
        "tokenizer_factor",
        "count_cache_reads",
    }
)


# --- command line ---------------------------------------------------------------------

if __name__ == "__main__":
    import importlib

    # The command of ``ratekit mock-provider``; it serves this module imported under its own
    # name (this copy runs as __main__), by name here so that the import cycle is not typed.
    command = importlib.import_module("ratekit.cli._mock_provider_cmd").mock_provider
    command.main(prog_name="python -m ratekit.testing.mock_provider")
