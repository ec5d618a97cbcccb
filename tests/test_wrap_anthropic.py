"""A wrapped anthropic client, over HTTP to the strict local provider's Messages API."""

from __future__ import annotations

import dataclasses
import gc
import threading
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import anyio
import anyio.lowlevel
import pytest

import ratekit
from ratekit import Account, Limits, Scheduler, load_profile
from ratekit.integrations._counts import TokenCounts, counted_fields
from ratekit.integrations._usage import CallPrice, Usage, message_event_usage
from ratekit.testing.mock_provider import MockProvider

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello world!"}]  # 3 input tokens at the provider


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


OPENED: list[anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close every client a test opened while its loop still runs."""
    yield
    while OPENED:
        await OPENED.pop().close()


def sdk_client(server: MockProvider, **options: Any) -> anthropic.AsyncAnthropic:
    """A client as a new user builds one (the SDK's own retries, 2 by default)."""
    client = anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key="test", **options)
    OPENED.append(client)
    return client


def setup(server: MockProvider, **overrides: object) -> tuple[Any, Scheduler]:
    # Count usage the way the settle reports it, so the tests can read it back exactly.
    account = Account("moonshot", tier="tier1", token_counting="usage", **overrides)
    scheduler = Scheduler(account)
    return ratekit.wrap(sdk_client(server), scheduler), scheduler


async def used(scheduler: Scheduler, dimension: str) -> float:
    return (await scheduler.limiter().statistics()).dimension(dimension).used


def requests_seen(server: MockProvider) -> int:
    stats = server.statistics()
    return stats.served + sum(stats.rejected.values()) + stats.overloaded


async def test_a_plain_message_is_admitted_and_settled_with_its_usage() -> None:
    """messages.create reserves prompt + max_tokens and settles input + output."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=5) as server:
        client, scheduler = setup(server)
        message = await client.messages.create(model="kimi-k2", max_tokens=50, messages=MESSAGES)
        assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 5)
        assert await used(scheduler, "tpm") == 8
        assert await used(scheduler, "rpm") == 1
        assert await used(scheduler, "concurrency") == 0


async def test_a_stream_holds_its_slot_until_it_ends_and_settles_from_its_events() -> None:
    """stream=True: the slot is held while the events are read, and the settle takes the
    prompt from message_start and the output from message_delta."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=4) as server:
        client, scheduler = setup(server)
        stream = await client.messages.create(
            model="kimi-k2", max_tokens=50, messages=MESSAGES, stream=True
        )
        assert await used(scheduler, "concurrency") == 1
        kinds = [event.type async for event in stream]
        assert kinds[0] == "message_start"
        assert kinds[-1] == "message_stop"
        assert await used(scheduler, "concurrency") == 0
        assert await used(scheduler, "tpm") == 7


async def test_the_stream_helper_holds_its_slot_for_its_block() -> None:
    """``async with client.messages.stream(...)``: one admission for the block, settled
    from the message the helper put together."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=6) as server:
        client, scheduler = setup(server)
        async with client.messages.stream(
            model="kimi-k2", max_tokens=50, messages=MESSAGES
        ) as stream:
            assert await used(scheduler, "concurrency") == 1
            text = "".join([chunk async for chunk in stream.text_stream])
            message = await stream.get_final_message()
        assert text
        assert message.usage.output_tokens == 6
        assert await used(scheduler, "concurrency") == 0
        assert await used(scheduler, "tpm") == 9
        assert (await scheduler.statistics()).admitted == 1


async def test_a_stream_broken_off_early_settles_and_releases() -> None:
    """A reader that stops early gives the slot back (closed, or dropped), and what the
    stream said so far is settled: the prompt, at least."""
    async with MockProvider(Limits(rpm=100), completion_tokens=40) as server:
        client, scheduler = setup(server)
        stream = await client.messages.create(
            model="kimi-k2", max_tokens=50, messages=MESSAGES, stream=True
        )
        async with stream:
            async for event in stream:
                if event.type == "content_block_delta":
                    break
        assert await used(scheduler, "concurrency") == 0
        # Settled from what was seen: the prompt and the first output count, not the
        # reservation of 3 + 50.
        assert await used(scheduler, "tpm") < 53

        stream = await client.messages.create(
            model="kimi-k2", max_tokens=50, messages=MESSAGES, stream=True
        )
        async for _ in stream:
            break
        with pytest.warns(ResourceWarning, match="dropped without release"):  # noqa: PT031
            del stream
            gc.collect()
        await anyio.lowlevel.checkpoint()  # the hand-back runs on the scheduler's loop
        assert await used(scheduler, "concurrency") == 0

        async with client.messages.stream(
            model="kimi-k2", max_tokens=50, messages=MESSAGES
        ) as helper:
            async for _ in helper:
                break
        assert await used(scheduler, "concurrency") == 0


async def test_count_tokens_passes_through_unadmitted() -> None:
    """messages.count_tokens is not a call against the limits."""
    async with MockProvider(Limits(rpm=100)) as server:
        client, scheduler = setup(server)
        counted = await client.messages.count_tokens(model="kimi-k2", messages=MESSAGES)
        assert counted.input_tokens == 3
        assert await used(scheduler, "rpm") == 0
        assert (await scheduler.statistics()).admitted == 0


CACHED = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "a long shared context " * 50},
            {"type": "text", "text": "first question", "cache_control": {"type": "ephemeral"}},
        ],
    }
]


@pytest.mark.parametrize("reads_count", [True, False])
async def test_cache_tokens_count_as_the_profile_says(reads_count: bool) -> None:
    """The prompt is input + cache writes + cache reads (the API reports the three apart);
    cache reads count toward the token rates unless the profile says they do not."""
    profile = dataclasses.replace(load_profile("moonshot"), cache_reads_count=reads_count)
    async with MockProvider(
        Limits(rpm=100, tpm=100_000), completion_tokens=5, count_cache_reads=reads_count
    ) as server:
        scheduler = Scheduler(Account(profile, tier="tier1", token_counting="usage"))
        client = ratekit.wrap(sdk_client(server), scheduler)
        first = await client.messages.create(model="kimi-k2", max_tokens=20, messages=CACHED)
        written = first.usage.cache_creation_input_tokens
        assert written > 100
        assert first.usage.cache_read_input_tokens == 0
        after_first = await used(scheduler, "tpm")
        assert after_first == first.usage.input_tokens + written + 5
        second = await client.messages.create(model="kimi-k2", max_tokens=20, messages=CACHED)
        read = second.usage.cache_read_input_tokens
        assert read == written
        counted = second.usage.input_tokens + 5 + (read if reads_count else 0)
        assert await used(scheduler, "tpm") == after_first + counted


async def test_429_and_529_are_answered_with_a_cooldown_and_retried() -> None:
    """A 429 and a 529 (overloaded), then an answer: three requests, three admissions,
    both refusals answered by the scheduler with a pause; the SDK's own retries stay off."""
    async with MockProvider(Limits(rpm=100), completion_tokens=5) as server:
        raw = sdk_client(server)
        scheduler = Scheduler(Account("moonshot", tier="tier1", token_counting="usage"))
        client = ratekit.wrap(raw, scheduler)
        server.inject_429s(1, retry_after_s=0.05)
        server.inject_529s(1, retry_after_s=0.05)
        message = await client.messages.create(model="kimi-k2", max_tokens=20, messages=MESSAGES)
        assert message.usage.output_tokens == 5
        stats = await scheduler.statistics()
        assert requests_seen(server) == stats.admitted == 3
        assert (stats.rate_limited, stats.cooldowns) == (2, 2)
        assert server.statistics().overloaded == 1
        assert raw.max_retries == 2
        assert await used(scheduler, "concurrency") == 0


async def test_529s_beyond_the_schedulers_attempts_are_raised() -> None:
    async with MockProvider(Limits(rpm=100)) as server:
        scheduler = Scheduler(Account("moonshot", tier="tier1"), max_attempts=2)
        client = ratekit.wrap(sdk_client(server), scheduler)
        server.inject_529s(None, retry_after_s=0.01)
        with pytest.raises(anthropic.APIStatusError) as raised:
            await client.messages.create(model="kimi-k2", max_tokens=20, messages=MESSAGES)
        assert raised.value.status_code == 529
        stats = await scheduler.statistics()
        assert requests_seen(server) == stats.admitted == stats.rate_limited == 2


async def test_the_providers_rate_limit_headers_lower_the_limits() -> None:
    """A provider whose anthropic-ratelimit-* headers report fewer requests per minute
    than the tier: after its first answer ratekit runs at the provider's number."""
    async with MockProvider(Limits(rpm=50, tpm=1_000_000)) as server:
        events: list[object] = []
        account = Account("moonshot", tier="tier1", token_counting="usage")
        scheduler = Scheduler(account, hooks=[events.append])
        client = ratekit.wrap(sdk_client(server), scheduler)
        tier_rpm = scheduler.account.limits().rpm
        assert tier_rpm is not None
        assert tier_rpm > 50
        await client.messages.create(model="kimi-k2", max_tokens=20, messages=MESSAGES)
        assert scheduler.limiter().limits.rpm == pytest.approx(50)
        adapted = [e for e in events if isinstance(e, ratekit.events.LimitsAdapted)]
        assert adapted
        assert "requests limit 50" in adapted[0].reason


async def test_hundreds_of_calls_from_many_tasks_get_no_429() -> None:
    """300 calls, plain and streamed, from 100 tasks against a provider enforcing
    concurrency 20, 120 RPM and 60,000 TPM exactly: no 429, every call served."""
    limits = Limits(concurrency=20, rpm=120, tpm=60_000)
    async with MockProvider(limits, speed=60, completion_tokens=8) as server:
        account = Account(
            "moonshot",
            tier="tier1",
            concurrency=20,
            rpm=120,
            tpm=60_000,
            period_scale=1 / 60,
            margin_s=0.1,
            pacing=True,
        )
        scheduler = Scheduler(account)
        client = ratekit.wrap(sdk_client(server), scheduler)
        done = 0

        async def worker(index: int) -> None:
            nonlocal done
            for call in range(3):
                if (index + call) % 2:
                    stream = await client.messages.create(
                        model="kimi-k2", max_tokens=20, messages=MESSAGES, stream=True
                    )
                    async for _ in stream:
                        pass
                else:
                    await client.messages.create(model="kimi-k2", max_tokens=20, messages=MESSAGES)
                done += 1

        async with anyio.create_task_group() as group:
            for index in range(100):
                group.start_soon(worker, index)
        assert done == 300
        served = server.statistics()
        assert served.rejected == {}
        assert served.served_by_endpoint == {"messages": 300}
        assert (await scheduler.statistics()).rate_limited == 0
        assert await used(scheduler, "concurrency") == 0


LONG = [{"role": "user", "content": "count me exactly, please " * 40}]


async def test_count_tokens_reserves_the_providers_own_count_and_keeps_it() -> None:
    """count_tokens=...: the prompt is counted by the provider (free, unadmitted) and
    reserved exactly; the same prompt again is not counted again; a failed count falls
    back to the estimate. What the counts cost is in their statistics."""
    async with MockProvider(
        Limits(rpm=100, tpm=100_000), completion_tokens=5, latency_s=0.3
    ) as server:
        counts = ratekit.TokenCounts()
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        client = ratekit.wrap(sdk_client(server), scheduler, count_tokens=counts)
        exact = await sdk_client(server).messages.count_tokens(model="kimi-k2", messages=LONG)
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: client.messages.create(model="kimi-k2", max_tokens=50, messages=LONG)
            )
            await anyio.sleep(0.15)  # admitted, not yet answered: its reservation shows
            assert await used(scheduler, "tpm") == exact.input_tokens + 50
        await client.messages.create(model="kimi-k2", max_tokens=50, messages=LONG)
        stats = counts.statistics()
        assert (stats.counted, stats.reused, stats.failed) == (1, 1, 0)
        assert stats.seconds > 0
        with pytest.raises(ratekit.InvalidArgumentError, match="count_tokens"):
            ratekit.wrap(sdk_client(server), scheduler, count_tokens="yes")  # type: ignore[arg-type]

    # The provider is gone: the count fails, the call still goes (and fails on its own).
    async with MockProvider(Limits(rpm=100)) as server:
        url = server.anthropic_base_url
    dead = anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0)
    OPENED.append(dead)
    client = ratekit.wrap(dead, Scheduler(Account("moonshot", tier="tier1")), count_tokens=counts)
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(model="kimi-k2", max_tokens=5, messages=MESSAGES)
    assert counts.statistics().failed == 1


# --- found in review --------------------------------------------------------------------


async def test_an_answers_own_content_blocks_can_be_sent_back() -> None:
    """The tool-use loop's ``messages.append({"role": "assistant", "content":
    response.content})``: the SDK's block objects are estimated like dicts, not refused."""
    async with MockProvider(Limits(rpm=100, tpm=100_000), completion_tokens=5) as server:
        client, scheduler = setup(server)
        first = await client.messages.create(model="kimi-k2", max_tokens=20, messages=MESSAGES)
        history = [
            *MESSAGES,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": "and then?"},
        ]
        second = await client.messages.create(model="kimi-k2", max_tokens=20, messages=history)
        assert second.usage.output_tokens == 5
        assert (await scheduler.statistics()).admitted == 2


async def test_beta_messages_and_a_wrapped_client_as_a_context_manager() -> None:
    """``beta.messages.create`` is admitted like ``messages.create``; ``async with`` on a
    wrapped client gives the wrapped client and closes it at the end."""
    async with MockProvider(Limits(rpm=100), completion_tokens=3) as server:
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        raw = anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key="test")
        async with ratekit.wrap(raw, scheduler) as client:
            await client.beta.messages.create(model="kimi-k2", max_tokens=5, messages=MESSAGES)
            assert repr(client).startswith("ratekit.wrap(")
        assert raw.is_closed()
        assert (await scheduler.statistics()).admitted == 1


async def test_a_stream_keeps_the_prompt_counts_a_delta_leaves_out() -> None:
    """A message_delta that repeats input_tokens but not the cache counts keeps them from
    message_start (the SDK's own accumulator does the same)."""
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 20,
                "cache_read_input_tokens": 50_000,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            }
        },
    }
    usage = message_event_usage(None, start)
    delta = {"type": "message_delta", "usage": {"input_tokens": 20, "output_tokens": 300}}
    usage = message_event_usage(usage, delta)
    assert usage == Usage(50_320, 50_020, 300, 50_000, 0)
    nulls = {"type": "message_delta", "usage": {"output_tokens": 320, "input_tokens": None}}
    assert message_event_usage(usage, nulls) == Usage(50_340, 50_020, 320, 50_000, 0)


async def test_the_count_key_covers_every_field_the_provider_counts() -> None:
    """Two requests that differ only in a field count_tokens takes (a structured-output
    schema) are counted apart."""
    count = anthropic.AsyncAnthropic(api_key="test").messages.count_tokens
    fields = counted_fields(count)
    assert "output_config" in fields
    assert "extra_headers" in fields
    one = {"model": "m", "messages": MESSAGES, "output_config": {"format": {"a": 1}}}
    other = {**one, "output_config": {"format": {"b": 2}}}
    assert TokenCounts.key(one, fields) != TokenCounts.key(other, fields)


async def test_counts_shared_by_threads_stay_whole() -> None:
    """One TokenCounts used from many threads at once (sync clients): no error, no count
    lost."""
    counts = TokenCounts(max_kept=8)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(2_000):
                key = f"k{(i + offset) % 16}"
                if counts.kept(key) is None:
                    counts.done(key, counts.started(), i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = counts.statistics()
    assert stats.counted + stats.reused == 8 * 2_000


async def test_a_cache_write_may_cost_more_than_the_input_price() -> None:
    """A request that marks a prefix for the cache reserves its prompt at the dearer of
    the input and cache-write prices (MiniMax-M2: 2.1 and 2.625 per million)."""
    scheduler = Scheduler(Account("minimax", tier="paid"))
    price = CallPrice(scheduler, "MiniMax-M2")
    plain = price.estimate(1_000, 100)
    writing = price.estimate(1_000, 100, writes_cache=True)
    assert plain == pytest.approx((1_000 * 2.1 + 100 * 8.4) / 1e6)
    assert writing == pytest.approx((1_000 * 2.625 + 100 * 8.4) / 1e6)


async def test_wrap_refuses_what_is_no_client_and_a_wrapped_client() -> None:
    """Anything without an LLM client's methods, and a client wrapped already (which
    would admit each call twice), are refused where wrap is called."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"))
    for thing in (None, "client", 42):
        with pytest.raises(ratekit.InvalidArgumentError, match="must be an LLM client"):
            ratekit.wrap(thing, scheduler)
    wrapped = ratekit.wrap(anthropic.AsyncAnthropic(api_key="test"), scheduler)
    with pytest.raises(ratekit.InvalidArgumentError, match="wrapped already"):
        ratekit.wrap(wrapped, scheduler)
