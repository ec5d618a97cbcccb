"""A wrapped openai client, over HTTP to the strict local provider."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import openai
import pytest

import ratekit
from ratekit import Account, Limits, Rate, Scheduler
from ratekit import _tokens as tokens_module
from ratekit._tokens import BackgroundEstimator, TiktokenEstimator
from ratekit.integrations._usage import CallPrice, Usage, read_usage
from ratekit.testing.mock_provider import MockProvider

try:  # the HTTP library this openai release sends with
    import httpx2 as openai_httpx
except ImportError:  # pragma: no cover - older openai releases use httpx itself
    import httpx as openai_httpx  # type: ignore[no-redef]

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello world!"}]  # 3 prompt tokens at the provider


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


OPENED: list[openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close every client a test opened while its loop still runs."""
    yield
    while OPENED:
        await OPENED.pop().close()


def raw_client(server: MockProvider) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    OPENED.append(client)
    return client


def setup(server: MockProvider, **overrides: object) -> tuple[object, Scheduler]:
    # Count usage the way the settle reports it, so the tests can read it back exactly.
    account = Account("moonshot", tier="tier1", token_counting="usage", **overrides)
    scheduler = Scheduler(account)
    return ratekit.wrap(raw_client(server), scheduler), scheduler


async def in_flight(scheduler: Scheduler) -> float:
    return (await scheduler.limiter().statistics()).dimension("concurrency").used


async def test_a_plain_call_is_admitted_and_settled_with_its_usage() -> None:
    """chat.completions.create reserves prompt + max_tokens and settles the real usage."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=5) as server:
        client, scheduler = setup(server)
        response = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2", messages=MESSAGES, max_tokens=50
        )
        assert response.usage.total_tokens == 8
        stats = await scheduler.limiter().statistics()
        assert stats.dimension("tpm").used == 8
        assert stats.dimension("rpm").used == 1
        assert await in_flight(scheduler) == 0


async def test_a_stream_holds_its_slot_until_it_ends_and_settles_from_its_last_chunk() -> None:
    """A stream looks as unwrapped (no usage chunk it did not ask for) and settles at its end."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=4) as server:
        client, scheduler = setup(server)
        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2", messages=MESSAGES, max_tokens=50, stream=True
        )
        assert await in_flight(scheduler) == 1
        chunks = [chunk async for chunk in stream]
        assert all(chunk.choices for chunk in chunks)
        assert await in_flight(scheduler) == 0
        assert (await scheduler.limiter().statistics()).dimension("tpm").used == 7


async def test_a_stream_that_asked_for_usage_still_gets_it() -> None:
    """With include_usage set by the caller, the usage chunk is passed on."""
    async with MockProvider(Limits(rpm=100), completion_tokens=2) as server:
        client, _ = setup(server)
        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2",
            messages=MESSAGES,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage.total_tokens == 5
        assert not chunks[-1].choices


async def test_breaking_out_of_a_stream_releases_its_slot() -> None:
    """A caller that stops reading early gives the slot back: on close, or when dropped."""
    async with MockProvider(Limits(rpm=100), completion_tokens=20) as server:
        client, scheduler = setup(server)
        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2", messages=MESSAGES, max_tokens=50, stream=True
        )
        async with stream:
            async for _ in stream:
                break
        assert await in_flight(scheduler) == 0

        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2", messages=MESSAGES, max_tokens=50, stream=True
        )
        async for _ in stream:
            break
        # Reported when the last reference goes, or by the cycle collector.
        with pytest.warns(ResourceWarning, match="dropped without release"):  # noqa: PT031
            del stream
            gc.collect()
        await anyio.lowlevel.checkpoint()  # the hand-back runs on the scheduler's loop
        assert await in_flight(scheduler) == 0


async def test_a_cancelled_stream_releases_its_slot() -> None:
    """A task cancelled while reading a stream frees its slot."""
    async with MockProvider(
        Limits(rpm=100), completion_tokens=50, latency_per_token_s=0.05
    ) as server:
        client, scheduler = setup(server)

        async def read() -> None:
            stream = await client.chat.completions.create(  # type: ignore[attr-defined]
                model="kimi-k2", messages=MESSAGES, max_tokens=50, stream=True
            )
            async for _ in stream:
                pass

        with anyio.move_on_after(0.2):
            await read()
        assert await in_flight(scheduler) == 0


async def test_embeddings_and_responses_are_admitted_too() -> None:
    """embeddings.create and responses.create go through the scheduler."""
    async with MockProvider(Limits(rpm=100)) as server:
        client, scheduler = setup(server)
        await client.embeddings.create(model="emb", input=["a b c d", "e f"])  # type: ignore[attr-defined]
        await client.responses.create(model="kimi-k2", input="hi", max_output_tokens=8)  # type: ignore[attr-defined]
        assert (await scheduler.limiter().statistics()).dimension("rpm").used == 2
        assert client.models is not None  # type: ignore[attr-defined]


async def test_hundreds_of_tasks_get_no_429_from_a_strict_provider() -> None:
    """300 calls from 100 tasks against a provider enforcing 120 RPM exactly: no 429."""
    limits = Limits(concurrency=20, rpm=120, tpm=60_000)
    async with MockProvider(limits, speed=60, completion_tokens=8) as server:
        account = Account(
            "moonshot",
            tier="tier1",
            concurrency=20,
            rpm=120,
            tpm=60_000,
            period_scale=1 / 60,
            # HTTP on a busy loop delays arrivals unevenly, by up to hundreds of ms in
            # a burst: pace the requests, and count each admission a little longer.
            margin_s=0.1,
            pacing=True,
        )
        scheduler = Scheduler(account)
        client = ratekit.wrap(raw_client(server), scheduler)
        done = 0

        async def worker(calls: int) -> None:
            nonlocal done
            for _ in range(calls):
                await client.chat.completions.create(  # type: ignore[attr-defined]
                    model="kimi-k2", messages=MESSAGES, max_tokens=20
                )
                done += 1

        async with anyio.create_task_group() as group:
            for _ in range(100):
                group.start_soon(worker, 3)
        assert done == 300
        assert server.statistics().rejected == {}
        assert (await scheduler.statistics()).rate_limited == 0


# --- every HTTP request is one admission -------------------------------------------------


def sdk_client(server: MockProvider, **options: Any) -> openai.AsyncOpenAI:
    """A client with the SDK's own retries, as a new user builds one (max_retries=2)."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", **options)
    OPENED.append(client)
    return client


def requests_seen(server: MockProvider) -> int:
    stats = server.statistics()
    return stats.served + sum(stats.rejected.values())


async def test_sdk_retries_are_admissions_and_their_429s_reach_the_scheduler() -> None:
    """Two 429s then an answer: three requests at the provider, three admissions, and
    both 429s answered by the scheduler; the caller's client keeps its own retries."""
    async with MockProvider(Limits(rpm=100), completion_tokens=5) as server:
        raw = sdk_client(server)
        scheduler = Scheduler(Account("moonshot", tier="tier1", token_counting="usage"))
        client = ratekit.wrap(raw, scheduler)
        server.inject_429s(2, retry_after_s=0.05)
        response = await client.chat.completions.create(
            model="kimi-k2", messages=MESSAGES, max_tokens=50
        )
        assert response.usage.total_tokens == 8
        stats = await scheduler.statistics()
        assert requests_seen(server) == stats.admitted == 3
        assert (stats.rate_limited, stats.cooldowns) == (2, 2)
        assert raw.max_retries == 2
        assert await in_flight(scheduler) == 0


async def test_a_429_pauses_the_account_for_its_retry_after() -> None:
    """The provider's Retry-After holds the retry back: the 429 reached the scheduler."""
    async with MockProvider(Limits(rpm=100)) as server:
        client, scheduler = setup(server)
        server.inject_429s(1, retry_after_s=0.3)
        started = anyio.current_time()
        await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2", messages=MESSAGES, max_tokens=10
        )
        assert anyio.current_time() - started >= 0.25
        stats = await scheduler.statistics()
        assert (stats.admitted, stats.rate_limited, stats.cooldowns) == (2, 1, 1)


async def test_429s_beyond_the_schedulers_attempts_are_raised() -> None:
    """max_attempts tries, each an admission and a request; then the last 429 is raised."""
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = Scheduler(Account("moonshot", tier="tier1"), max_attempts=3)
        client = ratekit.wrap(sdk_client(server), scheduler)
        server.inject_429s(None, retry_after_s=0.01)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="kimi-k2", messages=MESSAGES)
        stats = await scheduler.statistics()
        assert requests_seen(server) == stats.admitted == stats.rate_limited == 3
        assert await in_flight(scheduler) == 0


async def test_ratekit_timeout_bounds_the_waits_of_all_tries() -> None:
    """A 429 asking for 5 s leaves a call with ratekit_timeout=1 no time for another try:
    AcquireTimeout at once, not a 5 s wait."""
    async with MockProvider(Limits(rpm=100)) as server:
        client, scheduler = setup(server)
        server.inject_429s(1, retry_after_s=5.0)
        started = anyio.current_time()
        with pytest.raises(ratekit.AcquireTimeout):
            await client.chat.completions.create(  # type: ignore[attr-defined]
                model="kimi-k2", messages=MESSAGES, max_tokens=5, ratekit_timeout=1
            )
        assert anyio.current_time() - started < 1
        stats = await scheduler.statistics()
        assert (stats.admitted, stats.rate_limited, requests_seen(server)) == (1, 1, 1)


async def test_a_stream_refused_when_opened_is_retried_as_a_new_admission() -> None:
    """The 429 that refuses a stream comes at opening: retried, one admission per try."""
    async with MockProvider(Limits(rpm=100), completion_tokens=3) as server:
        client, scheduler = setup(server)
        server.inject_429s(1, retry_after_s=0.05)
        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="kimi-k2", messages=MESSAGES, max_tokens=10, stream=True
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
        assert chunks
        stats = await scheduler.statistics()
        assert requests_seen(server) == stats.admitted == 2
        assert stats.rate_limited == 1
        assert await in_flight(scheduler) == 0


class FailingFirst(openai_httpx.AsyncBaseTransport):
    """Answers the first `failures` requests with `status` (never sent on), then forwards
    to the real provider; counts what it was asked to send."""

    def __init__(self, failures: int, status: int = 500, retry_after_ms: str = "10") -> None:
        self.failures = failures
        self.status = status
        self.retry_after_ms = retry_after_ms
        self.sent = 0
        self.inner = openai_httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: Any) -> Any:
        self.sent += 1
        if self.failures:
            self.failures -= 1
            body = {"error": {"message": "boom", "type": "server_error", "code": None}}
            headers = {"retry-after-ms": self.retry_after_ms}
            return openai_httpx.Response(self.status, json=body, headers=headers)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def failing_client(server: MockProvider, transport: FailingFirst, retries: int) -> Any:
    http = openai_httpx.AsyncClient(transport=transport)
    raw = openai.AsyncOpenAI(
        base_url=server.base_url, api_key="test", max_retries=retries, http_client=http
    )
    OPENED.append(raw)
    return raw


@pytest.mark.parametrize("status", [500, 503, 408, 409])
async def test_what_the_sdk_retries_ratekit_retries_each_try_admitted(status: int) -> None:
    """5xx, 408 and 409 are retried up to the client's max_retries, each an admission."""
    async with MockProvider(Limits(rpm=100)) as server:
        transport = FailingFirst(2, status)
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        client = ratekit.wrap(failing_client(server, transport, retries=2), scheduler)
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES)
        stats = await scheduler.statistics()
        assert transport.sent == stats.admitted == 3
        assert stats.rate_limited == 0

        transport.failures = 3
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="kimi-k2", messages=MESSAGES)
        assert transport.sent == (await scheduler.statistics()).admitted == 6
        assert await in_flight(scheduler) == 0


async def test_what_the_sdk_does_not_retry_is_tried_once() -> None:
    """A 400, or a 5xx answered with x-should-retry: false, is one try."""
    async with MockProvider(Limits(rpm=100)) as server:
        transport = FailingFirst(1, 400)
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        client = ratekit.wrap(failing_client(server, transport, retries=2), scheduler)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="kimi-k2", messages=MESSAGES)
        assert transport.sent == (await scheduler.statistics()).admitted == 1


async def test_connection_errors_are_retried_up_to_max_retries_with_backoff() -> None:
    """A provider that cannot be reached: 1 + max_retries tries, each admitted, the SDK's
    backoff between them (0.5 s less up to 25 %)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    raw = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="t", max_retries=1)
    OPENED.append(raw)
    scheduler = Scheduler(Account("moonshot", tier="tier1"))
    client = ratekit.wrap(raw, scheduler)
    started = anyio.current_time()
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES)
    assert anyio.current_time() - started >= 0.37
    assert (await scheduler.statistics()).admitted == 2
    assert await in_flight(scheduler) == 0


async def test_with_options_returns_a_wrapped_client() -> None:
    """A copy made with with_options() is admitted too, with the copy's max_retries."""
    async with MockProvider(Limits(rpm=100)) as server:
        client, scheduler = setup(server)
        copied = client.with_options(max_retries=1, timeout=30)  # type: ignore[attr-defined]
        assert repr(copied).startswith("ratekit.wrap(")
        server.inject_429s(1, retry_after_s=0.01)
        await copied.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=5)
        assert requests_seen(server) == (await scheduler.statistics()).admitted == 2


# --- money ---------------------------------------------------------------------------------


def priced_scheduler(**overrides: Any) -> Scheduler:
    # INF's inf-chat-v1: 10 per million input and output tokens.
    account = Account("infly", tier="tier1", token_counting="usage", **overrides)
    return Scheduler(account)


async def test_money_is_reserved_at_the_prices_and_settled_from_the_usage() -> None:
    """A priced model reserves the most it may cost and settles the real cost."""
    budget = Rate(1.0, 86_400, "money", name="money/day")
    async with MockProvider(Limits(rpm=100), completion_tokens=5) as server:
        scheduler = priced_scheduler(rates=(budget,))
        client = ratekit.wrap(raw_client(server), scheduler)

        async def money_used() -> float:
            return (await scheduler.limiter().statistics()).dimension("money/day").used

        response = await client.chat.completions.create(
            model="inf-chat-v1", messages=MESSAGES, max_tokens=50
        )
        assert response.usage.total_tokens == 8  # 3 prompt + 5 output
        assert await money_used() == pytest.approx(8 * 10 / 1_000_000)

        # While a call is in flight its estimate (prompt estimate + 50 output) is held.
        stream = await client.chat.completions.create(
            model="inf-chat-v1", messages=MESSAGES, max_tokens=50, stream=True
        )
        assert await money_used() >= (8 + 3 + 50) * 10 / 1_000_000
        async with stream:
            chunks = [chunk async for chunk in stream]
        assert all(chunk.choices for chunk in chunks)  # the usage chunk read, not shown
        assert await money_used() == pytest.approx(2 * 8 * 10 / 1_000_000)


async def test_a_money_budget_refuses_a_call_it_cannot_hold() -> None:
    """A call whose estimate exceeds the whole budget fails at once: cost reaches the limits."""
    budget = Rate(0.0001, 86_400, "money", name="money/day")  # 10 tokens' worth
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = priced_scheduler(rates=(budget,))
        client = ratekit.wrap(raw_client(server), scheduler)
        with pytest.raises(ratekit.CostExceedsLimitError, match="money/day"):
            await client.chat.completions.create(
                model="inf-chat-v1", messages=MESSAGES, max_tokens=500
            )
        assert server.statistics().served == 0
        # An unpriced model costs nothing: the budget does not hold it back.
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=500)
        assert (await scheduler.limiter().statistics()).dimension("money/day").used == 0


# --- the tokenizer loads off the loop ---------------------------------------------------------


class FakeEncoding:
    """Stands for a tiktoken.Encoding: one token per whitespace-separated word."""

    name = "fake_base"

    def encode_ordinary(self, text: str) -> list[int]:
        return [0] * len(text.split())


async def test_the_loop_stays_responsive_while_the_tokenizer_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tokenizer that takes seconds to load never blocks the loop: calls are estimated
    with the heuristic meanwhile, and the loop ticks throughout."""
    release = threading.Event()

    def slow_load(encoding: str) -> TiktokenEstimator:
        release.wait(10.0)
        return TiktokenEstimator(FakeEncoding())

    monkeypatch.setattr(tokens_module, "_load_tiktoken", slow_load)
    monkeypatch.setattr(tokens_module, "_background", {})
    async with MockProvider(Limits(rpm=1_000)) as server:
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        started = time.monotonic()
        client = ratekit.wrap(raw_client(server), scheduler)
        assert time.monotonic() - started < 0.5  # no waiting for the tokenizer here
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await anyio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async with anyio.create_task_group() as group:
            group.start_soon(ticker)
            for _ in range(5):
                await client.chat.completions.create(
                    model="kimi-k2", messages=MESSAGES, max_tokens=5
                )
            await anyio.sleep(0.05)  # a few ticks, however fast the calls were
            group.cancel_scope.cancel()
        assert not release.is_set()  # all done while the tokenizer was still loading
        assert max(gaps) < 0.5  # never blocked (a blocking load stalls the loop for seconds)
        release.set()
        estimator = BackgroundEstimator(scheduler.account.profile)
        assert await anyio.to_thread.run_sync(estimator.wait_loaded, 5.0)
        assert estimator.count("one two three") == 3  # tiktoken's count from now on


# --- usage and its price ---------------------------------------------------------------------


async def test_usage_is_read_from_every_answer_shape() -> None:
    """Chat, responses, embeddings, a stream's last event and Moonshot's own cache field."""
    chat = {
        "usage": {
            "prompt_tokens": 1_000,
            "completion_tokens": 100,
            "total_tokens": 1_100,
            "prompt_tokens_details": {"cached_tokens": 800},
        }
    }
    assert read_usage(chat) == Usage(1_100, 1_000, 100, 800)
    responses = {
        "response": {
            "usage": {
                "input_tokens": 30,
                "output_tokens": 5,
                "input_tokens_details": {"cached_tokens": 0},
            }
        }
    }
    assert read_usage(responses) == Usage(35, 30, 5, 0)
    assert read_usage({"usage": {"prompt_tokens": 4, "total_tokens": 4}}) == Usage(4, 4, 0, 0)
    moonshot = {"usage": {"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 50}}
    assert read_usage(moonshot) == Usage(12, 10, 2, 10)  # never more than the input
    assert read_usage({"usage": {"total_tokens": 9}}) == Usage(9)
    for nothing in ({}, {"usage": None}, {"usage": {"total_tokens": -1}}, None, "text"):
        assert read_usage(nothing) is None


async def test_cache_hits_settle_at_the_cached_price() -> None:
    """MiniMax-M2: cache misses at 2.1, hits at 0.21 and output at 8.4 per million."""
    scheduler = Scheduler(Account("minimax", tier="paid"))
    price = CallPrice(scheduler, "MiniMax-M2")
    estimate = price.estimate(1_000, 500)
    assert estimate == pytest.approx((1_000 * 2.1 + 500 * 8.4) / 1e6)
    assert price.estimate_total(1_500) == pytest.approx(1_500 * 8.4 / 1e6)
    assert CallPrice(scheduler, "no-such-model").estimate(1_000, 500) == 0
    admission = await scheduler.admit(tokens=1_500, cost=estimate, model="MiniMax-M2")
    try:
        price.settle(admission, Usage(1_100, 1_000, 100, 800))
        assert admission.usage.tokens == 1_100
        assert admission.usage.cost == pytest.approx((200 * 2.1 + 800 * 0.21 + 100 * 8.4) / 1e6)
    finally:
        await scheduler.finish(admission, None, model="MiniMax-M2")


async def test_cache_writes_settle_at_the_cache_write_price() -> None:
    """An Anthropic-style usage (input outside the cache, cache writes, cache reads):
    MiniMax-M2 bills writes at 2.625 per million, hits at 0.21, the rest at 2.1."""
    scheduler = Scheduler(Account("minimax", tier="paid"))
    price = CallPrice(scheduler, "MiniMax-M2")
    usage = read_usage(
        {
            "usage": {
                "input_tokens": 100,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 600,
                "output_tokens": 50,
            }
        }
    )
    assert usage == Usage(1_050, 1_000, 50, 600, 300)
    admission = await scheduler.admit(tokens=1_500, cost=1.0, model="MiniMax-M2")
    try:
        price.settle(admission, usage)
        assert admission.usage.tokens == 1_050
        expected = (100 * 2.1 + 300 * 2.625 + 600 * 0.21 + 50 * 8.4) / 1e6
        assert admission.usage.cost == pytest.approx(expected)
    finally:
        await scheduler.finish(admission, None, model="MiniMax-M2")


# --- arguments ---------------------------------------------------------------------------


async def test_bad_arguments_are_named_where_they_are_given() -> None:
    """wrap's own arguments fail at wrap; a call's ratekit_* options fail at that call,
    naming the option, and leave the next call unharmed."""
    async with MockProvider(Limits(rpm=100)) as server:
        raw = raw_client(server)
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        with pytest.raises(ratekit.RatekitError, match=r"scheduler must be a ratekit\.Scheduler"):
            ratekit.wrap(raw, "moonshot")  # type: ignore[arg-type]
        with pytest.raises(ratekit.RatekitError, match="wrap: priority: priority must be"):
            ratekit.wrap(raw, scheduler, priority="high")  # type: ignore[arg-type]
        client = ratekit.wrap(raw, scheduler)
        with pytest.raises(ratekit.RatekitError, match="ratekit_timeout: timeout must be"):
            await client.chat.completions.create(
                model="kimi-k2", messages=MESSAGES, ratekit_timeout="5"
            )
        with pytest.raises(ratekit.RatekitError, match="ratekit_tokens must be"):
            await client.chat.completions.create(
                model="kimi-k2", messages=MESSAGES, ratekit_tokens=-1
            )
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=5)
        assert (await scheduler.statistics()).admitted == 1


async def test_a_task_spawned_during_a_request_sends_its_own_requests_unadmitted() -> None:
    """A request hook of the caller's own spawns a task while a wrapped call is sent; the
    task inherits the call's context, and its later unwrapped requests are not admitted
    as part of that call (which is over): nothing is left in flight."""
    async with MockProvider(Limits(rpm=100)) as server:
        raw = openai.AsyncOpenAI(base_url=server.base_url, api_key="x")
        spawned: list[asyncio.Task[object]] = []

        async def later() -> object:
            await asyncio.sleep(0.05)
            return await raw.models.list()

        async def spawn(request: object) -> None:
            spawned.append(asyncio.get_running_loop().create_task(later()))

        raw._client.event_hooks["request"].append(spawn)
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        client = ratekit.wrap(raw, scheduler)
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=5)
        await asyncio.gather(*spawned)
        stats = await scheduler.statistics()
        assert stats.admitted == 1
        assert await in_flight(scheduler) == 0
        await raw.close()


async def test_hooks_replaced_after_wrap_are_put_back() -> None:
    """A caller who replaces the HTTP client's hooks after `wrap` still gets every call
    admitted as it is sent (the hook is checked at each call), not after its answer."""
    async with MockProvider(Limits(rpm=100)) as server:
        raw = openai.AsyncOpenAI(base_url=server.base_url, api_key="x")
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        client = ratekit.wrap(raw, scheduler)
        raw._client.event_hooks = {"request": [], "response": []}
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=5)
        hooks = raw._client.event_hooks["request"]
        assert len(hooks) == 1
        assert (await scheduler.statistics()).admitted == 1
        await raw.close()


# --- tenants -----------------------------------------------------------------------------


async def test_ratekit_tenant_names_the_tenant_of_one_call() -> None:
    """``ratekit_tenant=`` admits the call as that tenant (its own limits apply) and is not
    sent; without it, the tenant of the ``ratekit.tenant`` block around the call."""
    async with MockProvider(Limits(rpm=100)) as server:
        events: list[ratekit.Event] = []
        tenants = ratekit.Tenants(named={"capped": ratekit.Tenant(Limits(rpm=1))})
        account = Account("moonshot", tier="tier1")
        scheduler = Scheduler(account, tenants=tenants, hooks=[events.append])
        client = ratekit.wrap(raw_client(server), scheduler)
        create = client.chat.completions.create
        await create(model="kimi-k2", messages=MESSAGES, max_tokens=5, ratekit_tenant="capped")
        with pytest.raises(ratekit.AcquireTimeout, match="tenant rpm"):
            await create(
                model="kimi-k2",
                messages=MESSAGES,
                max_tokens=5,
                ratekit_tenant="capped",
                ratekit_timeout=5,
            )
        with ratekit.tenant("acme"):
            await create(model="kimi-k2", messages=MESSAGES, max_tokens=5)
            await create(model="kimi-k2", messages=MESSAGES, max_tokens=5, ratekit_tenant="gold")
        await create(model="kimi-k2", messages=MESSAGES, max_tokens=5)
        with pytest.raises(ratekit.InvalidArgumentError, match="ratekit_tenant: a tenant is"):
            await create(model="kimi-k2", messages=MESSAGES, ratekit_tenant=3)
        admitted = [e.tenant for e in events if isinstance(e, ratekit.events.Admitted)]
        assert admitted == ["capped", "acme", "gold", None]
        assert server.statistics().served == 4
