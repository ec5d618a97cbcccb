"""RateLimitedTransport: a plain httpx.AsyncClient over HTTP to the strict local provider."""

from __future__ import annotations

import gc
import math
import socket
import warnings
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

import ratekit
from ratekit import (
    Account,
    AcquireTimeout,
    CostExceedsLimitError,
    InvalidArgumentError,
    Limits,
    Rate,
    RatekitError,
    Scheduler,
    Tenant,
    Tenants,
)
from ratekit._calibration import PRIOR_FACTOR
from ratekit._tokens import default_estimator, estimate_request_tokens
from ratekit.integrations._httpx import RateLimitedTransport, usage_tokens
from ratekit.testing.mock_provider import MockProvider

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello world!"}]  # 3 prompt tokens at the provider


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the mock provider runs on asyncio


def scheduler_for(**overrides: Any) -> Scheduler:
    # Count usage the way the settle reports it, so the tests can read it back exactly.
    return Scheduler(Account("moonshot", tier="tier1", token_counting="usage", **overrides))


def client_for(base_url: str, scheduler: Scheduler, **options: Any) -> httpx.AsyncClient:
    transport = RateLimitedTransport(scheduler, **options)
    return httpx.AsyncClient(base_url=base_url, transport=transport)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "kimi-k2", "messages": MESSAGES, "max_tokens": 50, **extra}


async def used(scheduler: Scheduler, dimension: str) -> float:
    return (await scheduler.limiter().statistics()).dimension(dimension).used


async def test_a_chat_call_is_admitted_and_settled_with_its_true_usage() -> None:
    """A chat POST reserves prompt + max_tokens, then settles the body's usage.total_tokens."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=5) as server:
        scheduler = scheduler_for()
        async with client_for(server.base_url, scheduler) as client:
            response = await client.post("/chat/completions", json=chat())
        assert response.status_code == 200
        assert response.json()["usage"]["total_tokens"] == 8
        assert await used(scheduler, "tpm") == 8
        assert await used(scheduler, "rpm") == 1
        assert await used(scheduler, "concurrency") == 0
        assert (await scheduler.statistics()).admitted == 1


async def test_embeddings_and_responses_settle_with_their_usage() -> None:
    """/embeddings settles total_tokens; /responses settles input + output tokens."""
    async with MockProvider(Limits(rpm=100), completion_tokens=4) as server:
        scheduler = scheduler_for()
        async with client_for(server.base_url, scheduler) as client:
            embedded = await client.post("/embeddings", json={"model": "e", "input": "a b c d"})
            answered = await client.post(
                "/responses", json={"model": "kimi-k2", "input": "hi", "max_output_tokens": 8}
            )
        expected = usage_tokens(embedded.json()) + usage_tokens(answered.json())  # type: ignore[operator]
        assert await used(scheduler, "tpm") == expected
        assert await used(scheduler, "rpm") == 2


async def test_a_stream_holds_its_slot_until_read_to_its_end_and_settles() -> None:
    """A streamed chat call keeps its slot while open and settles from its usage event."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=4) as server:
        scheduler = scheduler_for()
        body = chat(stream=True, stream_options={"include_usage": True})
        async with (
            client_for(server.base_url, scheduler) as client,
            client.stream("POST", "/chat/completions", json=body) as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            assert await used(scheduler, "concurrency") == 1
            lines = [line async for line in response.aiter_lines()]
            assert await used(scheduler, "concurrency") == 0
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        assert await used(scheduler, "tpm") == 7  # 3 prompt + 4 output, not 53 reserved


async def test_a_stream_closed_early_gives_its_slot_back() -> None:
    """Leaving the stream's block before its end releases the slot at once."""
    async with MockProvider(Limits(rpm=100), completion_tokens=50) as server:
        scheduler = scheduler_for()
        async with client_for(server.base_url, scheduler) as client:
            async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as r:
                async for _ in r.aiter_bytes():
                    break
                assert await used(scheduler, "concurrency") == 1
            assert await used(scheduler, "concurrency") == 0
            # No usage seen: the reservation (prompt, scaled safe before any answer came
            # back, + 50 max output) stands.
            estimator = default_estimator(scheduler.account.profile)
            prompt, output = estimate_request_tokens("chat.completions.create", chat(), estimator)
            assert output == 50
            reserved = scheduler.estimates.reserve("kimi-k2", prompt)
            assert reserved == math.ceil((prompt + 8) * PRIOR_FACTOR - 8)
            assert await used(scheduler, "tpm") == reserved + output


async def test_a_429_is_answered_and_returned_unchanged() -> None:
    """A provider 429 pauses the account and reaches the caller as the provider sent it."""
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = scheduler_for()
        server.inject_429s(1, retry_after_s=0.2)
        async with client_for(server.base_url, scheduler) as client:
            response = await client.post("/chat/completions", json=chat())
            assert response.status_code == 429
            assert response.headers["retry-after-ms"] == "200"
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            stats = await scheduler.statistics()
            assert (stats.rate_limited, stats.cooldowns) == (1, 1)
            assert await used(scheduler, "concurrency") == 0
            # The cooldown holds the next call back for the provider's wait.
            started = anyio.current_time()
            assert (await client.post("/chat/completions", json=chat())).status_code == 200
            assert anyio.current_time() - started >= 0.15


async def test_a_streamed_call_refused_with_429_is_answered_too() -> None:
    """A stream refused when opened is a JSON 429: answered, released, returned."""
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = scheduler_for()
        server.inject_429s(1, retry_after_s=0.05)
        async with client_for(server.base_url, scheduler) as client:
            response = await client.post("/chat/completions", json=chat(stream=True))
        assert response.status_code == 429
        assert (await scheduler.statistics()).rate_limited == 1
        assert await used(scheduler, "concurrency") == 0


async def test_other_requests_pass_through_unadmitted() -> None:
    """GET /v1/models and non-JSON posts are sent as they are, outside the limits."""
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = scheduler_for()
        async with client_for(server.base_url, scheduler) as client:
            models = await client.get("/models")
            odd = await client.post("/chat/completions", content=b"not json")
        assert models.status_code == 200
        assert models.json()["object"] == "list"
        assert odd.status_code == 400
        assert (await scheduler.statistics()).admitted == 0
        assert await used(scheduler, "rpm") == 0


async def test_per_request_extensions_override_the_estimate() -> None:
    """extensions={"ratekit_tokens": n} reserves exactly n, not sent to the provider."""
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = Scheduler(Account("moonshot", tier="tier1"))  # reserve counting
        async with client_for(server.base_url, scheduler) as client:
            await client.post("/embeddings", json={"model": "e", "input": "x"})
            reserved = await used(scheduler, "tpm")
            await client.post(
                "/embeddings",
                json={"model": "e", "input": "x"},
                extensions={"ratekit_tokens": 1_000},
            )
        assert await used(scheduler, "tpm") == reserved + 1_000


async def test_a_call_that_never_connects_hands_its_reservation_back() -> None:
    """An httpx.ConnectError is raised and the request counts nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scheduler = scheduler_for()
    async with client_for(f"http://127.0.0.1:{port}/v1", scheduler) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/chat/completions", json=chat())
    assert await used(scheduler, "rpm") == 0
    assert await used(scheduler, "concurrency") == 0


async def test_hundreds_of_concurrent_calls_get_no_429_from_a_strict_provider() -> None:
    """300 calls from 100 tasks, half of them streamed, against 120 RPM enforced exactly."""
    limits = Limits(concurrency=20, rpm=120, tpm=60_000)
    async with MockProvider(limits, speed=60, completion_tokens=8) as server:
        account = Account(
            "moonshot",
            tier="tier1",
            concurrency=20,
            rpm=120,
            tpm=60_000,
            period_scale=1 / 60,
            # Client and provider share one loop: a burst of 120 admissions reaches the
            # provider over tens of ms, unevenly (more on a loaded machine): count each
            # admission that much longer, as a client across a network would, and pace.
            margin_s=0.1,
            pacing=True,
        )
        scheduler = Scheduler(account)
        done = 0
        limits_http = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        transport = RateLimitedTransport(scheduler, httpx.AsyncHTTPTransport(limits=limits_http))

        async def worker(client: httpx.AsyncClient, calls: int, stream: bool) -> None:
            nonlocal done
            for _ in range(calls):
                if stream:
                    async with client.stream(
                        "POST", "/chat/completions", json=chat(max_tokens=20, stream=True)
                    ) as response:
                        await response.aread()
                else:
                    response = await client.post("/chat/completions", json=chat(max_tokens=20))
                done += response.status_code == 200

        async with (
            httpx.AsyncClient(base_url=server.base_url, transport=transport) as client,
            anyio.create_task_group() as group,
        ):
            for index in range(100):
                group.start_soon(worker, client, 3, index % 2 == 0)
        assert server.statistics().rejected == {}
        assert (await scheduler.statistics()).rate_limited == 0
        assert done == 300


async def test_every_request_sent_is_one_admission() -> None:
    """Requests sent again after 429s are admissions of their own, each 429 answered."""
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = scheduler_for()
        server.inject_429s(2, retry_after_s=0.02)
        async with client_for(server.base_url, scheduler) as client:
            statuses = [(await client.post("/chat/completions", json=chat())).status_code]
            while statuses[-1] == 429:
                statuses.append((await client.post("/chat/completions", json=chat())).status_code)
        provider = server.statistics()
        stats = await scheduler.statistics()
        assert statuses == [429, 429, 200]
        assert provider.served + sum(provider.rejected.values()) == stats.admitted == 3
        assert (stats.rate_limited, stats.cooldowns) == (2, 2)
        assert await used(scheduler, "concurrency") == 0


async def test_a_stream_dropped_unclosed_gives_its_slot_back_on_the_loop() -> None:
    """A response dropped before its end, never closed, frees its slot on the event loop
    (its byte iterator is closed there, or its admission's finalizer hands it back):
    nothing is released from the garbage collector."""
    async with MockProvider(Limits(rpm=100), completion_tokens=50) as server:
        scheduler = scheduler_for()
        async with client_for(server.base_url, scheduler) as client:
            request = client.build_request("POST", "/chat/completions", json=chat(stream=True))
            response = await client.send(request, stream=True)
            async for _ in response.aiter_bytes():
                break
            assert await used(scheduler, "concurrency") == 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                del response
                gc.collect()
            with anyio.fail_after(2):
                while await used(scheduler, "concurrency") != 0:
                    await anyio.lowlevel.checkpoint()


async def test_money_is_reserved_and_settled_at_the_profiles_prices() -> None:
    """A priced model reserves its most cost and settles the real cost from the usage."""
    budget = Rate(0.01, 86_400, "money", name="money/day")  # 1,000 tokens' worth
    async with MockProvider(Limits(rpm=100), completion_tokens=5) as server:
        # INF's inf-chat-v1: 10 per million input and output tokens.
        account = Account("infly", tier="tier1", token_counting="usage", rates=(budget,))
        scheduler = Scheduler(account)
        body = {"model": "inf-chat-v1", "messages": MESSAGES, "max_tokens": 50}
        async with client_for(server.base_url, scheduler) as client:
            answer = await client.post("/chat/completions", json=body)
            assert answer.json()["usage"]["total_tokens"] == 8
            assert await used(scheduler, "money/day") == pytest.approx(8 * 10 / 1_000_000)
            streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/chat/completions", json=streamed) as response:
                # In flight: the estimate (prompt + 50 output) is held.
                assert await used(scheduler, "money/day") >= (8 + 3 + 50) * 10 / 1_000_000
                await response.aread()
            assert await used(scheduler, "money/day") == pytest.approx(16 * 10 / 1_000_000)
            with pytest.raises(CostExceedsLimitError, match="money/day"):
                await client.post("/chat/completions", json={**body, "max_tokens": 2_000})


async def test_bad_arguments_are_named_where_they_are_given() -> None:
    """The transport's own arguments fail at construction; a request's extensions at that
    request, naming the extension, with nothing admitted."""
    scheduler = scheduler_for()
    with pytest.raises(RatekitError, match="RateLimitedTransport: priority must be"):
        RateLimitedTransport(scheduler, priority="high")  # type: ignore[arg-type]
    with pytest.raises(RatekitError, match="RateLimitedTransport: timeout must be"):
        RateLimitedTransport(scheduler, timeout=-1)
    with pytest.raises(RatekitError, match=r"scheduler must be a ratekit\.Scheduler"):
        RateLimitedTransport("moonshot")  # type: ignore[arg-type]
    async with MockProvider(Limits(rpm=100)) as server:
        async with client_for(server.base_url, scheduler) as client:
            with pytest.raises(RatekitError, match="ratekit_tokens'\\] must be"):
                await client.post(
                    "/chat/completions", json=chat(), extensions={"ratekit_tokens": "many"}
                )
            assert (await client.post("/chat/completions", json=chat())).status_code == 200
        assert (await scheduler.statistics()).admitted == 1


async def test_the_transport_names_each_requests_tenant() -> None:
    """``tenant=`` is a name, or a function of the request (say, of a header): the request
    is admitted as that tenant, its own limits included; when the function gives None,
    the tenant of the ``ratekit.tenant`` block the request is sent in."""
    events: list[ratekit.Event] = []
    tenants = Tenants(named={"capped": Tenant(Limits(rpm=1))})
    account = Account("moonshot", tier="tier1")
    scheduler = Scheduler(account, tenants=tenants, hooks=[events.append])

    def customer(request: httpx.Request) -> str | None:
        return request.headers.get("x-customer")

    async with MockProvider(Limits(rpm=100)) as server:
        async with client_for(server.base_url, scheduler, tenant=customer, timeout=5) as client:
            headers = {"x-customer": "capped"}
            await client.post("/chat/completions", json=chat(), headers=headers)
            with pytest.raises(AcquireTimeout, match="tenant rpm"):
                await client.post("/chat/completions", json=chat(), headers=headers)
            with ratekit.tenant("block"):
                await client.post("/chat/completions", json=chat())
            await client.post("/chat/completions", json=chat())
            with pytest.raises(InvalidArgumentError, match="RateLimitedTransport: tenant: a"):
                await client.post("/chat/completions", json=chat(), headers={"x-customer": ""})
        async with client_for(server.base_url, scheduler, tenant="nightly") as client:
            with ratekit.tenant("block"):
                await client.post("/chat/completions", json=chat())
    admitted = [event.tenant for event in events if isinstance(event, ratekit.events.Admitted)]
    assert admitted == ["capped", "block", None, "nightly"]
    for bad in ("", 3):
        with pytest.raises(InvalidArgumentError, match="RateLimitedTransport: tenant: a tenant"):
            RateLimitedTransport(scheduler, tenant=bad)  # type: ignore[arg-type]


async def test_a_mock_transports_answer_is_settled_and_kept_without_its_admission() -> None:
    """Over a transport that answers read whole and traces nothing (httpx's own mock, an
    in-process app), the call is settled from the answer, which is returned as it is;
    and once it has answered, the request (kept by its response) lets go of the
    admission, and so of the scheduler's limiter, though no trace said the body was
    written."""

    def answer(request: httpx.Request) -> httpx.Response:
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        return httpx.Response(200, json={"choices": [], "usage": usage})

    scheduler = scheduler_for()
    transport = RateLimitedTransport(scheduler, transport=httpx.MockTransport(answer))
    async with httpx.AsyncClient(base_url="http://provider", transport=transport) as client:
        response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.json()["usage"]["total_tokens"] == 8  # read whole by the mock: as given
    assert await used(scheduler, "tpm") == 8  # and settled from it
    trace = response.request.extensions["trace"]
    cells = dict(zip(trace.__code__.co_freevars, trace.__closure__, strict=True))
    assert cells["held"].cell_contents is None
    assert await used(scheduler, "concurrency") == 0
