"""The HTTP mock provider's Anthropic Messages API: the real `anthropic` client against it."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from ratekit import Limits
from ratekit.clock import FakeClock
from ratekit.testing.mock_provider import MockProvider, ProviderProcess, format_rfc3339

from .test_mock_provider import raw_http, request

pytestmark = pytest.mark.anyio

MODEL = "claude-mock"
USER: list[Any] = [{"role": "user", "content": "hello world!"}]  # 12 characters: 3 tokens
SYSTEM = "You are terse."  # 14 characters: 4 tokens
LONG = "a" * 400  # 100 tokens


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(server: MockProvider | ProviderProcess) -> anthropic.AsyncAnthropic:
    """An anthropic client that does not retry, so every 429 and 529 surfaces."""
    return anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key="test", max_retries=0
    )


def openai_client(server: MockProvider) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[MockProvider, FakeClock]]:
    """RPM 3 and TPM 1,000 at 60x (1 s windows) on a fake clock, no latency."""
    clock = FakeClock(start_s=1000.0)
    limits = Limits(rpm=3, tpm=1_000, concurrency=5)
    async with MockProvider(limits, speed=60, clock=clock.now) as server:
        yield server, clock


def cached_system(text: str) -> list[Any]:
    """A system prompt of one text block that ends a cacheable prefix."""
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


def assert_reset(headers: Any, name: str, wait_s: float, before_s: float, after_s: float) -> None:
    """``anthropic-ratelimit-<name>-reset`` is `wait_s` after the answer: between the wall
    clock read before and after the call, plus `wait_s`, to the millisecond."""
    text = headers[f"anthropic-ratelimit-{name}-reset"]
    assert text.endswith("Z")
    at_s = datetime.datetime.fromisoformat(text).timestamp()
    assert before_s + wait_s - 0.001 <= at_s <= after_s + wait_s + 0.001


def post(path: str, payload: object) -> bytes:
    return request("POST", path, json.dumps(payload).encode())


# --- answers ---------------------------------------------------------------------------


async def test_reset_instants_are_rfc3339_rounded_up_to_the_millisecond() -> None:
    """Unix times are written in UTC with a Z, never earlier than the instant."""
    assert format_rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_rfc3339(86_401.0004) == "1970-01-02T00:00:01.001Z"


async def test_a_message_reports_usage_and_anthropic_rate_limit_headers(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Prompt 4 + 3, output min(5, 16) = 5 (stop max_tokens); 12 of TPM's 1,000 reserved."""
    server, _ = fake_server
    before_s = time.time()
    async with (
        client(server) as api,
        api.messages.with_streaming_response.create(
            model=MODEL, system=SYSTEM, messages=USER, max_tokens=5, metadata={"user_id": "u1"}
        ) as raw,
    ):
        message = await raw.parse()
    after_s = time.time()
    assert (message.type, message.role, message.model) == ("message", "assistant", MODEL)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "lorem ipsum dolor sit amet"  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (7, 5)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)
    headers = raw.headers
    assert headers["request-id"].startswith("req_")
    assert headers["anthropic-ratelimit-requests-limit"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "2"
    for name in ("tokens", "input-tokens", "output-tokens"):
        assert headers[f"anthropic-ratelimit-{name}-limit"] == "1000"
        assert headers[f"anthropic-ratelimit-{name}-remaining"] == "988"
    assert_reset(headers, "requests", 1.0, before_s, after_s)
    assert "x-ratelimit-limit-requests" not in headers
    [call] = server.calls
    assert (call.endpoint, call.prompt_tokens, call.reserved_tokens) == ("messages", 7, 12)


async def test_a_streamed_message_sends_every_event_and_the_helper_assembles_it(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """message_start .. message_stop, one text delta a token; stream().get_final_message()."""
    server, _ = fake_server
    async with client(server) as api:
        stream = await api.messages.create(model=MODEL, messages=USER, max_tokens=3, stream=True)
        events = [event async for event in stream]
        async with api.messages.stream(
            model=MODEL, system=[{"type": "text", "text": SYSTEM}], messages=USER, max_tokens=40
        ) as helper:
            texts = [text async for text in helper.text_stream]
            final = await helper.get_final_message()
    kinds = [event.type for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert (start.message.usage.input_tokens, start.message.usage.output_tokens) == (3, 1)
    assert delta.type == "message_delta"
    assert (delta.delta.stop_reason, delta.usage.output_tokens) == ("max_tokens", 3)
    assert "".join(texts) == "lorem ipsum dolor sit amet consectetur adipiscing elit" + (
        " lorem ipsum dolor sit amet consectetur adipiscing elit"
    )
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 16)
    assert final.content[0].text == "".join(texts)  # type: ignore[union-attr]
    stats = server.statistics()
    assert (stats.served, stats.served_by_endpoint) == (2, {"messages": 2})


async def test_count_tokens_matches_the_chat_completions_count_and_uses_no_window(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """System and messages counted as a chat completion counts them; no request is used."""
    server, _ = fake_server
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "你好 world"}]},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "hello world!"},
    ]
    async with (
        client(server) as api,
        api.messages.with_streaming_response.count_tokens(
            model=MODEL, system=cached_system(SYSTEM), messages=messages
        ) as raw,
    ):
        counted = await raw.parse()
    async with openai_client(server) as chat:
        completion = await chat.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": SYSTEM}, *messages],
            max_tokens=1,
        )
    assert completion.usage is not None
    assert counted.input_tokens == completion.usage.prompt_tokens == 11
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "3"
    assert server.statistics().served == 1


# --- prompt caching ----------------------------------------------------------------------


async def test_a_cached_prefix_is_written_once_then_read(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """100 system tokens: written by the first call, read by the next; a later breakpoint
    reads the system prefix and writes only what follows it."""
    server, clock = fake_server
    rounds: list[list[Any]] = [
        USER,
        USER,
        [{"role": "user", "content": cached_system("hello world!")}],
    ]
    async with client(server) as api:
        usages = []
        for messages in rounds:
            message = await api.messages.create(
                model=MODEL, system=cached_system(LONG), messages=messages, max_tokens=1
            )
            usages.append(message.usage)
            clock.advance(1.0)
        other = await api.messages.create(
            model="other-model", system=cached_system(LONG), messages=USER, max_tokens=1
        )
    split = [
        (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens) for u in usages
    ]
    assert split == [(3, 100, 0), (3, 0, 100), (0, 3, 100)]
    assert other.usage.cache_creation_input_tokens == 100  # the cache is per model
    calls = server.calls
    assert [(c.prompt_tokens, c.cache_read_tokens, c.cache_creation_tokens) for c in calls] == [
        (103, 0, 100),
        (103, 100, 0),
        (103, 100, 3),
        (103, 0, 100),
    ]


async def test_a_cache_control_on_the_request_marks_the_last_block(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Automatic caching: the whole prompt, 100 + 3 tokens, is written, then read."""
    server, _ = fake_server
    automatic = {"cache_control": {"type": "ephemeral"}}
    async with client(server) as api:
        usages = [
            (
                await api.messages.create(
                    model=MODEL, system=LONG, messages=USER, max_tokens=1, extra_body=automatic
                )
            ).usage
            for _ in range(2)
        ]
    split = [
        (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens) for u in usages
    ]
    assert split == [(0, 103, 0), (0, 0, 103)]


@pytest.mark.parametrize("count_cache_reads", [True, False])
async def test_cache_reads_count_toward_tpm_unless_the_provider_excludes_them(
    count_cache_reads: bool,
) -> None:
    """TPM 200, 103 + 5 a call: a second call fits only when its 100 cached tokens are free."""
    clock = FakeClock(start_s=0.0)
    server = MockProvider(
        Limits(tpm=200), speed=60, clock=clock.now, count_cache_reads=count_cache_reads
    )
    async with server, client(server) as api:
        await api.messages.create(
            model=MODEL, system=cached_system(LONG), messages=USER, max_tokens=5
        )
        second = api.messages.with_raw_response.create(
            model=MODEL, system=cached_system(LONG), messages=USER, max_tokens=5
        )
        if count_cache_reads:
            with pytest.raises(anthropic.RateLimitError):
                await second
            assert [call.reserved_tokens for call in server.calls] == [108]
        else:
            raw = await second
            assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(200 - 108 - 8)
            assert [call.reserved_tokens for call in server.calls] == [108, 8]


async def test_usage_counting_records_the_uncached_usage_when_cache_reads_are_free() -> None:
    """Counting ``usage``: the second call records 3 + 5, not 103 + 5, when it ends."""
    clock = FakeClock(start_s=0.0)
    limits = Limits(tpm=2_000)
    server = MockProvider(
        limits, speed=60, clock=clock.now, token_counting="usage", count_cache_reads=False
    )
    async with server, client(server) as api:
        for _ in range(2):
            await api.messages.create(
                model=MODEL, system=cached_system(LONG), messages=USER, max_tokens=5
            )
        raw = await api.messages.with_raw_response.create(model=MODEL, messages=USER, max_tokens=5)
    # The third call's own 3 + 5 is held at admission, beside the 108 and 8 recorded.
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(2_000 - 108 - 8 - 8)


# --- refusals ------------------------------------------------------------------------------


async def test_rpm_exceeded_is_a_rate_limit_error_with_retry_after_and_limit_headers(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Three calls at t, a fourth at t + 0.25 s: 429, retry-after 1 (750 ms rounded up)."""
    server, clock = fake_server
    async with client(server) as api:
        for _ in range(3):
            await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
        clock.advance(0.25)
        before_s = time.time()
        with pytest.raises(anthropic.RateLimitError) as caught:
            await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
        after_s = time.time()
        clock.advance(0.75)
        await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
    error = caught.value
    assert error.status_code == 429
    headers = error.response.headers
    assert headers["retry-after"] == "1"
    assert "retry-after-ms" not in headers
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["anthropic-ratelimit-tokens-remaining"] == str(1_000 - 3 * 4)
    assert_reset(headers, "requests", 0.75, before_s, after_s)
    assert headers["request-id"].startswith("req_")
    body = error.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert "on rpm: limit 3 requests per 1 s" in body["error"]["message"]
    stats = server.statistics()
    assert (stats.rejected, stats.rejected_by_endpoint) == ({"rpm": 1}, {"messages": 1})


async def test_a_message_larger_than_tpm_is_refused_for_good(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Prompt + max_tokens over the whole TPM: 429 with ``x-should-retry: false``."""
    server, _ = fake_server
    async with client(server) as api:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await api.messages.create(model=MODEL, messages=USER, max_tokens=998)
    headers = caught.value.response.headers
    assert "retry-after" not in headers
    assert headers["x-should-retry"] == "false"
    assert "Request too large" in str(caught.value)
    assert server.statistics().rejected == {"tpm": 1}


async def test_injected_overloads_answer_529_to_messages_calls_only(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """An injected 529 skips an OpenAI-style call, answers the next Messages call, then stops."""
    server, _ = fake_server
    server.inject_529s(1, retry_after_s=2.5)
    async with openai_client(server) as chat:
        await chat.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    async with client(server) as api:
        with pytest.raises(anthropic.InternalServerError) as caught:
            await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
        await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == 529
    assert error.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    headers = error.response.headers
    assert headers["retry-after"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "2"  # the 529 counted nothing
    stats = server.statistics()
    assert (stats.overloaded, stats.rejected, stats.served) == (1, {}, 2)


async def test_injected_429s_answer_messages_calls_in_anthropic_s_envelope(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """``/admin/inject`` arms 429s for any call and, with ``"status": 529``, overloads."""
    server, _ = fake_server
    status, _, _ = await raw_http(server, post("/admin/inject", {"count": 1}))
    assert status == 200
    status, _, _ = await raw_http(server, post("/admin/inject", {"count": 1, "status": 529}))
    assert status == 200
    status, _, answer = await raw_http(server, post("/admin/inject", {"status": 503}))
    assert (status, json.loads(answer)["error"]["param"]) == (400, "status")
    async with client(server) as api:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
    assert limited.value.body == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "The service is at capacity (an injected 429). Please try again later.",
        },
    }
    assert overloaded.value.status_code == 529
    assert server.statistics().rejected == {"injected": 1}


# --- one account, two APIs -----------------------------------------------------------------


async def test_openai_and_messages_calls_share_the_same_windows() -> None:
    """RPM 5: three chat completions and three messages in one window, the sixth is refused."""
    clock = FakeClock(start_s=0.0)
    async with MockProvider(Limits(rpm=5), speed=60, clock=clock.now) as server:
        async with openai_client(server) as chat:
            for _ in range(3):
                await chat.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
        async with client(server) as api:
            for _ in range(2):
                await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
            with pytest.raises(anthropic.RateLimitError):
                await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
    stats = server.statistics()
    assert stats.rejected == {"rpm": 1}
    assert stats.served_by_endpoint == {"chat.completions": 3, "messages": 2}
    assert stats.rejected_by_endpoint == {"messages": 1}
    assert stats.peak_use["rpm"] == (5, 5)


async def test_the_concurrency_cap_counts_calls_of_both_apis() -> None:
    """Cap 1, calls of 0.1 s real: a chat completion and a message at once, one is refused."""
    server = MockProvider(Limits(concurrency=1), speed=60, latency_s=6.0)
    async with server, openai_client(server) as chat, client(server) as api:
        results = await asyncio.gather(
            chat.chat.completions.create(model=MODEL, messages=USER, max_tokens=1),
            api.messages.create(model=MODEL, messages=USER, max_tokens=1),
            return_exceptions=True,
        )
    refused = [
        r for r in results if isinstance(r, openai.RateLimitError | anthropic.RateLimitError)
    ]
    assert len(refused) == 1
    stats = server.statistics()
    assert (stats.served, stats.rejected, stats.max_concurrency) == (1, {"concurrency": 1}, 1)


# --- bad requests ------------------------------------------------------------------------------


async def test_bad_messages_requests_get_400_invalid_request_error(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """An unknown role, a bad cache_control, five breakpoints, no max_tokens, bad JSON: 400."""
    server, _ = fake_server
    five: list[Any] = [{"role": "user", "content": cached_system("x") * 5}]
    tool_role: list[Any] = [{"role": "tool", "content": "x"}]
    forever: list[Any] = [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}]
    async with client(server) as api:
        with pytest.raises(anthropic.BadRequestError, match="'user', 'assistant' or 'system'"):
            await api.messages.create(model=MODEL, messages=tool_role, max_tokens=1)
        with pytest.raises(anthropic.BadRequestError, match=r"system\.0\.cache_control\.type"):
            await api.messages.create(model=MODEL, system=forever, messages=USER, max_tokens=1)
        with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks") as caught:
            await api.messages.create(model=MODEL, messages=five, max_tokens=1)
        with pytest.raises(anthropic.NotFoundError):
            await api.post("/v1/messages/nowhere", cast_to=object, body={})
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    status, headers, body = await raw_http(server, post("/v1/messages", {"model": MODEL}))
    assert (status, json.loads(body)) == (
        400,
        {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
        },
    )
    assert headers["anthropic-ratelimit-requests-remaining"] == "3"
    status, _, body = await raw_http(server, request("POST", "/v1/messages", b"{oops"))
    assert (status, json.loads(body)["error"]["type"]) == (400, "invalid_request_error")
    stats = server.statistics()
    assert (stats.bad_requests, stats.served, stats.rejected) == (5, 0, {})


# --- in a process of its own ------------------------------------------------------------------


async def test_a_provider_process_serves_messages_and_injects_overloads() -> None:
    """ProviderProcess passes count_cache_reads and arms 529s over HTTP."""
    limits = Limits(rpm=100, tpm=200)
    async with ProviderProcess(limits, speed=60, count_cache_reads=False) as provider:
        await provider.inject_529s(1, retry_after_s=0.5)
        async with client(provider) as api:
            with pytest.raises(anthropic.APIStatusError) as caught:
                await api.messages.create(model=MODEL, messages=USER, max_tokens=1)
            for _ in range(2):  # 108 then 8: fits TPM 200 only with cache reads free
                await api.messages.create(
                    model=MODEL, system=cached_system(LONG), messages=USER, max_tokens=5
                )
        stats = await provider.statistics()
        calls = await provider.calls()
    assert (caught.value.status_code, caught.value.response.headers["retry-after"]) == (529, "1")
    assert (stats.overloaded, stats.served_by_endpoint) == (1, {"messages": 2})
    assert [(call.reserved_tokens, call.cache_read_tokens) for call in calls] == [
        (108, 0),
        (8, 100),
    ]
