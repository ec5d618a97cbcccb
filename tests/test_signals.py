"""Reading rate-limit facts out of provider answers: durations, headers, classification."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from ratekit._signals import (
    MAX_MESSAGE_CHARS,
    ProviderLimits,
    RateLimitSignal,
    UnitLimits,
    classify,
    parse_duration,
    parse_provider_limits,
    parse_retry_after,
)

# 2025-01-01T00:00:00Z, the instant the HTTP-date cases are measured from.
NOW_S = 1_735_689_600.0


def _httpx() -> ModuleType:
    """The installed httpx: the `httpx` package, or the `httpx2` one openai 3.x depends on."""
    for name in ("httpx", "httpx2"):
        try:
            return __import__(name)
        except ImportError:
            continue
    raise AssertionError("httpx is not installed (openai depends on it; pip install -e '.[dev]')")


# --- parse_duration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("250ms", 0.25),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("2h", 7200.0),
        ("20ms", 0.02),
        ("1m30s", 90.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("1000ns", 0.000001),
        ("12", 12.0),
        ("0.5", 0.5),
        (" 7s ", 7.0),
        ("-1s", -1.0),
        ("-3", -3.0),
    ],
)
def test_parse_duration_reads_go_durations_and_plain_seconds(text: str, seconds: float) -> None:
    """Go-style durations and plain numbers are read as seconds."""
    result = parse_duration(text)
    assert result is not None
    assert math.isclose(result, seconds, abs_tol=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "s",
        "ms",
        "1x",
        "1s2",
        "abc",
        "1 s",
        "nan",
        "inf",
        "1e3",
        "1_000",
        "--1s",
        "1.2.3s",
    ],
)
def test_parse_duration_returns_none_for_garbage(text: str) -> None:
    """Anything that is not a duration is None, never an exception."""
    assert parse_duration(text) is None


def test_parse_duration_rejects_non_strings_and_overflow() -> None:
    """A non-string or a duration too large for a float is None."""
    assert parse_duration(None) is None  # type: ignore[arg-type]
    assert parse_duration("9" * 400 + "h") is None


# --- parse_retry_after ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250.5"}, 0.2505),
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
        ({"retry-after": "Wed, 01 Jan 2025 00:00:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 01 Jan 2025 00:01:00 -0000"}, 60.0),
        ({"retry-after": "Wed, 01 Jan 2025 01:00:00 +0100"}, 0.0),
        ({"retry-after": "Tue, 31 Dec 2024 23:59:00 GMT"}, 0.0),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after-ms": "-5"}, 0.0),
        ({"retry-after": "2", "x-ratelimit-reset-requests": "9s"}, 2.0),
        ({"x-ratelimit-reset-requests": "1s"}, 1.0),
        ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "-2s"}, 0.0),
        ({"x-ratelimit-reset-requests": "12"}, 12.0),
        ({"retry-after": "later", "x-ratelimit-reset-tokens": "250ms"}, 0.25),
    ],
)
def test_parse_retry_after_cases(headers: dict[str, str], seconds: float) -> None:
    """retry-after-ms wins over Retry-After, which wins over the reset headers; never negative."""
    result = parse_retry_after(headers, now_s=NOW_S)
    assert result is not None
    assert math.isclose(result, seconds, abs_tol=1e-9)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"retry-after": "later"},
        {"retry-after": ""},
        {"retry-after-ms": "nan"},
        {"retry-after": "inf"},
        {"x-ratelimit-reset-requests": "soon"},
        {"x-ratelimit-limit-requests": "60"},
        {"authorization": "Bearer sk-secret"},
    ],
)
def test_parse_retry_after_is_none_when_nothing_readable(headers: dict[str, str]) -> None:
    """With no readable wait in the headers the answer said nothing: None."""
    assert parse_retry_after(headers, now_s=NOW_S) is None


def test_parse_retry_after_prefers_the_exhausted_units_reset() -> None:
    """The reset of the unit that ran out is the wait, not the other unit's longer one."""
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "5000",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert parse_retry_after(headers, now_s=NOW_S) == 1.0


def test_parse_retry_after_takes_the_longest_reset_when_nothing_shows_exhausted() -> None:
    """When no unit shows as exhausted, waiting for the later reset is never too early."""
    headers = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "2.5s"}
    assert parse_retry_after(headers, now_s=NOW_S) == 2.5


def test_parse_retry_after_accepts_case_insensitive_header_objects() -> None:
    """An httpx.Headers object works as well as a dict."""
    httpx = _httpx()
    headers = httpx.Headers({"Retry-After-Ms": "750"})
    assert parse_retry_after(headers, now_s=NOW_S) == 0.75


# --- parse_provider_limits ------------------------------------------------------------

_FULL_LIMITS = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-limit-tokens": "150000",
    "x-ratelimit-remaining-tokens": "149984",
    "x-ratelimit-reset-tokens": "6m0s",
}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            _FULL_LIMITS,
            ProviderLimits(
                requests=UnitLimits(limit=60.0, remaining=59.0, reset_s=1.0),
                tokens=UnitLimits(limit=150_000.0, remaining=149_984.0, reset_s=360.0),
            ),
        ),
        (
            {"X-RateLimit-Limit-Tokens": "1000", "X-RateLimit-Remaining-Tokens": "0"},
            ProviderLimits(
                requests=None, tokens=UnitLimits(limit=1000.0, remaining=0.0, reset_s=None)
            ),
        ),
        (
            {"x-ratelimit-limit-requests": "lots", "x-ratelimit-reset-requests": "250ms"},
            ProviderLimits(
                requests=UnitLimits(limit=None, remaining=None, reset_s=0.25), tokens=None
            ),
        ),
        (
            {"x-ratelimit-remaining-requests": "-3", "x-ratelimit-reset-requests": "-1s"},
            ProviderLimits(
                requests=UnitLimits(limit=None, remaining=0.0, reset_s=0.0), tokens=None
            ),
        ),
        ({}, None),
        ({"x-ratelimit-limit-requests": "garbage"}, None),
        ({"x-ratelimit-limit": "60", "x-ratelimit-remaining": "3"}, None),
    ],
)
def test_parse_provider_limits_cases(
    headers: dict[str, str], expected: ProviderLimits | None
) -> None:
    """Each unit's limit, remaining and reset are read; garbage is None; negatives are 0."""
    assert parse_provider_limits(headers) == expected


def test_provider_limits_exhausted_lists_units_below_one() -> None:
    """`exhausted` names the units whose remaining is known and below one."""
    limits = parse_provider_limits(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "12"}
    )
    assert limits is not None
    assert limits.exhausted() == ("requests",)
    assert limits.unit("tokens") == UnitLimits(limit=None, remaining=12.0, reset_s=None)
    assert limits.unit("money") is None


# --- classify: real client errors -----------------------------------------------------


def _openai_error(status: int, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """The error openai's client raises for this answer: it keeps the body's "error" object."""
    import openai

    httpx = _httpx()
    response = httpx.Response(
        status, headers=headers, json=body, request=httpx.Request("POST", "http://x")
    )
    kind = {429: openai.RateLimitError, 500: openai.InternalServerError}[status]
    return kind(f"Error code: {status}", response=response, body=body.get("error", body))


def test_classify_openai_rate_limit_error() -> None:
    """openai.RateLimitError: retry-after-ms, the code, and the dimension from the error type."""
    import openai

    body = {
        "error": {
            "message": "Rate limit reached for gpt-4o in organization org-AbCdEf123 on tokens "
            "per min (TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 2s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    error = _openai_error(429, body, {"retry-after": "3", "retry-after-ms": "2500"})
    assert isinstance(error, openai.RateLimitError)
    signal = classify(error, now_s=NOW_S)
    assert signal is not None
    assert signal.retry_after_s == 2.5
    assert signal.dimension == "tokens"
    assert signal.status == 429
    assert signal.code == "rate_limit_exceeded"
    assert signal.retryable is True
    assert "org-AbCdEf123" not in signal.message
    assert signal.message.startswith("HTTP 429 rate_limit_exceeded: Rate limit reached")


def test_classify_openai_error_built_directly() -> None:
    """An openai.RateLimitError made by hand from an httpx.Response is read the same way."""
    import openai

    httpx = _httpx()
    response = httpx.Response(
        429,
        headers={"retry-after": "7", "x-ratelimit-remaining-requests": "0"},
        request=httpx.Request("POST", "http://x"),
    )
    error = openai.RateLimitError("Error code: 429", response=response, body=None)
    signal = classify(error, now_s=NOW_S)
    assert signal == RateLimitSignal(
        retry_after_s=7.0,
        dimension="requests",
        status=429,
        code=None,
        message="HTTP 429: Error code: 429",
        retryable=True,
    )


def test_classify_openai_insufficient_quota_is_not_retryable() -> None:
    """OpenAI's insufficient_quota 429 is a signal that retrying will not fix."""
    body = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    signal = classify(_openai_error(429, body, {}), now_s=NOW_S)
    assert signal is not None
    assert signal.retryable is False
    assert signal.code == "insufficient_quota"
    assert signal.retry_after_s is None


@pytest.mark.parametrize(
    "code",
    [
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    ],
)
def test_classify_openai_billing_codes_are_not_retryable(code: str) -> None:
    """OpenAI's billing codes under type insufficient_quota are non-retryable signals."""
    body = {"error": {"message": "Billing.", "type": "insufficient_quota", "code": code}}
    signal = classify(_openai_error(429, body, {}), now_s=NOW_S)
    assert signal is not None
    assert (signal.code, signal.retryable) == (code, False)


def test_classify_openai_server_error_is_none() -> None:
    """An openai 500 is not a rate limit."""
    body = {"error": {"message": "The server had an error.", "type": "server_error"}}
    assert classify(_openai_error(500, body, {"retry-after": "1"}), now_s=NOW_S) is None


def test_classify_httpx_http_status_error() -> None:
    """httpx.HTTPStatusError: status and headers come from its `.response`."""
    httpx = _httpx()
    response = httpx.Response(
        429,
        headers={"Retry-After": "Wed, 01 Jan 2025 00:00:10 GMT"},
        request=httpx.Request("POST", "http://x/v1/chat?key=secret-in-url"),
    )
    with pytest.raises(httpx.HTTPStatusError) as raised:
        response.raise_for_status()
    signal = classify(raised.value, now_s=NOW_S)
    assert signal is not None
    assert signal.status == 429
    assert signal.retry_after_s == 10.0
    assert signal.retryable is True
    assert "secret" not in signal.message


def test_classify_httpx_response_with_openai_body() -> None:
    """A bare httpx.Response whose body was read is classified from its JSON."""
    httpx = _httpx()
    response = httpx.Response(
        429,
        headers={"x-ratelimit-reset-tokens": "1m30s", "x-ratelimit-remaining-tokens": "0"},
        json={"error": {"message": "slow down", "type": "rate_limit_error", "code": "slow_down"}},
        request=httpx.Request("POST", "http://x"),
    )
    signal = classify(response, now_s=NOW_S)
    assert signal is not None
    assert (signal.code, signal.retry_after_s, signal.dimension) == ("slow_down", 90.0, "tokens")


def test_classify_never_reads_an_unread_httpx_stream() -> None:
    """A response whose body was not read yet is classified by status and headers only."""
    httpx = _httpx()
    response = httpx.Response(
        429,
        headers={"retry-after": "1"},
        stream=httpx.ByteStream(b'{"error": {"code": "insufficient_quota"}}'),
        request=httpx.Request("POST", "http://x"),
    )
    signal = classify(response, now_s=NOW_S)
    assert signal is not None
    assert (signal.code, signal.retryable) == (None, True)
    assert not response.is_stream_consumed


# --- classify: duck-typed objects -----------------------------------------------------


@dataclass
class _StatusCodeObject:
    status_code: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _AiohttpLikeError(Exception):
    """Shaped like aiohttp.ClientResponseError: `.status`, `.headers`, `.message`."""

    status: int
    headers: dict[str, str] | None
    message: str = "Too Many Requests"


@dataclass
class _Holder:
    response: object


def test_classify_plain_object_with_status_code_429() -> None:
    """Any object with status_code 429 is a retryable signal."""
    signal = classify(_StatusCodeObject(429, {"retry-after": "4"}), now_s=NOW_S)
    assert signal == RateLimitSignal(
        retry_after_s=4.0, dimension=None, status=429, code=None, message="HTTP 429", retryable=True
    )


def test_classify_aiohttp_like_error() -> None:
    """`.status` and `.headers` are read as aiohttp's ClientResponseError has them."""
    signal = classify(_AiohttpLikeError(429, {"Retry-After-Ms": "100"}), now_s=NOW_S)
    assert signal is not None
    assert (signal.status, signal.retry_after_s) == (429, 0.1)
    assert signal.message == "HTTP 429: Too Many Requests"
    assert classify(_AiohttpLikeError(429, None), now_s=NOW_S) is not None


def test_classify_reads_headers_on_response_attribute() -> None:
    """Status and headers on `.response` count as the answer's own."""
    signal = classify(_Holder(_StatusCodeObject(429, {"retry-after": "9"})), now_s=NOW_S)
    assert signal is not None
    assert signal.retry_after_s == 9.0


@pytest.mark.parametrize(
    "answer",
    [
        _StatusCodeObject(500, {"retry-after": "1"}),
        _StatusCodeObject(200),
        _StatusCodeObject(403),
        _AiohttpLikeError(503, {}),
        ValueError("429 too many requests"),
        TimeoutError(),
        None,
        "rate_limit_exceeded",
        42,
        {"choices": []},
        {"base_resp": {"status_code": 0, "status_msg": "success"}},
        {"error": {"type": "server_error", "message": "boom"}},
    ],
)
def test_classify_returns_none_for_other_answers(answer: object) -> None:
    """A 500, a timeout, a ValueError or a successful body is not a rate-limit answer."""
    assert classify(answer, now_s=NOW_S) is None


def test_classify_never_raises_on_hostile_objects() -> None:
    """Properties that raise are treated as missing."""

    class Hostile:
        @property
        def status_code(self) -> int:
            raise RuntimeError("no")

        @property
        def headers(self) -> dict[str, str]:
            raise RuntimeError("no")

        status = 429

    signal = classify(Hostile(), now_s=NOW_S)
    assert signal is not None
    assert signal.status == 429


def test_classify_x_should_retry_false_is_not_retryable() -> None:
    """x-should-retry: false (the mock provider's "can never be admitted") is not retryable."""
    signal = classify(_StatusCodeObject(429, {"X-Should-Retry": "false"}), now_s=NOW_S)
    assert signal is not None
    assert signal.retryable is False
    assert signal.retry_after_s is None


def test_classify_x_should_retry_true_does_not_revive_a_spent_quota() -> None:
    """x-should-retry: true cannot make an exhausted balance retryable."""
    body = {"error": {"type": "exceeded_current_quota_error", "message": "no balance"}}
    answer = _StatusCodeObject(429, {"x-should-retry": "true"})
    signal = classify(_WithBody(answer.status_code, answer.headers, body), now_s=NOW_S)
    assert signal is not None
    assert signal.retryable is False


@dataclass
class _WithBody:
    status_code: int
    headers: dict[str, str]
    body: object


# --- classify: provider bodies --------------------------------------------------------


@pytest.mark.parametrize(
    ("base_resp", "code", "dimension", "retryable"),
    [
        ({"status_code": 1002, "status_msg": "rate limit"}, "1002", "requests", True),
        ({"status_code": 1039, "status_msg": "token limit"}, "1039", "tokens", True),
        ({"status_code": 1041, "status_msg": "conn limit"}, "1041", "concurrency", True),
        ({"status_code": 2045, "status_msg": "rate growth limit"}, "2045", None, True),
        ({"status_code": 1008, "status_msg": "insufficient balance"}, "1008", None, False),
        ({"status_code": 2056, "status_msg": "usage limit exceeded"}, "2056", None, False),
        ({"status_code": "1002", "status_msg": "rate limit"}, "1002", "requests", True),
    ],
)
def test_classify_minimax_base_resp_codes(
    base_resp: dict[str, object], code: str, dimension: str | None, retryable: bool
) -> None:
    """MiniMax's documented base_resp codes are signals even in an HTTP 200 answer."""
    body = {"id": "x", "choices": None, "base_resp": base_resp}
    signal = classify(_WithBody(200, {}, body), now_s=NOW_S)
    assert signal is not None
    assert (signal.status, signal.code) == (200, code)
    assert (signal.dimension, signal.retryable) == (dimension, retryable)
    assert signal.message == f"HTTP 200 {code}: {base_resp['status_msg']}"


def test_classify_minimax_body_alone_and_in_an_httpx_response() -> None:
    """A parsed MiniMax body, or a 200 httpx.Response carrying it, is a signal."""
    body = {"base_resp": {"status_code": 1002, "status_msg": "rate limit"}}
    signal = classify(body, now_s=NOW_S)
    assert signal is not None
    assert (signal.status, signal.code, signal.message) == (None, "1002", "1002: rate limit")
    httpx = _httpx()
    response = httpx.Response(200, json=body, request=httpx.Request("POST", "http://x"))
    from_response = classify(response, now_s=NOW_S)
    assert from_response is not None
    assert (from_response.status, from_response.code) == (200, "1002")


@pytest.mark.parametrize(
    "base_resp",
    [
        {"status_code": 1004, "status_msg": "not authorized"},
        {"status_code": 1026, "status_msg": "input new_sensitive"},
        {"status_code": "abc"},
        {"status_code": True},
        "1002",
    ],
)
def test_classify_other_minimax_codes_are_none(base_resp: object) -> None:
    """MiniMax codes that are not rate limits or balance, or unreadable ones, are None."""
    assert classify(_WithBody(200, {}, {"base_resp": base_resp}), now_s=NOW_S) is None


@pytest.mark.parametrize(
    ("error", "dimension", "retryable"),
    [
        (
            {
                "type": "rate_limit_reached_error",
                "message": "Your account abc123<ak-xyz789secret> request reached TPM rate "
                "limit, current:120000, limit:100000",
            },
            "tokens",
            True,
        ),
        (
            {
                "type": "rate_limit_reached_error",
                "message": "Your account reached max organization concurrency: 50",
            },
            "concurrency",
            True,
        ),
        (
            {
                "type": "engine_overloaded_error",
                "message": "The engine is currently overloaded, please try again later",
            },
            None,
            True,
        ),
        (
            {
                "type": "exceeded_current_quota_error",
                "message": "Your account is suspended due to insufficient balance",
            },
            None,
            False,
        ),
    ],
)
def test_classify_moonshot_error_types(
    error: dict[str, str], dimension: str | None, retryable: bool
) -> None:
    """Moonshot's three 429 types: rate limit, overload, and a spent balance."""
    signal = classify(_WithBody(429, {}, {"error": error}), now_s=NOW_S)
    assert signal is not None
    assert signal.code == error["type"]
    assert (signal.dimension, signal.retryable) == (dimension, retryable)
    assert "xyz789secret" not in signal.message


def test_classify_openai_style_code_wins_over_a_non_429_status() -> None:
    """A documented code in the body is a signal whatever the HTTP status says."""
    body = {"error": {"message": "Quota.", "type": "insufficient_quota", "code": None}}
    signal = classify(_WithBody(403, {}, body), now_s=NOW_S)
    assert signal is not None
    assert (signal.status, signal.code, signal.retryable) == (403, "insufficient_quota", False)


def test_classify_payment_required_is_a_non_retryable_signal() -> None:
    """StepFun's 402 (balance insufficient) is a signal that retrying will not fix."""
    signal = classify(_StatusCodeObject(402), now_s=NOW_S)
    assert signal is not None
    assert (signal.status, signal.retryable) == (402, False)


def test_classify_reads_the_wait_from_openai_message_when_headers_say_nothing() -> None:
    """ "Please try again in 1m30s." is the wait when no header gives one."""
    body = {"error": {"message": "Please try again in 1m30s.", "code": "rate_limit_exceeded"}}
    signal = classify(_WithBody(429, {}, body), now_s=NOW_S)
    assert signal is not None
    assert signal.retry_after_s == 90.0


def test_classify_reads_a_raw_json_string_body() -> None:
    """A body kept as raw JSON text is parsed."""
    raw = '{"error": {"message": "Too fast", "type": "requests", "code": "rate_limit_exceeded"}}'
    signal = classify(_WithBody(429, {}, raw), now_s=NOW_S)
    assert signal is not None
    assert (signal.code, signal.dimension) == ("rate_limit_exceeded", "requests")


# --- classify: messages ---------------------------------------------------------------


def test_classify_message_is_short_and_holds_no_secrets() -> None:
    """Header values never reach the message; key-like strings are redacted; ≤ 200 chars."""
    headers = {"authorization": "Bearer sk-live-header-secret", "retry-after": "1"}
    text = (
        "Too many requests for key sk-proj-Abc123def456ghi789 with Bearer tok_abcdefgh "
        "and token 0123456789abcdef0123456789abcdef. " + "padding " * 60
    )
    body = {"error": {"message": text, "code": "rate_limit_exceeded"}}
    signal = classify(_WithBody(429, headers, body), now_s=NOW_S)
    assert signal is not None
    assert len(signal.message) <= MAX_MESSAGE_CHARS
    assert signal.message.endswith("…")
    for secret in ("header-secret", "Abc123def456", "tok_abcdefgh", "0123456789abcdef0123"):
        assert secret not in signal.message


# --- classify: the wait each answer of a burst asks for ---------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the mock provider runs on asyncio
@pytest.mark.anyio
async def test_each_429_of_a_burst_gives_the_wait_its_answer_asks_for() -> None:
    """Real openai errors over HTTP: 429s asking 1 s and 30 s read as 1 s and 30 s (so the
    scheduler can keep the longest), and the exact retry-after-ms beats the rounded
    Retry-After and the shorter x-ratelimit-reset-* the same answer carries."""
    import openai

    from ratekit import Limits
    from ratekit.testing.mock_provider import MockProvider

    messages = [{"role": "user", "content": "hi"}]
    async with MockProvider(Limits(rpm=100)) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="t", max_retries=0)
        waits: list[float | None] = []
        try:
            for asked_s in (1.0, 30.0, 0.25):
                server.inject_429s(1, retry_after_s=asked_s)
                with pytest.raises(openai.RateLimitError) as caught:
                    await client.chat.completions.create(model="m", messages=messages)
                headers = caught.value.response.headers
                assert headers["retry-after"] == str(math.ceil(asked_s))
                signal = classify(caught.value, now_s=NOW_S)
                assert signal is not None
                waits.append(signal.retry_after_s)
        finally:
            await client.close()
    assert waits == [1.0, 30.0, 0.25]


def test_an_answer_with_only_reset_headers_asks_for_its_exhausted_units_reset() -> None:
    """No Retry-After: the reset of the unit that ran out, not a shorter one of another."""
    headers = {
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "200ms",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "30s",
    }
    signal = classify(
        _openai_error(429, {"error": {"code": "rate_limit_exceeded"}}, headers), now_s=NOW_S
    )
    assert signal is not None
    assert signal.retry_after_s == 30.0


def test_a_529_is_an_overloaded_provider_not_a_limit() -> None:
    """HTTP 529 with the Anthropic API's overloaded_error: a retryable signal that says
    the provider is busy for everyone; a 429 is not."""

    class Answer:
        def __init__(self, status: int, kind: str) -> None:
            self.status_code = status
            self.headers = {"retry-after": "2"}
            self.body = {"type": "error", "error": {"type": kind, "message": "busy"}}

    busy = classify(Answer(529, "overloaded_error"), now_s=0.0)
    assert busy is not None
    assert (busy.retryable, busy.overloaded, busy.retry_after_s) == (True, True, 2.0)
    limited = classify(Answer(429, "rate_limit_error"), now_s=0.0)
    assert limited is not None
    assert limited.overloaded is False


def test_anthropic_token_headers_read_their_smallest_limit() -> None:
    """Anthropic's tokens headers follow whichever of its input and output limits is
    closest to running out; the tokens limit read is the smallest of the three, so it
    does not flip from answer to answer."""
    headers = {
        "anthropic-ratelimit-tokens-limit": "400000",
        "anthropic-ratelimit-input-tokens-limit": "400000",
        "anthropic-ratelimit-output-tokens-limit": "80000",
        "anthropic-ratelimit-output-tokens-remaining": "79000",
    }
    limits = parse_provider_limits(headers, now_s=0.0)
    assert limits is not None
    assert limits.tokens is not None
    assert (limits.tokens.limit, limits.tokens.remaining) == (80_000, 79_000)
