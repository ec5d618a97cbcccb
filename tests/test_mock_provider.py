"""The HTTP mock provider: the real `openai` client against it, and its window math."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner

import ratekit
from ratekit import Limits, Rate, TokenCounting
from ratekit.cli import main as cli
from ratekit.clock import FakeClock
from ratekit.testing._strict import StrictRefusal, StrictWindows, Ticket
from ratekit.testing.mock_provider import (
    MockProvider,
    estimate_tokens,
    openai_duration,
    start_mock_provider,
)

try:  # the HTTP library the SDKs send with
    import httpx2 as sdk_httpx
except ImportError:  # pragma: no cover - older SDK releases use httpx itself
    import httpx as sdk_httpx  # type: ignore[no-redef]

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hello world!"}]  # 12 characters: 3 tokens


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(server: MockProvider) -> openai.AsyncOpenAI:
    """An openai client that does not retry, so every 429 surfaces."""
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="any", max_retries=0)


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[MockProvider, FakeClock]]:
    """RPM 3 and TPM 1,000 at 60x (1 s windows) on a fake clock, no latency."""
    clock = FakeClock(start_s=1000.0)
    limits = Limits(rpm=3, tpm=1_000, concurrency=5)
    async with MockProvider(limits, speed=60, clock=clock.now) as server:
        yield server, clock


def request(method: str, path: str, body: bytes = b"", *extra: str) -> bytes:
    """The bytes of an HTTP/1.1 request with a Content-Length body and `extra` header lines."""
    lines = [f"{method} {path} HTTP/1.1", "host: mock", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and Content-Length body of the next answer on a connection."""
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def raw_http(server: MockProvider, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


# --- window math at fixed instants ------------------------------------------------------


def admit(
    windows: StrictWindows, now_s: float, tokens: float = 0, until_s: float = math.inf
) -> Ticket:
    ticket = windows.try_admit(now_s, tokens=tokens, until_s=until_s)
    assert isinstance(ticket, Ticket), ticket
    return ticket


def refuse(windows: StrictWindows, now_s: float, tokens: float = 0) -> StrictRefusal:
    refusal = windows.try_admit(now_s, tokens=tokens)
    assert isinstance(refusal, StrictRefusal), refusal
    return refusal


async def test_requests_count_in_a_rolling_window_and_the_wait_is_exact() -> None:
    """Three per 60 s: the fourth waits until the oldest arrival is 60 s old, not a moment less."""
    windows = StrictWindows(Limits(rpm=3))
    for now in (0.0, 10.0, 20.0):
        admit(windows, now)
    assert refuse(windows, 30.0) == StrictRefusal("rpm", "requests", 30.0)
    assert refuse(windows, 59.5).retry_after_s == 0.5
    admit(windows, 60.0)
    assert refuse(windows, 60.0).retry_after_s == 10.0
    assert windows.rejected == {"rpm": 3}


async def test_tokens_reserved_at_arrival_wait_for_enough_old_arrivals_to_expire() -> None:
    """TPM 100: 20 more tokens beside 60 + 30 wait for the 60 to expire; 101 never fit."""
    windows = StrictWindows(Limits(tpm=100))
    admit(windows, 0.0, tokens=60)
    admit(windows, 10.0, tokens=30)
    assert refuse(windows, 20.0, tokens=20) == StrictRefusal("tpm", "tokens", 40.0)
    too_large = refuse(windows, 20.0, tokens=101)
    assert too_large.never
    assert math.isinf(too_large.retry_after_s)
    [state] = windows.states(20.0)
    assert (state.limit, state.remaining, state.reset_s) == (100, 10, 50.0)


async def test_usage_counting_holds_the_reservation_then_counts_usage_at_the_end() -> None:
    """In ``usage`` mode a call in flight holds prompt + max; at its end its real usage counts."""
    windows = StrictWindows(Limits(tpm=100), TokenCounting.USAGE)
    ticket = admit(windows, 0.0, tokens=80, until_s=30.0)
    assert refuse(windows, 5.0, tokens=30).retry_after_s == 25.0  # a hint: the call's end
    windows.finish(ticket, 30.0, used_tokens=50)
    admit(windows, 31.0, tokens=50)
    assert refuse(windows, 32.0, tokens=10).retry_after_s == 58.0  # the usage recorded at 30 s
    assert windows.peak_use() == {"tpm": (100.0, 100)}


@pytest.mark.parametrize("counting", [TokenCounting.SAFE, "at-noon"])
def test_a_provider_counts_at_arrival_or_at_completion_only(counting: str) -> None:
    """``safe`` is a client's policy, not a provider's; a typo is named, not read as reserve."""
    with pytest.raises(ratekit.InvalidArgumentError, match="'reserve', 'usage'"):
        StrictWindows(Limits(tpm=100), counting)


async def test_concurrency_counts_calls_in_flight_and_hints_the_earliest_end() -> None:
    """A cap of 1 refuses a second call until the first ends; the hint is its planned end."""
    windows = StrictWindows(Limits(concurrency=1))
    first = admit(windows, 0.0, until_s=4.0)
    assert refuse(windows, 1.0) == StrictRefusal("concurrency", "concurrency", 3.0)
    windows.finish(first, 2.0, used_tokens=0)
    windows.finish(first, 2.0, used_tokens=0)  # a second finish is a no-op
    admit(windows, 2.0)
    assert windows.peak_in_flight == 1


async def test_new_limits_keep_the_traffic_already_counted() -> None:
    """Tightening RPM counts earlier arrivals; a new rate is seeded from the same unit's log."""
    windows = StrictWindows(Limits(rpm=10))
    for now in (0.0, 1.0, 2.0):
        admit(windows, now)
    windows.set_limits(Limits(rpm=3, rates=(Rate(2, 5.0, name="rp5s"),)), 3.0)
    assert refuse(windows, 3.0) == StrictRefusal("rpm", "requests", 57.0)
    assert refuse(windows, 6.5).dimension == "rpm"  # rp5s has 1 left, rpm none
    windows.set_limits(Limits(rates=(Rate(2, 5.0, name="rp5s"),)), 6.5)
    admit(windows, 6.5)
    assert refuse(windows, 6.5).retry_after_s == 0.5  # the arrival at 2 s leaves the 5 s window


async def test_durations_are_written_as_openai_writes_them() -> None:
    """Reset headers read like Go durations, rounded up to the millisecond."""
    cases = {0.0: "0s", 0.0004: "1ms", 0.25: "250ms", 1.5: "1.5s", 60.0: "1m0s", 3725.0: "1h2m5s"}
    assert {seconds: openai_duration(seconds) for seconds in cases} == cases


async def test_tokens_are_estimated_by_a_documented_rule() -> None:
    """ceil(characters / 4), and one token per CJK ideograph."""
    assert [estimate_tokens(text) for text in ("", "hi", "hello world!", "你好 world")] == [
        0,
        1,
        3,
        4,
    ]


# --- the openai client against the server ---------------------------------------------


async def test_a_chat_completion_reports_usage_and_rate_limit_headers(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """prompt ceil(12/4) = 3, output min(5, 16) = 5; 8 of TPM's 1,000 reserved, 2 of 3 RPM left."""
    server, _ = fake_server
    async with client(server) as api:
        raw = await api.chat.completions.with_raw_response.create(
            model="kimi", messages=USER, max_tokens=5
        )
    completion = raw.parse()
    assert completion.model == "kimi"
    assert completion.choices[0].message.content == "lorem ipsum dolor sit amet"
    assert completion.usage is not None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 5, 8)
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "2"
    assert headers["x-ratelimit-reset-requests"] == "1s"
    assert headers["x-ratelimit-remaining-tokens"] == "992"
    [call] = server.calls
    assert (call.arrived_s, call.reserved_tokens, call.completed) == (1000.0, 8, True)


async def test_a_streamed_chat_completion_ends_with_usage_and_done(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """SSE chunks carry the filler one token a chunk; include_usage adds a final usage chunk."""
    server, _ = fake_server
    async with client(server) as api:
        stream = await api.chat.completions.create(
            model="kimi",
            messages=[{"role": "user", "content": "你好 world"}],
            max_completion_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "lorem ipsum dolor"
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 3, 7)
    assert server.statistics().served == 1


async def test_embeddings_responses_and_models_answer_like_openai(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Embeddings decode (base64 by default in the client), responses have output_text."""
    server, _ = fake_server
    async with client(server) as api:
        embedded = await api.embeddings.create(model="emb", input=["abcd", "abcdefgh"])
        response = await api.responses.create(model="kimi", input="hi", max_output_tokens=2)
        models = [model.id async for model in api.models.list()]
    assert [len(item.embedding) for item in embedded.data] == [8, 8]
    assert (embedded.usage.prompt_tokens, embedded.usage.total_tokens) == (3, 3)
    assert response.output_text == "lorem ipsum"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (1, 2)
    assert models == ["mock-model"]


async def test_rpm_exceeded_is_a_rate_limit_error_with_an_exact_retry_after(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Three calls at t, a fourth at t + 0.25 s: 429, retry in 750 ms of the 1 s window."""
    server, clock = fake_server
    async with client(server) as api:
        for _ in range(3):
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
        clock.advance(0.25)
        with pytest.raises(openai.RateLimitError) as caught:
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
        clock.advance(0.75)
        await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "750")
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "750ms"
    error = caught.value.body
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert server.statistics().rejected == {"rpm": 1}


async def test_a_request_larger_than_tpm_is_refused_for_good(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Prompt + max_tokens over the whole TPM: 429 without Retry-After, and no retry."""
    server, _ = fake_server
    async with client(server) as api:
        with pytest.raises(openai.RateLimitError) as caught:
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=998)
    headers = caught.value.response.headers
    assert "retry-after" not in headers
    assert headers["x-should-retry"] == "false"
    assert caught.value.body["type"] == "tokens"
    assert server.statistics().rejected == {"tpm": 1}


async def test_calls_over_the_concurrency_cap_get_429() -> None:
    """Cap 2, calls of 0.2 s real: of three at once, one is refused; two were ever in flight."""
    limits = Limits(concurrency=2)
    server = await start_mock_provider(limits, speed=60, latency_s=12.0)
    try:
        async with client(server) as api:
            results = await asyncio.gather(
                *(
                    api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
                    for _ in range(3)
                ),
                return_exceptions=True,
            )
    finally:
        await server.close()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 1
    assert 0 < int(refused[0].response.headers["retry-after-ms"]) <= 200
    stats = server.statistics()
    assert (stats.served, stats.rejected, stats.max_concurrency) == (2, {"concurrency": 1}, 2)
    assert stats.peak_use["concurrency"] == (2, 2)


async def test_set_limits_tightens_at_run_time_counting_earlier_calls(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Two calls under RPM 3; cut to RPM 2 (by the API, then by /admin): the third is refused."""
    server, _ = fake_server
    async with client(server) as api:
        for _ in range(2):
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
        server.set_limits(server.limits.replace(rpm=2))
        with pytest.raises(openai.RateLimitError):
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
        server.set_limits(server.limits.replace(rpm=3))
        limits = request("POST", "/admin/limits", json.dumps({"rpm": 2}).encode())
        status, _, answer = await raw_http(server, limits)
        assert (status, json.loads(answer)["limits"]["rpm"]) == (200, 2)
        with pytest.raises(openai.RateLimitError):
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
    assert server.effective_limits.all_rates[0].period_s == 1.0
    assert server.statistics().rejected == {"rpm": 2}


async def test_injected_429s_answer_the_next_calls_then_stop(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Two injected 429s name their retry time and count nothing in the windows."""
    server, _ = fake_server
    server.inject_429s(2, retry_after_s=2.5)
    async with client(server) as api:
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as caught:
                await api.chat.completions.create(model="kimi", messages=USER)
        await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2500")
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert server.statistics().rejected == {"injected": 2}


async def test_bad_requests_get_400_and_unknown_paths_404(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Missing model or messages, bad max_tokens and malformed JSON: 400; a wrong path: 404."""
    server, _ = fake_server
    async with client(server) as api:
        with pytest.raises(openai.BadRequestError, match="non-empty array"):
            await api.chat.completions.create(model="kimi", messages=[])
        with pytest.raises(openai.BadRequestError, match="model parameter"):
            await api.chat.completions.create(model="", messages=USER)
        with pytest.raises(openai.BadRequestError, match="positive integer"):
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=0)
        with pytest.raises(openai.NotFoundError, match="Invalid URL"):
            await api.get("/nowhere", cast_to=object)
    status, _, body = await raw_http(server, request("POST", "/v1/chat/completions", b"{oops"))
    assert status == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    stats = server.statistics()
    assert (stats.bad_requests, stats.served, stats.rejected) == (4, 0, {})


async def test_usage_counting_settles_the_real_usage_when_the_call_ends() -> None:
    """With ``usage`` counting, 3 + 5 tokens count after the call, not 3 + 1,024 reserved."""
    clock = FakeClock(start_s=0.0)
    limits = Limits(tpm=2_000)
    server = MockProvider(limits, speed=60, token_counting="usage", clock=clock.now)
    async with server, client(server) as api:
        await api.chat.completions.create(model="kimi", messages=USER, max_tokens=5)
        raw = await api.chat.completions.with_raw_response.create(model="kimi", messages=USER)
    # Headers are taken at admission: the second call's 1,027 is held beside the first's 8.
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(2_000 - 8 - 1_027)
    assert server.statistics().peak_use["tpm"] == (8 + 1_027, 2_000)
    assert [call.reserved_tokens for call in server.calls] == [8, 1_027]


async def test_the_admin_endpoints_inject_429s_and_report_statistics(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """POST /admin/inject answers the next call with 429; GET /admin/stats counts it."""
    server, _ = fake_server
    inject = request("POST", "/admin/inject", b'{"count": 1, "retry_after_s": 0.5}')
    assert (await raw_http(server, inject))[0] == 200
    async with client(server) as api:
        with pytest.raises(openai.RateLimitError) as caught:
            await api.chat.completions.create(model="kimi", messages=USER, max_tokens=1)
    assert caught.value.response.headers["retry-after-ms"] == "500"
    status, _, stats = await raw_http(server, request("GET", "/admin/stats"))
    assert (status, json.loads(stats)["rejected"]) == (200, {"injected": 1})
    status, _, error = await raw_http(server, request("POST", "/admin/limits", b'{"rpm": -1}'))
    assert (status, json.loads(error)["error"]["message"]) == (
        400,
        "Limits.rpm must be positive, got -1 (None means unlimited)",
    )


# --- the HTTP server ------------------------------------------------------------------

CHAT = json.dumps({"model": "kimi", "messages": USER, "max_tokens": 2}).encode()


async def test_a_chunked_request_body_is_read_whole(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """A body sent in three chunks, without Content-Length, is the same call as one sent whole."""
    server, _ = fake_server
    parts = (CHAT[:10], CHAT[10:25], CHAT[25:])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n"
    status, _, answer = await raw_http(server, head + b"\r\n" + chunked)
    assert status == 200
    assert json.loads(answer)["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert server.statistics().served == 1


async def test_one_connection_carries_request_after_request(
    fake_server: tuple[MockProvider, FakeClock],
) -> None:
    """Keep-alive: two requests written back to back, then a third, all on one connection and
    answered in order; the third asks to close, and the server closes it after answering."""
    server, _ = fake_server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request("GET", "/v1/models") + request("POST", "/v1/chat/completions", CHAT))
        models = await read_answer(reader)
        chat = await read_answer(reader)
        writer.write(request("GET", "/admin/stats", b"", "connection: close"))
        stats = await read_answer(reader)
        rest = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert [answer[0] for answer in (models, chat, stats)] == [200, 200, 200]
    assert json.loads(models[2])["data"][0]["id"] == "mock-model"
    assert json.loads(chat[2])["choices"][0]["message"]["content"] == "lorem ipsum"
    assert json.loads(stats[2])["served"] == 1
    assert stats[1]["connection"] == "close"
    assert rest == b""


@pytest.mark.parametrize(
    "data",
    [
        b"NONSENSE\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /v1/models HTTP/1.1\r\nhost mock\r\n\r\n",  # a header without a colon
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-length: ten\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n"
        b"\r\nzz\r\n",
    ],
)
async def test_a_malformed_request_gets_400_and_the_server_goes_on(
    fake_server: tuple[MockProvider, FakeClock], data: bytes
) -> None:
    """Bytes that are not HTTP/1.1: a 400, that connection closed, every other one served."""
    server, _ = fake_server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        status_line = await asyncio.wait_for(reader.readline(), 5)
        await asyncio.wait_for(reader.read(), 5)  # to the end: the server closes it
    finally:
        writer.close()
    assert status_line.split()[:2] == [b"HTTP/1.1", b"400"]
    assert (await raw_http(server, request("GET", "/v1/models")))[0] == 200
    assert server.statistics().served == 0


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/v1/chat/completions", lambda body: body["error"]["type"] == "invalid_request_error"),
        ("/v1/messages", lambda body: body["error"]["type"] == "request_too_large"),
    ],
)
async def test_a_body_over_32_mib_gets_413_before_it_is_read(
    fake_server: tuple[MockProvider, FakeClock], path: str, error: Any
) -> None:
    """Content-Length says 40 MB: 413 at once, in the API's envelope, and the connection ends."""
    server, _ = fake_server
    data = f"POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-length: 40000000\r\n\r\n"
    status, headers, body = await raw_http(server, data.encode())
    assert (status, headers["connection"]) == (413, "close")
    assert error(json.loads(body))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_stream_is_sent_token_by_token_as_it_is_produced(path: str) -> None:
    """Five tokens, 100 ms each: each token's event reaches the client when it is produced,
    not all at the end."""
    server = MockProvider(Limits(), latency_per_token_s=0.1, completion_tokens=5)
    body = {"model": "kimi", "messages": USER, "max_tokens": 5, "stream": True}
    arrivals: list[float] = []
    async with server, httpx.AsyncClient(base_url=server.anthropic_base_url) as http:
        started = time.monotonic()
        async with http.stream("POST", path, json=body) as streamed:
            async for line in streamed.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line.removeprefix("data: "))
                delta = (event.get("choices") or [{}])[0].get("delta", {})
                if delta.get("content") or event.get("type") == "content_block_delta":
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > 0.05 for gap in gaps), arrivals
    assert arrivals[0] < 0.3


async def wait_until_idle(server: MockProvider, timeout_s: float = 2.0) -> None:
    """Until no call is in flight (at most `timeout_s`)."""
    async with asyncio.timeout(timeout_s):
        while server.statistics().in_flight:  # noqa: ASYNC110 - polls a snapshot
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_client_that_leaves_mid_stream_frees_its_slot_at_once(path: str) -> None:
    """Concurrency 1 and a stream of 100 tokens at 50 ms each (5 s): the client reads its first
    event and hangs up. The call ends then (not completed), and the next one is admitted."""
    server = MockProvider(Limits(concurrency=1), latency_per_token_s=0.05, completion_tokens=100)
    body = {"model": "kimi", "messages": USER, "max_tokens": 100, "stream": True}
    async with server, httpx.AsyncClient(base_url=server.anthropic_base_url) as http:
        started = time.monotonic()
        async with http.stream("POST", path, json=body) as streamed:
            assert streamed.status_code == 200
            async for line in streamed.aiter_lines():
                if line.startswith("data: "):
                    break
        await wait_until_idle(server)
        again = await http.post(path, json={**body, "max_tokens": 1, "stream": False})
    assert again.status_code == 200
    left, answered = server.calls
    assert (left.completed, answered.completed) == (False, True)
    assert left.finished_s - left.arrived_s < 2.0
    assert time.monotonic() - started < 3.0
    stats = server.statistics()
    assert (stats.served, stats.rejected, stats.in_flight) == (1, {}, 0)


async def test_a_client_that_gives_up_before_the_answer_frees_its_slot() -> None:
    """A call of 5 s whose client times out after 0.2 s ends when the client goes away."""
    server = MockProvider(Limits(concurrency=1), latency_s=5.0)
    async with server, httpx.AsyncClient(base_url=server.base_url) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/chat/completions", content=CHAT, timeout=0.2)
        await wait_until_idle(server)
    [call] = server.calls
    assert not call.completed
    assert call.finished_s - call.arrived_s < 2.0
    assert server.statistics().served == 0


async def test_close_ends_the_calls_in_flight() -> None:
    """Closing the server drops its connections: a 5 s call ends at once, not completed."""
    server = MockProvider(Limits(concurrency=2), latency_s=5.0)
    await server.start()
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        call = asyncio.ensure_future(http.post("/chat/completions", content=CHAT))
        async with asyncio.timeout(2):
            while not server.statistics().in_flight:  # noqa: ASYNC110 - polls a snapshot
                await asyncio.sleep(0.01)
        started = time.monotonic()
        await server.close()
        with pytest.raises(httpx.TransportError):
            await call
    assert time.monotonic() - started < 2.0
    assert [c.completed for c in server.calls] == [False]
    assert server.statistics().in_flight == 0


async def test_the_provider_serves_in_process_through_an_asgi_transport() -> None:
    """No port: httpx's ASGITransport calls the application itself, for both SDKs; a stream
    arrives whole; the windows are the same (RPM 3: the fourth call is refused)."""
    server = MockProvider(Limits(rpm=3), completion_tokens=4)
    http = sdk_httpx.AsyncClient(transport=sdk_httpx.ASGITransport(app=server))
    chat = openai.AsyncOpenAI(
        base_url="http://mock/v1", api_key="any", max_retries=0, http_client=http
    )
    messages = anthropic.AsyncAnthropic(
        base_url="http://mock", api_key="any", max_retries=0, http_client=http
    )
    async with http:
        completion = await chat.chat.completions.create(model="kimi", messages=USER)
        stream = await chat.chat.completions.create(model="kimi", messages=USER, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        message = await messages.messages.create(model="kimi", messages=USER, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as caught:
            await chat.chat.completions.create(model="kimi", messages=USER)
    assert completion.choices[0].message.content == streamed == "lorem ipsum dolor sit"
    assert message.usage.output_tokens == 2
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    stats = server.statistics()
    assert (stats.served, stats.rejected) == (3, {"rpm": 1})
    assert server.port == 0  # never started


async def test_the_application_speaks_the_lifespan_protocol_and_http_only() -> None:
    """Any ASGI server may send lifespan events (each is acknowledged); a WebSocket is refused."""
    server = MockProvider(Limits())
    events = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(events)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await server({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    with pytest.raises(ValueError, match="HTTP only"):
        await server({"type": "websocket"}, receive, send)


def test_without_uvicorn_the_import_names_the_extra() -> None:
    """The server runs on uvicorn, in the cli extra: without it, the import says so."""
    code = (
        "import sys\n"
        "sys.modules['uvicorn'] = None\n"
        "try:\n"
        "    import ratekit.testing.mock_provider\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error.extra, error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == (
        "MissingExtraError cli ratekit.testing.mock_provider needs the 'uvicorn' package, "
        "which is not installed: pip install 'ratekit[cli]'"
    )


# --- the command line -----------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
async def test_the_command_line_serves_a_tier_until_interrupted() -> None:
    """``python -m ratekit.testing.mock_provider`` prints its base URL, serves, and exits 0 on
    Ctrl-C."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "ratekit.testing.mock_provider", "--tier", "tier0", "--port", "0", "--speed", "60"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        banner = (await asyncio.wait_for(child.stdout.readline(), 10)).decode()
        base_url = (await asyncio.wait_for(child.stdout.readline(), 10)).decode().strip()
        api = openai.AsyncOpenAI(base_url=base_url, api_key="any", max_retries=0)
        async with api:
            raw = await api.chat.completions.with_raw_response.create(model="kimi", messages=USER)
    finally:
        child.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(child.wait(), 30)
    assert "rpm 3" in banner
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"
    assert code == 0


async def test_the_command_line_names_an_unknown_tier() -> None:
    """``ratekit mock-provider`` fails fast, exit code 2, on a tier it cannot find."""
    done = CliRunner().invoke(cli, ["mock-provider", "--provider", "moonshot", "--tier", "tier99"])
    assert done.exit_code == 2, done.output
    [line] = done.output.strip().splitlines()
    assert line.startswith("Error: ")
    assert "tier99" in line


async def test_a_profile_tier_serves_at_speed() -> None:
    """Moonshot tier1 at 60x: RPM 200 per 1 s real, reported in the headers."""
    limits = ratekit.load_profile("moonshot").tier("tier1").limits()
    async with MockProvider(limits, speed=60) as server, client(server) as api:
        raw = await api.chat.completions.with_raw_response.create(model="kimi", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "200"
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(2_000_000 - 3 - 1024)
