"""A wrapped openai client, over HTTP to the strict local provider."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import anyio
import openai
import pytest

import ratekit
from ratekit import Account, Limits, Scheduler
from ratekit.mock_provider import MockProvider

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
        del stream
        gc.collect()
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
