"""What a provider's answer says about its rate limits, as facts the scheduler can act on.

Pure: no I/O, no clock (time is the `now_s` argument, Unix seconds, used only to turn an
HTTP-date ``Retry-After`` or an RFC 3339 reset into a wait), no import of openai, httpx
or aiohttp. Answers are read by duck typing, so an exception, a response or an already
parsed JSON body all work.

- `parse_duration`: OpenAI's reset format (``"250ms"``, ``"6m0s"``, ``"1h2m3.5s"``) or seconds.
- `parse_retry_after`: how long an answer that refused a call asks the caller to wait.
- `parse_provider_limits`: the ``x-ratelimit-*`` (or ``anthropic-ratelimit-*``) headers,
  per unit.
- `classify`: whether an answer is a rate-limit or quota refusal, and what kind; most
  callers want this one.

Nothing here raises on bad input: garbage is ignored and reads as "not said".
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

__all__ = [
    "ProviderLimits",
    "RateLimitSignal",
    "UnitLimits",
    "classify",
    "parse_duration",
    "parse_provider_limits",
    "parse_retry_after",
]

MAX_MESSAGE_CHARS: Final = 200
_MAX_BODY_BYTES: Final = 1_000_000  # a rate-limit answer is small; never parse a huge body
_UNITS: Final = ("requests", "tokens")


# --- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitSignal:
    """A provider refused a call because of a rate limit or a quota.

    `retry_after_s` is the wait this answer asks for, in seconds from the answer
    (never negative; see `parse_retry_after` for which header wins), or None when it
    did not say. Each answer of a burst gives its own: keeping the longest is the
    caller's (the scheduler's) business. `dimension` is what ran out when the
    answer says so: ``"requests"``, ``"tokens"`` or ``"concurrency"``, else None.
    `status` is the HTTP status seen (429, but 200 for a MiniMax answer that carries its
    error in the body), None when the answer had none (a bare JSON body). `code` is the
    provider's own error code or type (``"rate_limit_exceeded"``, ``"1002"``), None when
    there was none. `message` is a short summary for logs: at most 200 characters, never a
    header value, and with key-like strings from the provider's text redacted.
    `retryable` is False when retrying will not help soon: the balance or quota is spent,
    or the provider sent ``x-should-retry: false``. `overloaded` is True when the
    provider is busy for everyone (HTTP 529, ``overloaded_error``,
    ``engine_overloaded_error``), not refusing this account over its limits: worth a
    pause, not lower limits.
    """

    retry_after_s: float | None
    dimension: str | None
    status: int | None
    code: str | None
    message: str
    retryable: bool
    overloaded: bool = False


@dataclass(frozen=True, slots=True)
class UnitLimits:
    """One unit's ``x-ratelimit-*`` headers; each field is None when absent or unreadable.

    `limit` and `remaining` are amounts of the unit (requests or tokens) in the provider's
    window; `reset_s` is the seconds until the window is full again (never negative).
    """

    limit: float | None
    remaining: float | None
    reset_s: float | None


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """What the ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers say.

    A unit is None when the answer carries none of its three headers.
    """

    requests: UnitLimits | None
    tokens: UnitLimits | None

    def unit(self, name: str) -> UnitLimits | None:
        """The limits of ``"requests"`` or ``"tokens"``; None for any other name."""
        if name == "requests":
            return self.requests
        if name == "tokens":
            return self.tokens
        return None

    def exhausted(self) -> tuple[str, ...]:
        """The units whose `remaining` is known and below one."""
        return tuple(
            name
            for name in _UNITS
            if (limits := self.unit(name)) is not None
            and limits.remaining is not None
            and limits.remaining < 1
        )


# --- durations and headers ------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# "ms" before "m" so that "250ms" is not read as 250 minutes and a stray "s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|μs|ns|m|s)")
_UNIT_SECONDS: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,  # MICRO SIGN, as Go writes it
    "μs": 1e-6,  # GREEK SMALL LETTER MU, as Go also accepts
    "ns": 1e-9,
}


def _plain_number(text: object) -> float | None:
    """A finite decimal number written plainly (no exponent, no ``_``, no ``nan``), else None."""
    if not isinstance(text, str) or not _PLAIN_NUMBER.fullmatch(text.strip()):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI-style duration, or None when `text` is not one.

    Accepts Go's format as OpenAI's ``x-ratelimit-reset-*`` headers use it (``"1s"``,
    ``"250ms"``, ``"6m0s"``, ``"1h2m3.5s"``, also ``us``/``ns``) and plain seconds
    (``"12"``, ``"0.5"``). A leading ``-`` gives a negative result; callers that want a
    wait clamp it. Never raises.
    """
    if not isinstance(text, str):
        return None
    stripped = text.strip()
    plain = _plain_number(stripped)
    if plain is not None:
        return plain
    sign = 1.0
    if stripped[:1] in ("+", "-"):
        sign = -1.0 if stripped[0] == "-" else 1.0
        stripped = stripped[1:]
    total = 0.0
    position = 0
    while position < len(stripped):
        part = _DURATION_PART.match(stripped, position)
        if part is None:
            return None
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        position = part.end()
    if position == 0 or not math.isfinite(total):
        return None
    return sign * total


def _lower_keys(headers: object) -> dict[str, str]:
    """The headers as a plain dict with lower-case names; anything unreadable is skipped."""
    items = _attr(headers, "items")
    if not callable(items):
        return {}
    lowered: dict[str, str] = {}
    try:
        for name, value in items():
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(name, str) and isinstance(value, str):
                lowered[name.strip().lower()] = value.strip()
    except Exception:  # a broken mapping is an answer that said nothing
        return lowered
    return lowered


def _http_date_wait(text: str, now_s: float) -> float | None:
    """Seconds from `now_s` until an HTTP-date, or None when `text` is not one."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000" means UTC with no claim about the local zone
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() - now_s


def parse_retry_after(headers: Mapping[str, str], *, now_s: float) -> float | None:
    """Seconds an answer that refused a call asks the caller to wait, or None.

    In order, the first readable one wins: ``retry-after-ms`` (milliseconds), then
    ``Retry-After`` (seconds, or an HTTP-date measured from `now_s`, Unix seconds), then
    the ``x-ratelimit-reset-*`` headers: of the units the answer shows as exhausted, the
    longest reset; if none shows as exhausted, the longest reset of all (a refusal means
    something ran out, and waiting for the later one is never too early). A wait in the
    past is 0; unreadable values are skipped. Header names are matched in any case.
    """
    lowered = _lower_keys(headers)
    milliseconds = _plain_number(lowered.get("retry-after-ms"))
    if milliseconds is not None:
        return max(milliseconds / 1000.0, 0.0)
    retry_after = lowered.get("retry-after")
    if retry_after is not None:
        seconds = _plain_number(retry_after)
        if seconds is None:
            seconds = _http_date_wait(retry_after, now_s)
        if seconds is not None:
            return max(seconds, 0.0)
    return _reset_wait(_limits_from(lowered, now_s))


def _reset_wait(limits: ProviderLimits | None) -> float | None:
    if limits is None:
        return None
    units = limits.exhausted() or _UNITS
    resets = [
        unit.reset_s
        for name in units
        if (unit := limits.unit(name)) is not None and unit.reset_s is not None
    ]
    return max(resets) if resets else None


def parse_provider_limits(
    headers: Mapping[str, str], *, now_s: float = math.nan
) -> ProviderLimits | None:
    """The ``x-ratelimit-*`` headers of an answer (else its ``anthropic-ratelimit-*``
    ones), or None when it carries none readable.

    Amounts below zero read as 0, resets in the past as 0 s; unreadable values as None.
    `now_s` (Unix seconds) turns an RFC 3339 reset into seconds; without it such a
    reset reads as None.
    """
    return _limits_from(_lower_keys(headers), now_s)


def _rfc3339_wait(text: str, now_s: float) -> float | None:
    """Seconds from `now_s` until an RFC 3339 instant (``2026-12-02T10:00:30Z``), else None."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    wait = moment.timestamp() - now_s
    return wait if math.isfinite(wait) else None


def _unit_headers(
    lowered: Mapping[str, str], name: str, now_s: float
) -> tuple[str | None, str | None, float | None]:
    """(limit, remaining, reset seconds) of unit `name` as the answer writes them: OpenAI's
    ``x-ratelimit-{limit,remaining,reset}-<unit>`` (the reset a duration), else the Anthropic
    API's ``anthropic-ratelimit-<unit>-{limit,remaining,reset}`` (the reset an RFC 3339
    instant)."""
    limit = lowered.get(f"x-ratelimit-limit-{name}")
    remaining = lowered.get(f"x-ratelimit-remaining-{name}")
    reset_text = lowered.get(f"x-ratelimit-reset-{name}")
    if limit is not None or remaining is not None or reset_text is not None:
        reset_s = parse_duration(reset_text) if reset_text is not None else None
        return limit, remaining, reset_s
    # Anthropic's "tokens" headers name whichever of its input and output limits is
    # closest to running out, so they change from answer to answer: the tokens limit
    # is the smallest of the three the answer reports, a stable number.
    kinds = (name, "input-tokens", "output-tokens") if name == "tokens" else (name,)
    limits = [
        (number, kind)
        for kind in kinds
        if (number := _plain_number(lowered.get(f"anthropic-ratelimit-{kind}-limit"))) is not None
    ]
    kind = min(limits)[1] if limits else name
    limit = lowered.get(f"anthropic-ratelimit-{kind}-limit")
    remaining = lowered.get(f"anthropic-ratelimit-{kind}-remaining")
    reset_text = lowered.get(f"anthropic-ratelimit-{kind}-reset")
    reset_s = None
    if reset_text is not None:
        reset_s = _rfc3339_wait(reset_text, now_s)
        if reset_s is None:
            reset_s = parse_duration(reset_text)
    return limit, remaining, reset_s


def _limits_from(lowered: Mapping[str, str], now_s: float) -> ProviderLimits | None:
    units: dict[str, UnitLimits | None] = {}
    for name in _UNITS:
        limit_text, remaining_text, reset_s = _unit_headers(lowered, name, now_s)
        limit = _plain_number(limit_text)
        remaining = _plain_number(remaining_text)
        if limit is None and remaining is None and reset_s is None:
            units[name] = None
        else:
            units[name] = UnitLimits(
                limit=None if limit is None else max(limit, 0.0),
                remaining=None if remaining is None else max(remaining, 0.0),
                reset_s=None if reset_s is None else max(reset_s, 0.0),
            )
    if units["requests"] is None and units["tokens"] is None:
        return None
    return ProviderLimits(requests=units["requests"], tokens=units["tokens"])


# --- what providers document ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Documented:
    """What a provider's documentation says one of its error codes means."""

    retryable: bool
    dimension: str | None


# OpenAI-style bodies, {"error": {"type": ..., "code": ...}}: looked up by `code`, then
# by `type`. The two namespaces do not collide.
_ERROR_KINDS: Final[Mapping[str, _Documented]] = {
    # OpenAI, "Error codes" guide (developers.openai.com/api/docs/guides/error-codes):
    # 429 rate_limit_exceeded (RPM or TPM reached), 429 slow_down of type
    # rate_limit_error (traffic grew too fast), and 429 of type insufficient_quota with
    # the billing codes below, which retrying does not fix.
    "rate_limit_exceeded": _Documented(retryable=True, dimension=None),
    "slow_down": _Documented(retryable=True, dimension=None),
    "rate_limit_error": _Documented(retryable=True, dimension=None),
    "insufficient_quota": _Documented(retryable=False, dimension=None),
    "credit_balance_exhausted": _Documented(retryable=False, dimension=None),
    "organization_spend_limit_exceeded": _Documented(retryable=False, dimension=None),
    "project_spend_limit_exceeded": _Documented(retryable=False, dimension=None),
    "organization_usage_limit_exceeded": _Documented(retryable=False, dimension=None),
    # Moonshot / Kimi, "Errors" (platform.kimi.ai/docs/api/errors), all HTTP 429:
    # rate_limit_reached_error (organization concurrency, RPM, TPM or TPD reached; the
    # message names which), engine_overloaded_error (the service is busy), and
    # exceeded_current_quota_error (balance insufficient, account disabled, or token
    # quota insufficient).
    "rate_limit_reached_error": _Documented(retryable=True, dimension=None),
    "engine_overloaded_error": _Documented(retryable=True, dimension=None),
    "exceeded_current_quota_error": _Documented(retryable=False, dimension=None),
    # The Anthropic Messages API, "Errors" (docs.anthropic.com/en/api/errors), bodies
    # {"type": "error", "error": {"type": ...}}: 429 rate_limit_error (above), and 529
    # overloaded_error (the API is temporarily overloaded): both passing, so retried
    # after a pause.
    "overloaded_error": _Documented(retryable=True, dimension=None),
}

# MiniMax, "Error Codes" (platform.minimax.io/docs/api-reference/errorcode; the Chinese
# page platform.minimaxi.com/docs/api-reference/errorcode): `base_resp.status_code` in
# the JSON body, which may come with HTTP 200.
_MINIMAX_CODES: Final[Mapping[int, _Documented]] = {
    1002: _Documented(retryable=True, dimension="requests"),  # "rate limit" / 请求频率超限
    1008: _Documented(retryable=False, dimension=None),  # "insufficient balance"
    1039: _Documented(retryable=True, dimension="tokens"),  # "token limit"
    1041: _Documented(retryable=True, dimension="concurrency"),  # "conn limit"
    2045: _Documented(retryable=True, dimension=None),  # "rate growth limit"
    # "usage limit exceeded": wait for the next 5-hour window, so no retry soon helps.
    2056: _Documented(retryable=False, dimension=None),
}

# The codes that say the provider is busy for everyone, not that this account is over
# its limits (Anthropic's, Moonshot's).
_OVERLOADED: Final = frozenset({"overloaded_error", "engine_overloaded_error"})

_RATE_LIMITED: Final = _Documented(retryable=True, dimension=None)
# StepFun, "异常事件处理建议" (platform.stepfun.com/docs/guide/exception): HTTP 402 means the
# balance cannot pay for the call. No body code is documented, so the status decides.
_PAYMENT_REQUIRED: Final = _Documented(retryable=False, dimension=None)

_TOKENS_HINT = re.compile(r"\bTP[MD]\b|\btokens? per (?:min|minute|day)\b", re.IGNORECASE)
_REQUESTS_HINT = re.compile(r"\bRP[MD]\b|\brequests? per (?:min|minute|day)\b", re.IGNORECASE)
_CONCURRENCY_HINT = re.compile(r"\bconcurren", re.IGNORECASE)
# OpenAI's rate-limit messages end with "Please try again in 20s." (any Go duration).
_TRY_AGAIN_IN = re.compile(r"try again in ((?:\d+(?:\.\d+)?(?:h|ms|m|s))+)", re.IGNORECASE)

_REDACTIONS: Final = (
    re.compile(r"\bbearer\s+\S+", re.IGNORECASE),
    re.compile(r"\b(?:sk|pk|rk|ak|org|proj|key|sess)-[\w-]{4,}", re.IGNORECASE),
    re.compile(r"<[^<>]{0,200}>"),  # Kimi writes "Your account {uid}<{ak-id}>"
    re.compile(r"\b[\w-]{32,}"),
)


# --- reading an answer ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """What was read from an answer, before deciding what it means."""

    status: int | None
    headers: dict[str, str]
    error_type: str | None
    error_code: str | None
    text: str
    minimax_code: int | None


def _attr(obj: object, name: str) -> object:
    """``obj.name``, or None when it is missing or its property raises."""
    try:
        return getattr(obj, name, None)
    except Exception:  # a property of a third-party object; the answer just lacks it
        return None


def _status_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 999:
        return value
    return None


def _status_of(answer: object) -> int | None:
    """``.status_code`` (openai, httpx, requests), ``.status`` (aiohttp, urllib) or the same
    on ``.response`` (httpx.HTTPStatusError, requests.HTTPError)."""
    for holder in (answer, _attr(answer, "response")):
        for name in ("status_code", "status"):
            status = _status_int(_attr(holder, name))
            if status is not None:
                return status
    return None


def _headers_of(answer: object) -> dict[str, str]:
    for holder in (answer, _attr(answer, "response")):
        headers = _lower_keys(_attr(holder, "headers"))
        if headers:
            return headers
    return {}


def _json_of(raw: object) -> object:
    if isinstance(raw, (bytes, bytearray, str)) and 0 < len(raw) <= _MAX_BODY_BYTES:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _body_of(answer: object) -> object:
    """The answer's JSON body, if it is already at hand; never reads from a connection."""
    if isinstance(answer, Mapping):
        return answer
    body = _attr(answer, "body")  # openai.APIStatusError: parsed JSON, or the raw text
    if isinstance(body, Mapping):
        return body
    parsed = _json_of(body)
    if parsed is not None:
        return parsed
    for holder in (answer, _attr(answer, "response")):
        # httpx and requests keep the bytes of a body already read in `_content`;
        # `.content` or `.json()` could read the rest of a stream, which is I/O.
        parsed = _json_of(_attr(holder, "_content"))
        if parsed is not None:
            return parsed
    base_resp = _attr(answer, "base_resp")  # a MiniMax field kept on a parsed model
    if isinstance(base_resp, Mapping):
        return {"base_resp": base_resp}
    return None


def _label(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _text_label(value: object) -> str | None:
    return _label(value) if isinstance(value, str) else None


def _minimax_code(body: Mapping[object, object]) -> tuple[int | None, str]:
    base_resp = body.get("base_resp")
    if not isinstance(base_resp, Mapping):
        return None, ""
    code = base_resp.get("status_code")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool):
        return None, ""
    text = base_resp.get("status_msg")
    return code, text if isinstance(text, str) else ""


def _read(answer: object) -> _Answer:
    body = _body_of(answer)
    error: Mapping[object, object] = {}
    minimax_code: int | None = None
    text = ""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            error = inner
        elif "type" in body or "code" in body:  # openai already unwrapped "error"
            error = body
        minimax_code, text = _minimax_code(body)
    # openai's exceptions copy the body's `type` and `code` onto themselves; other
    # objects' `.code` is often the HTTP status (urllib), so only a string counts there.
    error_type = _label(error.get("type")) or _text_label(_attr(answer, "type"))
    error_code = _label(error.get("code")) or _text_label(_attr(answer, "code"))
    message = error.get("message")
    if isinstance(message, str) and message.strip():
        text = message
    elif not text:
        # openai's and aiohttp's `.message`; never str(answer), which may hold the URL.
        attribute = _attr(answer, "message")
        text = attribute if isinstance(attribute, str) else ""
    return _Answer(
        status=None if isinstance(answer, Mapping) else _status_of(answer),
        headers={} if isinstance(answer, Mapping) else _headers_of(answer),
        error_type=error_type,
        error_code=error_code,
        text=text,
        minimax_code=minimax_code,
    )


def _documented(read: _Answer) -> tuple[_Documented, str | None] | None:
    """The documented meaning of the answer and the code that gave it, else None."""
    if read.minimax_code is not None and read.minimax_code in _MINIMAX_CODES:
        return _MINIMAX_CODES[read.minimax_code], str(read.minimax_code)
    for label in (read.error_code, read.error_type):
        if label is not None and label in _ERROR_KINDS:
            return _ERROR_KINDS[label], label
    if read.status in (429, 529):  # 529: the Anthropic API's "overloaded"
        return _RATE_LIMITED, read.error_code or read.error_type
    if read.status == 402:
        return _PAYMENT_REQUIRED, read.error_code or read.error_type
    return None


def _dimension(read: _Answer, documented: _Documented, limits: ProviderLimits | None) -> str | None:
    if documented.dimension is not None:
        return documented.dimension
    if read.error_type in _UNITS:  # OpenAI types a rate-limit error "requests" or "tokens"
        return read.error_type
    hinted = [
        name
        for name, pattern in (
            ("tokens", _TOKENS_HINT),
            ("requests", _REQUESTS_HINT),
            ("concurrency", _CONCURRENCY_HINT),
        )
        if pattern.search(read.text)
    ]
    if len(hinted) == 1:
        return hinted[0]
    exhausted = limits.exhausted() if limits is not None else ()
    return exhausted[0] if len(exhausted) == 1 else None


def _scrub(text: str) -> str:
    for pattern in _REDACTIONS:
        text = pattern.sub("[redacted]", text)
    return " ".join(text.split())


def _summary(status: int | None, code: str | None, text: str) -> str:
    head = " ".join(part for part in (f"HTTP {status}" if status else "", code or "") if part)
    detail = _scrub(text)
    summary = f"{head}: {detail}" if head and detail else head or detail or "rate limited"
    if len(summary) > MAX_MESSAGE_CHARS:
        summary = summary[: MAX_MESSAGE_CHARS - 1] + "…"
    return summary


def classify(error: BaseException | object, *, now_s: float) -> RateLimitSignal | None:
    """A `RateLimitSignal` when `error` is a rate-limit or quota refusal, else None.

    `error` may be an exception (openai's, httpx's ``HTTPStatusError``, aiohttp's
    ``ClientResponseError``, ``requests.HTTPError``), a response object, any object with
    a ``status_code`` or ``status`` and ``headers`` (on itself or on ``.response``), or a
    parsed JSON body. It is a signal when the body carries an error code a provider
    documents as a rate limit or quota refusal (whatever the HTTP status: MiniMax answers
    200), or when the status is 429, 529 (the Anthropic API: overloaded), or 402 (StepFun:
    balance insufficient). Anything
    else (a 500, a timeout, a ValueError) is None. `now_s` (Unix seconds) only converts an
    HTTP-date ``Retry-After``. Reads only what is already in memory; never raises.
    """
    read = _read(error)
    found = _documented(read)
    if found is None:
        return None
    documented, code = found
    limits = _limits_from(read.headers, now_s)
    retry_after_s = parse_retry_after(read.headers, now_s=now_s)
    if retry_after_s is None:
        said = _TRY_AGAIN_IN.search(read.text)
        wait = parse_duration(said.group(1)) if said else None
        retry_after_s = None if wait is None else max(wait, 0.0)
    retryable = documented.retryable and read.headers.get("x-should-retry", "").lower() != "false"
    overloaded = read.status == 529 or code in _OVERLOADED
    return RateLimitSignal(
        retry_after_s=retry_after_s,
        dimension=_dimension(read, documented, limits),
        status=read.status,
        code=code,
        message=_summary(read.status, code, read.text),
        retryable=retryable,
        overloaded=overloaded,
    )
