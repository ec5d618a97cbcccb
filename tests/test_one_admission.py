"""One admission, owned end to end (issue 9): each defect the issue lists, as a test.

Every test states one behaviour and runs on the memory backend and on a real
redis-server where both apply. Each is bounded in time, so that a regression
fails instead of hanging. Redis tests run on asyncio only (redis-py's client),
so this whole module does; the processes are a `Fleet` of the workload driver
(`ratekit.testing.workload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

import ratekit
from ratekit import Account, Limiter, Limits, MemoryBackend, Rate, RedisBackend, Scheduler
from ratekit.clock import FakeClock
from ratekit.testing import free_port
from ratekit.testing.mock_provider import MockProvider
from ratekit.testing.workload import Fleet, Workload

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello world!"}]  # 3 prompt tokens at the provider


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio only


# -- helpers ----------------------------------------------------------------------------


def _namespace(label: str) -> str:
    return f"one-admission-{label}-{uuid.uuid4().hex[:12]}"


BackendMaker = Callable[..., Any]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def new_backend(request: pytest.FixtureRequest) -> AsyncIterator[BackendMaker]:
    """Builds backends of one kind, each a fresh account; closes them afterwards.

    Keyword arguments are the Redis backend's (``lease_ttl_s=...``); memory ignores them.
    """
    url = None if request.param == "memory" else request.getfixturevalue("redis_server").url
    made: list[Any] = []

    def factory(**redis_options: Any) -> Any:
        if url is None:
            return MemoryBackend()
        backend = RedisBackend(url, namespace=_namespace("b"), **redis_options)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        with anyio.move_on_after(5, shield=True):
            await backend.aclose()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    return str(redis_server.url)


async def _concurrency_used(limiter: Limiter) -> float:
    return (await limiter.statistics()).dimension("concurrency").used


async def _until(condition: Callable[[], Awaitable[bool]], within_s: float) -> None:
    """Wait until `condition()` is true, polling; fails (never hangs) after `within_s` s."""
    with anyio.fail_after(within_s):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.01)


async def _outcomes(tasks: list[asyncio.Task[Any]], within_s: float) -> list[object]:
    """What each task ended with (its result, its exception, or "cancelled"), waiting at
    most `within_s` seconds; a task still running then is cancelled and reported as
    "still running". Nothing is cancelled by the wait itself (unlike ``gather``)."""
    if tasks:
        await asyncio.wait(tasks, timeout=within_s)
    outcomes: list[object] = []
    for task in tasks:
        if not task.done():
            task.cancel()
            outcomes.append("still running")
        elif task.cancelled():
            outcomes.append("cancelled")
        else:
            outcomes.append(task.exception() or task.result())
    return outcomes


async def _eventually_admitted(limiter: Limiter, within_s: float) -> None:
    """The next caller gets in within `within_s` seconds (fails, never hangs)."""
    with anyio.fail_after(within_s):
        async with limiter.acquire():
            pass


class Boom(Exception):
    """What a misbehaving hook or classifier raises in these tests."""


class TooManyRequests(Exception):
    """What a provider client raises on a 429, in these tests."""

    def __init__(self, retry_after_s: float | None = None) -> None:
        super().__init__("429")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Signal:
    retry_after_s: float | None
    retryable: bool = True
    message: str = "429"


def classify_429(error: BaseException) -> Signal | None:
    if isinstance(error, TooManyRequests):
        return Signal(error.retry_after_s)
    return None


def _openai_client(server: MockProvider, **options: Any) -> openai.AsyncOpenAI:
    """A real openai client of `server`; use it as ``async with`` so that it is closed."""
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="x", **options)


# -- a healthy Redis is never reported down ---------------------------------------------


async def _gather_submits(
    scheduler: Scheduler, callers: int, call_s: float, within_s: float
) -> Counter[str]:
    """`callers` submits started at once: how many returned "ok", and what the others
    raised (by type), or "still running" after `within_s` seconds."""

    async def call() -> str:
        await asyncio.sleep(call_s)
        return "ok"

    tasks = [asyncio.create_task(scheduler.submit(call)) for _ in range(callers)]
    outcomes = await _outcomes(tasks, within_s)
    return Counter(o if isinstance(o, str) else type(o).__name__ for o in outcomes)


@pytest.mark.redis
@pytest.mark.timeout(30)
async def test_300_gathered_submits_on_a_healthy_redis_all_succeed(redis_url: str) -> None:
    """300 submits gathered at once on Moonshot Tier3 through one Redis all succeed."""
    backend = RedisBackend(redis_url, namespace=_namespace("300"))
    scheduler = Scheduler(Account("moonshot", tier="tier3"), backend=backend)
    try:
        outcomes = await _gather_submits(scheduler, 300, 0.0, within_s=20)
    finally:
        await backend.aclose()
    assert outcomes == {"ok": 300}


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_a_herd_gathered_on_redis_is_admitted_in_the_order_it_came(
    redis_url: str,
) -> None:
    """2,000 callers gathered at once on a Redis account whose cap is held are admitted in
    the order they came once it frees, and priority 1 before priority 0. (Each caller
    used to try the backend before the queue formed: the replies of those tries,
    pipelined over several connections, came back out of order and so did the queue:
    768 of 1,000 out of order.)"""
    backend = RedisBackend(redis_url, namespace=_namespace("herd"))
    limiter = Limiter(Limits(concurrency=16, rpm=10**9), backend=backend, lower_share=0)
    granted: list[tuple[int, int]] = []

    async def caller(index: int, priority: int) -> None:
        async with limiter.acquire(priority=priority):
            granted.append((priority, index))

    try:
        held = [await limiter.acquire() for _ in range(16)]
        with anyio.fail_after(40):
            async with anyio.create_task_group() as group:
                for index in range(2000):
                    group.start_soon(caller, index, index % 2)

                async def all_wait() -> bool:
                    return (await limiter.statistics()).waiting == 2000

                await _until(all_wait, 20)
                for admission in held:
                    await admission.release()
    finally:
        await backend.aclose()
    assert len(granted) == 2000
    assert granted == sorted(granted, key=lambda grant: (-grant[0], grant[1]))


@pytest.mark.redis
@pytest.mark.timeout(90)
async def test_10000_gathered_callers_on_one_redis_all_succeed(redis_url: str) -> None:
    """10,000 callers gathered in one process on StepFun V5 (10,000 in flight) all succeed,
    within a minute."""
    backend = RedisBackend(redis_url, namespace=_namespace("10k"))
    scheduler = Scheduler(Account("stepfun", tier="V5"), backend=backend)
    started = time.monotonic()
    try:
        outcomes = await _gather_submits(scheduler, 10_000, 0.05, within_s=60)
    finally:
        await backend.aclose()
    assert outcomes == {"ok": 10_000}
    assert time.monotonic() - started < 60


@pytest.mark.redis
@pytest.mark.timeout(75)
async def test_four_processes_of_2500_callers_on_one_namespace_all_succeed(
    redis_url: str,
) -> None:
    """Four processes of 2,500 gathered callers each, on one StepFun V5 namespace, all
    succeed."""
    # Each caller a task of its own, submitting one 50 ms call.
    workload = Workload(
        through="submit",
        provider="stepfun",
        tier="V5",
        calls=10_000,
        tasks=10_000,
        call_s=0.05,
        timeout_s=45,
        redis_url=redis_url,
        namespace=_namespace("fleet"),
    )
    outcomes = await Fleet(workload, 4).run()
    assert [outcome.errors for outcome in outcomes] == [[]] * 4, [o.errors[:3] for o in outcomes]
    assert sum(outcome.results for outcome in outcomes) == 10_000


# -- cancellation on Redis: a cancelled acquire never admits ----------------------------


@pytest.mark.redis
@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["url", "user-client-with-a-large-pool"])
async def test_a_cancellation_storm_over_redis_admits_no_cancelled_caller(
    redis_url: str, client: str
) -> None:
    """A thousand acquires started at once over Redis, cancelled at random points: no false
    outage, no cancelled caller runs its body, and every counter returns to 0; with a
    URL, and with a client of the user's whose pool never runs short."""
    from redis.asyncio import Redis

    where: str | Redis = redis_url
    if client != "url":
        where = Redis.from_url(redis_url, max_connections=5_000)
    backend = RedisBackend(where, namespace=_namespace("storm"), lease_ttl_s=30)
    limits = Limits(
        concurrency=100, rpm=100_000, tpm=10_000_000, token_counting=ratekit.TokenCounting.USAGE
    )
    limiter = Limiter(limits, backend=backend)
    rng = random.Random(20260911)
    callers = 1_000
    cancel_asked = [False] * callers
    outcomes: Counter[str] = Counter()
    errors: list[str] = []

    async def caller(index: int) -> None:
        try:
            async with limiter.acquire(tokens=rng.randint(1, 400)) as permit:
                if cancel_asked[index]:
                    outcomes["ran after its cancel"] += 1
                outcomes["ran"] += 1
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                permit.settle(tokens=rng.randint(0, 400))
            outcomes["completed"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            raise
        except Exception as exc:  # every error is reported, none is expected
            errors.append(repr(exc))

    tasks: list[asyncio.Task[None]] = []

    def cancel(index: int) -> None:
        if not tasks[index].done():
            cancel_asked[index] = True
            tasks[index].cancel()

    try:
        with anyio.fail_after(45):
            tasks.extend(asyncio.create_task(caller(index)) for index in range(callers))
            for _ in range(3):
                # Cancelled as they start: their first round trip is in flight.
                await asyncio.sleep(0)
                for index in rng.sample(range(callers), k=60):
                    cancel(index)
            for _ in range(60):
                # Cancel a random handful: queued, at the head, or mid-call.
                for index in rng.sample(range(callers), k=rng.randint(0, 15)):
                    cancel(index)
                await asyncio.sleep(rng.uniform(0.0, 0.02))
            left = Counter(str(o) for o in await _outcomes(tasks, 20) if isinstance(o, str))
            stats = await limiter.statistics()
    finally:
        await _outcomes(tasks, 5)
        with anyio.move_on_after(10, shield=True):
            await backend.aclose()
            if not isinstance(where, str):
                await where.aclose()
    assert errors == [], (Counter(error.split("(")[0] for error in errors), outcomes)
    assert "still running" not in left
    assert outcomes["ran after its cancel"] == 0
    assert outcomes["cancelled"] > 100
    assert outcomes["completed"] > 50
    assert stats.waiting == 0
    assert stats.dimension("concurrency").used == 0
    assert stats.dimension("tpm").in_flight == 0


@pytest.mark.timeout(60)
async def test_a_cancelled_acquire_is_never_admitted(new_backend: BackendMaker) -> None:
    """An acquire cancelled just after it starts (the cap is full) never runs its body,
    and the slot it waited for stays free; 30 times out of 30."""
    backend = new_backend(lease_ttl_s=30)
    limiter = Limiter(Limits(concurrency=1), backend=backend)
    ran: list[int] = []
    not_cancelled: list[int] = []
    with anyio.fail_after(45):
        for trial in range(30):
            holder = await limiter.acquire()

            async def body(trial: int = trial) -> None:
                async with limiter.acquire():
                    ran.append(trial)

            task = asyncio.create_task(body())
            for _ in range(1 + trial % 3):  # let it start: its first reserve is in flight
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.sleep(0.02)
            await holder.release()
            if await _outcomes([task], 5) != ["cancelled"]:
                not_cancelled.append(trial)
            await _eventually_admitted(limiter, 5)
        used = await _concurrency_used(limiter)
    assert ran == [], f"{len(ran)} of 30 cancelled acquires ran their body"
    assert not_cancelled == []
    assert used == 0


@pytest.mark.timeout(60)
async def test_wait_for_never_returns_a_permit_after_its_timeout(
    new_backend: BackendMaker,
) -> None:
    """``asyncio.wait_for(limiter.acquire(), small)`` on a full cap times out at its
    timeout, never later with a permit; 20 times out of 20, and no slot leaks."""
    backend = new_backend(lease_ttl_s=30)
    limiter = Limiter(Limits(concurrency=1), backend=backend)
    late: list[str] = []
    with anyio.fail_after(45):
        holder = await limiter.acquire()
        for trial in range(20):
            timeout_s = (0.0001, 0.0002, 0.0005, 0.001)[trial % 4]
            task = asyncio.create_task(asyncio.wait_for(limiter.acquire(), timeout_s))
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                [outcome] = await _outcomes([task], 0)
                if not isinstance(outcome, TimeoutError):
                    late.append(f"{timeout_s} s: {outcome!r}")
            else:
                # Still waiting long after its timeout: free the cap and see what it gets.
                await holder.release()
                [outcome] = await _outcomes([task], 5)
                late.append(f"{timeout_s} s: still waiting after 1 s, then {outcome!r}")
                if isinstance(outcome, ratekit.Admission) and outcome.granted:
                    await outcome.release()
                holder = await limiter.acquire()
            if isinstance(outcome, ratekit.Admission) and outcome.granted:
                await outcome.release()
        await holder.release()

        async def all_back() -> bool:
            # A grant that reached a caller already gone is handed back in the background.
            return await _concurrency_used(limiter) == 0

        await _until(all_back, 2)
    assert late == [], f"{len(late)} late outcomes of 20: {late}"


# -- a dropped admission gives its slot back promptly -----------------------------------


@pytest.mark.timeout(30)
async def test_a_dropped_permit_gives_its_slot_back(new_backend: BackendMaker) -> None:
    """A permit dropped without release (``del``, collected) frees its slot within a few
    seconds, far sooner than its 30 s lease: it is not renewed for ever."""
    limiter = Limiter(Limits(concurrency=1), backend=new_backend(lease_ttl_s=30))
    permit = await limiter.acquire()
    del permit
    gc.collect()
    await _eventually_admitted(limiter, 5)
    assert await _concurrency_used(limiter) == 0


@pytest.mark.timeout(30)
async def test_a_wrapped_stream_broken_out_of_gives_its_slot_back(
    new_backend: BackendMaker,
) -> None:
    """A wrapped stream left by ``break`` and dropped unclosed frees its slot within a few
    seconds on a concurrency-1 account, far sooner than its 30 s lease."""
    backend = new_backend(lease_ttl_s=30)
    account = Account("moonshot", tier="tier1", concurrency=1, token_counting="usage")
    scheduler = Scheduler(account, backend=backend)
    async with (
        MockProvider(Limits(rpm=100), completion_tokens=20) as server,
        _openai_client(server, max_retries=0) as raw,
    ):
        client = ratekit.wrap(raw, scheduler)
        with anyio.fail_after(10):
            stream = await client.chat.completions.create(
                model="kimi-k2", messages=MESSAGES, max_tokens=50, stream=True
            )
            async for _ in stream:
                break
        del stream
        for _ in range(3):  # the SDK's stream sits in a cycle that its generator's end closes
            gc.collect()
            await anyio.sleep(0.01)
        with anyio.fail_after(5):
            response = await client.chat.completions.create(
                model="kimi-k2", messages=MESSAGES, max_tokens=5
            )
        assert response.usage.total_tokens == 8
    assert await _concurrency_used(scheduler.limiter()) == 0


# -- hooks, classifiers and cooldowns that raise never keep the slot --------------------


def _scheduler_on(backend: Any, **options: Any) -> Scheduler:
    account = Account("moonshot", tier="tier1", concurrency=1)
    return Scheduler(account, backend=backend, **options)


@pytest.mark.timeout(30)
async def test_a_hook_that_raises_on_admission_does_not_keep_the_slot(
    new_backend: BackendMaker,
) -> None:
    """A hook raising on `Admitted` may fail its call, but the slot is free at once and the
    next caller of a concurrency-1 account gets in."""
    armed = [True]

    def hook(event: ratekit.Event) -> None:
        if isinstance(event, ratekit.events.Admitted) and armed[0]:
            armed[0] = False
            raise Boom("a hook that raises")

    scheduler = _scheduler_on(new_backend(lease_ttl_s=30), hooks=[hook])

    async def call() -> str:
        return "ok"

    with anyio.fail_after(5), contextlib.suppress(Boom):
        await scheduler.submit(call)
    assert await _concurrency_used(scheduler.limiter()) == 0
    with anyio.fail_after(5):
        assert await scheduler.submit(call) == "ok"


@pytest.mark.timeout(30)
async def test_a_classifier_that_raises_does_not_keep_the_slot(
    new_backend: BackendMaker,
) -> None:
    """A classifier that raises on a call's error may fail the call, but the slot is free
    at once and the next caller of a concurrency-1 account gets in."""
    armed = [True]

    def classify(error: BaseException) -> Signal | None:
        if armed[0]:
            armed[0] = False
            raise Boom("a classifier that raises")
        return None

    scheduler = _scheduler_on(new_backend(lease_ttl_s=30), classify=classify)

    async def failing() -> str:
        raise ValueError("the call failed")

    async def call() -> str:
        return "ok"

    with anyio.fail_after(5), contextlib.suppress(Boom, ValueError):
        await scheduler.submit(failing)
    assert await _concurrency_used(scheduler.limiter()) == 0
    with anyio.fail_after(5):
        assert await scheduler.submit(call) == "ok"


@pytest.mark.timeout(30)
async def test_a_hook_that_raises_on_a_429_does_not_keep_the_slot(
    new_backend: BackendMaker,
) -> None:
    """A hook raising on `RateLimited` (the 429 policy's event) may fail the call, but the
    slot is free at once and the next caller gets in after the cooldown."""
    armed = [True]

    def hook(event: ratekit.Event) -> None:
        if isinstance(event, ratekit.events.RateLimited) and armed[0]:
            armed[0] = False
            raise Boom("a hook that raises on a 429")

    scheduler = _scheduler_on(
        new_backend(lease_ttl_s=30), hooks=[hook], classify=classify_429, max_attempts=1
    )

    async def refused() -> str:
        raise TooManyRequests(retry_after_s=0.1)

    async def call() -> str:
        return "ok"

    with anyio.fail_after(5), contextlib.suppress(Boom, TooManyRequests):
        await scheduler.submit(refused)
    assert await _concurrency_used(scheduler.limiter()) == 0
    with anyio.fail_after(5):
        assert await scheduler.submit(call) == "ok"


# -- wrap: every HTTP request is admitted; 429s and money are seen -----------------------


@pytest.mark.timeout(30)
async def test_every_request_the_sdk_sends_is_admitted_and_its_429s_are_seen() -> None:
    """With the SDK's default retries, every HTTP request the provider receives went
    through an admission, and its 429s reach the scheduler (a cooldown)."""
    async with MockProvider(Limits(rpm=100), completion_tokens=5) as server:
        server.inject_429s(2, retry_after_s=0.2)
        scheduler = Scheduler(Account("moonshot", tier="tier1"))
        async with _openai_client(server) as raw:  # the SDK's default: max_retries=2
            client = ratekit.wrap(raw, scheduler)
            with anyio.fail_after(20):
                response = await client.chat.completions.create(
                    model="kimi-k2", messages=MESSAGES, max_tokens=20
                )
        assert response.usage.total_tokens == 8
        provider = server.statistics()
    received = provider.served + sum(provider.rejected.values())
    stats = await scheduler.statistics()
    assert provider.rejected == {"injected": 2}
    assert stats.admitted == received == 3
    assert stats.rate_limited >= 1
    assert stats.cooldowns >= 1


@pytest.mark.timeout(30)
async def test_wrapped_calls_of_a_priced_model_spend_the_money_budget() -> None:
    """A wrapped call of a model the profile prices (StepFun step-3.5-flash) counts its
    cost against the account's money rate."""
    budget = Rate(1.0, 86_400, "money", name="budget")
    scheduler = Scheduler(Account("stepfun", tier="V1", rates=(budget,)))
    async with (
        MockProvider(Limits(rpm=100), completion_tokens=5) as server,
        _openai_client(server, max_retries=0) as raw,
    ):
        client = ratekit.wrap(raw, scheduler)
        with anyio.fail_after(10):
            await client.chat.completions.create(
                model="step-3.5-flash", messages=MESSAGES, max_tokens=20
            )
    spent = (await scheduler.limiter().statistics()).dimension("budget")
    # 3 prompt tokens at $0.10 and 5 output at $0.30 per million: 1.8e-6 USD (an estimate
    # of the prompt and the 20 output tokens reserved costs a few millionths more).
    assert 0 < spent.used <= 1e-4
    assert spent.in_flight == 0


# -- memory and Redis agree -----------------------------------------------------------


@pytest.mark.parametrize("counting", ["usage", "safe"])
@pytest.mark.timeout(30)
async def test_a_zero_estimate_settled_at_500_tokens_counts_500(
    new_backend: BackendMaker, counting: str
) -> None:
    """acquire(tokens=0), settle(tokens=500), release: the tpm shows 500 used, on memory
    and on Redis alike."""
    limits = Limits(tpm=1000, token_counting=ratekit.TokenCounting(counting))
    limiter = Limiter(limits, backend=new_backend())
    with anyio.fail_after(10):
        permit = await limiter.acquire(tokens=0)
        permit.settle(tokens=500)
        await permit.release()
        tpm = (await limiter.statistics()).dimension("tpm")
    assert (tpm.used, tpm.in_flight) == (500, 0)


# -- a burst of 429s keeps the longest Retry-After -------------------------------------


async def _a_burst_of_two_429s(scheduler: Scheduler, first_s: float, second_s: float) -> None:
    """Two calls admitted together, refused one after the other with these Retry-Afters."""
    raised: list[float | None] = []
    try:
        async with scheduler.slot():
            try:
                async with scheduler.slot():
                    raise TooManyRequests(retry_after_s=first_s)
            except TooManyRequests as refusal:
                raised.append(refusal.retry_after_s)
            raise TooManyRequests(retry_after_s=second_s)
    except TooManyRequests as refusal:
        raised.append(refusal.retry_after_s)
    assert raised == [first_s, second_s]  # each 429 was re-raised to its caller


@pytest.mark.timeout(30)
async def test_a_burst_of_429s_keeps_the_longest_retry_after() -> None:
    """Two 429s of one burst asking 1 s and 30 s: the account is still paused at 1.5 s
    and admits again after 30 s (fake clock)."""
    clock = FakeClock()
    scheduler = Scheduler(
        Account("moonshot", tier="tier1"), clock=clock, classify=classify_429, adapt=False
    )
    await _a_burst_of_two_429s(scheduler, 1.0, 30.0)
    clock.advance(1.5)
    assert await scheduler.limiter().try_acquire() is None
    clock.advance(29.0)
    permit = await scheduler.limiter().try_acquire()
    assert permit is not None
    await permit.release()


@pytest.mark.redis
@pytest.mark.timeout(30)
async def test_a_burst_of_429s_on_redis_keeps_the_longest_retry_after(redis_url: str) -> None:
    """Two 429s of one burst asking 0.3 s and 30 s, on Redis: the account is still paused
    after 0.8 s."""
    backend = RedisBackend(redis_url, namespace=_namespace("burst"))
    scheduler = Scheduler(
        Account("moonshot", tier="tier1"), backend=backend, classify=classify_429, adapt=False
    )
    try:
        await _a_burst_of_two_429s(scheduler, 0.3, 30.0)
        await anyio.sleep(0.8)
        assert await scheduler.limiter().try_acquire() is None
    finally:
        await backend.aclose()


# -- every Redis call is cancellable, with a client the user built ----------------------


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yields its
    port. Leaving it closes every connection it accepted."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


@pytest.mark.timeout(30)
async def test_a_user_client_that_stops_answering_can_be_cancelled() -> None:
    """With a user-built Redis client (no socket timeout) whose server never answers,
    ``move_on_after(0.5)`` around ``acquire()`` returns within 1.5 s."""
    from redis.asyncio import Redis

    async with _silent_server() as port:
        client = Redis(host="127.0.0.1", port=port)
        backend = RedisBackend(client, namespace=_namespace("silent"))
        limiter = Limiter(Limits(rpm=10), backend=backend)
        elapsed: list[float] = []

        async def bounded_acquire() -> None:
            started = time.monotonic()
            try:
                with anyio.move_on_after(0.5):
                    permit = await limiter.acquire()
                    await permit.release()
            except ratekit.BackendUnavailableError:
                pass  # a server that does not answer may count as down: also a prompt answer
            finally:
                elapsed.append(time.monotonic() - started)

        task = asyncio.create_task(bounded_acquire())
        await asyncio.wait({task}, timeout=3.0)
        still_stuck = not task.done()
    # The server is closed: a stuck call sees the connection end and returns.
    await _outcomes([task], 5)
    with anyio.move_on_after(5):
        await backend.aclose()
        await client.aclose()
    assert not still_stuck, "acquire() was still stuck 3 s after move_on_after(0.5)"
    assert len(elapsed) == 1
    assert elapsed[0] < 1.5


# -- time: a wall-clock step neither stalls nor bursts ----------------------------------


def _step_wall_clock(monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + step_s)


async def _admitted_within(limiter: Limiter, seconds: float) -> int:
    """How many acquires (each waiting at most `seconds`) are admitted in `seconds`."""
    admitted = 0
    deadline = time.monotonic() + seconds
    with anyio.move_on_after(seconds + 1):
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with limiter.acquire(timeout=left):
                    admitted += 1
            except ratekit.AcquireTimeout:
                break
    return admitted


@pytest.mark.timeout(30)
async def test_a_wall_clock_step_back_does_not_stall_pacing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paced at 20 per second, an hour's step back of the wall clock leaves the pace as
    it was: about 10 admissions in the next half second, not none."""
    limiter = Limiter(Limits(rates=(Rate(20, 1.0, name="rps"),), pacing=True))
    assert await _admitted_within(limiter, 0.2) >= 2
    _step_wall_clock(monkeypatch, -3600.0)
    assert await _admitted_within(limiter, 0.5) >= 5


@pytest.mark.timeout(30)
async def test_a_wall_clock_step_forward_admits_no_new_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full window (5 per 2 s) stays full when the wall clock steps forward 120 s: no
    admission in the next 0.3 s."""
    limiter = Limiter(Limits(rates=(Rate(5, 2.0, name="burst"),)))
    for _ in range(5):
        permit = await limiter.try_acquire()
        assert permit is not None
        await permit.release()
    assert await limiter.try_acquire() is None
    _step_wall_clock(monkeypatch, 120.0)
    admitted = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        permit = await limiter.try_acquire()
        if permit is not None:
            admitted += 1
            await permit.release()
        await anyio.sleep(0.01)
    assert admitted == 0


# -- waiters: cancelling many is cheap; a bad argument poisons nobody -------------------


async def _cancel_newest_first(
    waiters: int, wait: Callable[[], Coroutine[Any, Any, None]]
) -> float:
    """Seconds to cancel `waiters` tasks blocked in `wait`, the newest first."""
    tasks = [asyncio.create_task(wait()) for _ in range(waiters)]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if all(not task.done() for task in tasks[-10:]):
            break
    await asyncio.sleep(0.05)
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for task in reversed(tasks):
            task.cancel()
        await _outcomes(tasks, 30)
        return time.perf_counter() - started
    finally:
        gc.enable()


@pytest.mark.timeout(60)
async def test_cancelling_20000_waiters_costs_about_what_cancelling_tasks_costs() -> None:
    """Cancelling 20,000 waiters of a full limiter, newest first, costs less than 6 times
    cancelling 20,000 sleeping tasks: no O(n) removal per waiter."""
    waiters = 20_000
    limiter = Limiter(Limits(concurrency=1))
    holder = await limiter.acquire()

    async def wait_for_slot() -> None:
        async with limiter.acquire():
            pass

    async def sleep() -> None:
        await asyncio.sleep(3600)

    control_s = await _cancel_newest_first(waiters, sleep)
    with anyio.fail_after(40):
        queued = asyncio.create_task(_cancel_newest_first(waiters, wait_for_slot))
        limiter_s = await queued
    control_s = max(control_s, await _cancel_newest_first(waiters, sleep))
    await holder.release()
    stats = await limiter.statistics()
    assert stats.waiting == 0
    assert stats.dimension("concurrency").used == 0
    assert limiter_s < 6 * control_s, f"{limiter_s:.2f} s against {control_s:.2f} s for tasks"


@pytest.mark.parametrize("bad_priority", ["high", None, 1.5j])
@pytest.mark.timeout(30)
async def test_a_bad_priority_fails_its_caller_only(
    new_backend: BackendMaker, bad_priority: object
) -> None:
    """``acquire(priority=<not an int>)`` while two callers wait raises a typed error in
    that caller only; the two are admitted and later acquires work."""
    limiter = Limiter(Limits(concurrency=1), backend=new_backend(lease_ttl_s=30))
    holder = await limiter.acquire()
    admitted: list[int] = []

    async def waiter(number: int) -> None:
        async with limiter.acquire():
            admitted.append(number)

    waiting = [asyncio.create_task(waiter(n)) for n in range(2)]

    async def both_wait() -> bool:
        return (await limiter.statistics()).waiting == 2

    await _until(both_wait, 5)
    with anyio.fail_after(5), pytest.raises((ratekit.RatekitError, TypeError)) as caught:
        await limiter.acquire(priority=bad_priority)  # type: ignore[arg-type]
    await holder.release()
    assert await _outcomes(waiting, 5) == [None, None]
    assert sorted(admitted) == [0, 1]
    await _eventually_admitted(limiter, 5)
    stats = await limiter.statistics()
    assert (stats.waiting, stats.dimension("concurrency").used) == (0, 0)
    assert "priority" in str(caught.value)


@pytest.mark.timeout(30)
async def test_one_permit_awaited_by_two_tasks_is_granted_once(
    new_backend: BackendMaker,
) -> None:
    """One permit awaited by two tasks while the cap is full is granted once; the other
    await raises a typed error (`PermitError`), and no slot leaks."""
    limiter = Limiter(Limits(concurrency=1), backend=new_backend(lease_ttl_s=30))
    holder = await limiter.acquire()
    permit = limiter.acquire()
    outcomes: list[object] = []

    async def take() -> None:
        try:
            outcomes.append(await permit)
        except ratekit.RatekitError as exc:  # PermitError, or another typed refusal
            outcomes.append(exc)

    tasks = [asyncio.create_task(take()) for _ in range(2)]
    await asyncio.sleep(0.1)
    await holder.release()

    async def granted() -> bool:
        return any(isinstance(outcome, ratekit.Admission) for outcome in outcomes)

    await _until(granted, 5)
    await permit.release()
    assert await _outcomes(tasks, 5) == [None, None]
    # A second grant (if any) is released too, so that only a leak is left to count.
    for outcome in outcomes[1:]:
        if isinstance(outcome, ratekit.Admission):
            await outcome.release()
    kinds = sorted("error" if isinstance(o, ratekit.RatekitError) else "permit" for o in outcomes)
    assert kinds == ["error", "permit"], outcomes
    stats = await limiter.statistics()
    assert (stats.waiting, stats.dimension("concurrency").used) == (0, 0)


# -- every argument is checked where it is given ----------------------------------------


def _account() -> Account:
    return Account("moonshot", tier="tier1")


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: Scheduler(_account(), max_attempts=float("nan")), "max_attempts"),  # type: ignore[arg-type]
        (lambda: Scheduler(_account(), max_attempts=float("inf")), "max_attempts"),  # type: ignore[arg-type]
        (lambda: Scheduler(_account(), max_attempts=1e308), "max_attempts"),  # type: ignore[arg-type]
        (lambda: Scheduler(_account(), max_attempts=0), "max_attempts"),
        (lambda: Scheduler(_account(), max_queue=-1), "max_queue"),
        (lambda: Scheduler(_account(), lower_share=2), "lower_share"),
        (lambda: Scheduler("moonshot"), "account"),  # type: ignore[arg-type]
        (lambda: Limiter(Limits(rpm=10), backend="memory"), "backend"),  # type: ignore[arg-type]
    ],
    ids=[
        "max_attempts-nan",
        "max_attempts-inf",
        "max_attempts-1e308",
        "max_attempts-0",
        "max_queue--1",
        "lower_share-2",
        "account-str",
        "backend-str",
    ],
)
def test_a_bad_constructor_argument_is_a_typed_error_naming_it(
    build: Callable[[], object], argument: str
) -> None:
    """A bad argument to `Scheduler` or `Limiter` raises a ratekit error at construction,
    naming the argument."""
    with pytest.raises(ratekit.RatekitError) as caught:
        build()
    assert argument in str(caught.value)


@pytest.mark.timeout(30)
async def test_a_timeout_of_a_wrong_type_is_a_typed_error_naming_it() -> None:
    """``submit(fn, timeout="5")`` raises a ratekit error naming ``timeout`` and never
    runs the call."""
    scheduler = Scheduler(_account())
    ran: list[int] = []

    async def call() -> None:
        ran.append(1)

    with anyio.fail_after(5), pytest.raises(ratekit.RatekitError) as caught:
        await scheduler.submit(call, timeout="5")  # type: ignore[arg-type]
    assert "timeout" in str(caught.value)
    assert ran == []


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: Rate(10, 60, slices=10**308), "slices"),
        (lambda: Limits(rpm=10, period_scale=1e-300), "period_scale"),
        (lambda: Account("moonshot", tier="tier1", period_scale=1e-300), "period_scale"),
        (
            lambda: RedisBackend("redis://127.0.0.1:1/0", namespace="x", lease_ttl_s=1e308),
            "lease_ttl_s",
        ),
    ],
    ids=["slices-1e308", "period_scale-1e-300", "account-period_scale-1e-300", "lease-1e308"],
)
def test_an_extreme_finite_number_is_a_typed_error_at_once(
    build: Callable[[], object], argument: str
) -> None:
    """Finite numbers too extreme to work (10**308 slices, a 1e-300 period scale, a 1e308 s
    lease) raise a ratekit error at construction, naming the argument."""
    with pytest.raises(ratekit.RatekitError) as caught:
        build()
    assert argument in str(caught.value)


@pytest.mark.parametrize("limits", [Limits(rpm=10), Limits(rpm=10, tpm=1000)], ids=["rpm", "tpm"])
@pytest.mark.timeout(30)
async def test_tokens_beyond_any_float_are_a_typed_error(
    new_backend: BackendMaker, limits: Limits
) -> None:
    """``acquire(tokens=10**400)`` raises a ratekit error at once, naming the tokens (or the
    token rate it exceeds), on memory and Redis."""
    limiter = Limiter(limits, backend=new_backend())
    with anyio.fail_after(5), pytest.raises(ratekit.RatekitError) as caught:
        await limiter.acquire(tokens=10**400)
    assert "tokens" in str(caught.value) or "tpm" in str(caught.value)
    stats = await limiter.statistics()
    assert stats.dimension("rpm").used == 0


# -- Redis unreachable, or used from another loop ---------------------------------------


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open", "local"])
@pytest.mark.timeout(30)
async def test_the_first_call_with_redis_unreachable_follows_the_policy(policy: str) -> None:
    """With Redis unreachable, the scheduler's first call raises `BackendUnavailableError`
    (fail_closed, once `outage_wait_s` has passed) or is admitted (fail_open, local):
    never a raw redis error."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    backend = RedisBackend(
        url, namespace=_namespace("down"), on_unavailable=policy, outage_wait_s=0.5
    )
    scheduler = Scheduler(_account(), backend=backend)

    async def call() -> str:
        return "ok"

    try:
        with anyio.fail_after(10):
            if policy == "fail_closed":
                with pytest.raises(ratekit.BackendUnavailableError):
                    await scheduler.submit(call)
            else:
                assert await scheduler.submit(call) == "ok"
    finally:
        with anyio.move_on_after(5, shield=True):
            await backend.aclose()


def _loop_outcome(scheduler: Scheduler, calls: int) -> str:
    """Run `calls` submits in a new event loop of this thread: "ok", or what was raised."""

    async def call() -> None:
        await asyncio.sleep(0.01)

    async def run() -> None:
        with anyio.fail_after(10):
            for _ in range(calls):
                await scheduler.submit(call)

    try:
        asyncio.run(run())
    except ratekit.RatekitError as exc:
        return f"typed: {exc}"
    except BaseException as exc:  # reported, so that the test says what went wrong
        return f"untyped: {exc!r}"
    return "ok"


def _works_or_names_the_loop(outcome: str) -> bool:
    return outcome == "ok" or (outcome.startswith("typed: ") and "event loop" in outcome.lower())


def _in_threads(runs: list[Callable[[], str]], within_s: float) -> list[str]:
    """Run each of `runs` in a thread of its own, all at once; their outcomes, or "hung"
    for one still running after `within_s` seconds (a waiter that never woke)."""
    outcomes = ["hung"] * len(runs)

    def run(index: int) -> None:
        outcomes[index] = runs[index]()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + within_s
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0.0))
    return outcomes


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_redis_scheduler_in_a_second_event_loop_works_or_says_so(redis_url: str) -> None:
    """A Redis scheduler used from a second event loop, after the first closed, works or
    raises a ratekit error naming the event loop: never "Event loop is closed"."""
    backend = RedisBackend(redis_url, namespace=_namespace("loops"))
    scheduler = Scheduler(Account("moonshot", tier="tier1", concurrency=1), backend=backend)
    assert _in_threads([lambda: _loop_outcome(scheduler, 2)], 20) == ["ok"]
    second = _in_threads([lambda: _loop_outcome(scheduler, 2)], 20)[0]
    assert _works_or_names_the_loop(second), second


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_redis_scheduler_in_two_threads_loops_works_or_says_so(redis_url: str) -> None:
    """A Redis scheduler used from two threads' event loops at once works in each or raises
    a ratekit error naming the event loop: no waiter is left asleep for ever."""
    backend = RedisBackend(redis_url, namespace=_namespace("threads"))
    scheduler = Scheduler(Account("moonshot", tier="tier1", concurrency=1), backend=backend)
    outcomes = _in_threads([lambda: _loop_outcome(scheduler, 5)] * 2, 25)
    assert all(_works_or_names_the_loop(outcome) for outcome in outcomes), outcomes


# -- loading a tokenizer never blocks the loop -------------------------------------------

SLOW_TIKTOKEN = '''
"""A stand-in for tiktoken whose encodings take 2 s to load (a download)."""

import time

LOADS = 0


class Encoding:
    def __init__(self, name):
        self.name = name

    def encode_ordinary(self, text):
        return list(range(len(text) // 4 + 1))

    def encode(self, text, **kwargs):
        return self.encode_ordinary(text)


def get_encoding(name):
    global LOADS
    LOADS += 1
    time.sleep(2.0)
    return Encoding(name)


def encoding_for_model(model):
    return get_encoding("o200k_base")
'''


@pytest.mark.timeout(60)
async def test_loading_the_tokenizer_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """With a tiktoken whose encoding takes 2 s to load, wrapping a client and making its
    first call never stalls the event loop for 1 s (a load on the loop stalls it >= 2 s;
    the bound leaves room for a busy machine's scheduling)."""
    package = tmp_path / "tiktoken"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(SLOW_TIKTOKEN))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    async with MockProvider(Limits(rpm=1000), completion_tokens=3) as server:
        # One process wraps an openai client (the slow tiktoken on its path) and makes
        # one call, its event loop's lag measured throughout.
        workload = Workload(
            through="wrap",
            calls=1,
            tasks=1,
            timeout_s=20,
            base_url=server.base_url,
            prompt="hello world!",
            max_tokens=(5, 5),
        )
        (outcome,) = await Fleet(workload, 1, env=env).run()
    assert outcome.errors == []
    assert outcome.results == 1
    assert outcome.max_lag_s < 1.0, outcome


@pytest.mark.redis
@pytest.mark.timeout(30)
async def test_concurrent_tries_without_a_wait_are_all_admitted_while_there_is_room(
    redis_url: str,
) -> None:
    """50 gathered ``acquire(timeout=0)`` on a Redis account with room: every one is
    admitted (none is refused for being behind another's round trip)."""
    backend = RedisBackend(redis_url, namespace=_namespace("try0"))
    limiter = Limiter(Limits(rpm=10**9, tpm=10**9), backend=backend)
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        async with limiter.acquire(tokens=5, timeout=0):
            admitted += 1

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(one)
    finally:
        await backend.aclose()
    assert admitted == 50
