"""Credits: requests a process draws ahead of its own calls on a shared account.

An admission that takes no lease (requests counted at admission, no concurrency cap)
goes to Redis once in a while and draws a credit with it, recorded like any admission
in the slice of its draw; the process's next calls in that slice are admitted from it
without a round trip, and what is left is refunded when the credit ends (see
`ratekit.backends.redis._Credit`). These tests hold it to the memory backend's
results on the same calls, count its round trips, and check what another process
sees.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import fakeredis
import pytest

from ratekit import Admission, Limiter, Limits, MemoryBackend, Rate, RedisBackend
from ratekit.backends import Demand, Refusal
from ratekit.backends.redis import RedisGrant
from ratekit.clock import FakeClock
from ratekit.errors import InvalidArgumentError

from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

# A whole number of seconds: slice 0 of every window starts here.
BASE_S = 1_795_608_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio only


Backends = Callable[[], RedisBackend]


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    """Backends of one account on the fake clock's time (`server_time=False`): on
    fakeredis, or on a real redis-server."""
    account = f"credits-{uuid.uuid4().hex}"
    server = fakeredis.FakeServer()
    made: list[RedisBackend] = []

    def make() -> RedisBackend:
        if request.param == "redis":
            target: Any = request.getfixturevalue("redis_server").url
        else:
            target = fakeredis.FakeAsyncRedis(server=server)
        backend = RedisBackend(target, namespace=account, server_time=False)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def count_reserves(backend: RedisBackend) -> list[int]:
    """A list whose length is the reserves `backend` sends to Redis from now on."""
    sent: list[int] = []
    link = backend._link
    reserve = link.reserve

    async def counted(*args: Any, **kwargs: Any) -> Any:
        sent.append(1)
        return await reserve(*args, **kwargs)

    link.reserve = counted  # type: ignore[method-assign]
    return sent


async def hearing(backend: RedisBackend) -> None:
    """Until `backend`'s listener hears the account's channel (credits are drawn only
    then): how many calls come before that depends on the event loop's turns."""
    for _ in range(1000):
        if backend._hearing:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the listener did not hear the account's channel within 5 s")


async def used(limiter: Limiter) -> list[float]:
    return [dimension.used for dimension in (await limiter.statistics()).dimensions]


async def test_calls_after_the_first_few_come_from_credits_and_count_exactly(
    backends: Backends,
) -> None:
    clock = FakeClock(BASE_S)
    backend = backends()
    limiter = Limiter(Limits(rpm=10**6), backend=backend, clock=clock)
    async with limiter.acquire():  # starts the listener a credit needs
        pass
    await hearing(backend)
    reserves = count_reserves(backend)
    for _ in range(999):
        async with limiter.acquire():
            pass
    # A credit doubles while it is used up (2, 6, 14, ...), up to 256 requests.
    assert len(reserves) <= 11
    assert await used(limiter) == [1000.0]


@pytest.mark.parametrize("seed", range(6))
async def test_admissions_from_credits_are_those_of_the_memory_backend(
    backends: Backends, seed: int
) -> None:
    """Random calls, ends, refunds, `sent()` and steps of time, on one process: every
    call is admitted or refused as by the memory backend, and the counts agree."""
    rng = random.Random(seed)
    limits = Limits(
        rates=(Rate(160, 60.0, name="rpm"), Rate(1000, 3600.0, name="rph", slices=60)),
        margin_s=0.05,
    )
    clock = FakeClock(BASE_S)
    backend = backends()
    reserves = count_reserves(backend)
    shared = Limiter(limits, backend=backend, clock=clock)
    alone = Limiter(limits, backend=MemoryBackend(), clock=clock)
    held: list[tuple[Admission, Admission]] = []
    admitted = 0
    for step in range(400):
        roll = rng.random()
        if roll < 0.55:
            requests = rng.choice([1, 1, 1, 2])
            theirs = await alone.try_acquire(requests)
            mine = await shared.try_acquire(requests)
            assert (mine is None) == (theirs is None), f"step {step}"
            if mine is not None and theirs is not None:
                held.append((mine, theirs))
                admitted += 1
        elif roll < 0.8 and held:
            pair = held.pop(rng.randrange(len(held)))
            how = rng.random()
            for admission in pair:
                if how < 0.2:
                    await admission.refund()
                else:
                    if how < 0.5:
                        await admission.sent()
                    await admission.release()
        elif roll < 0.97:
            clock.advance(rng.choice([0.01, 0.3, 0.7, 1.0, 2.5, 20.0, 61.0]))
        else:
            assert await used(shared) == await used(alone), f"step {step}"
    for pair in held:
        for admission in pair:
            await admission.release()
    assert await used(shared) == await used(alone)
    assert admitted > 100
    assert len(reserves) < admitted * 0.7  # credits served a good share of them


async def test_a_credit_never_takes_the_last_half_of_the_room(backends: Backends) -> None:
    """Two processes on one account, one calling in bursts: together they are admitted
    exactly the limit, and the first's credits leave the second room to the end."""
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=320)  # a credit of at most 20
    first_backend = backends()
    first = Limiter(limits, backend=first_backend, clock=clock)
    second = Limiter(limits, backend=backends(), clock=clock)
    admitted = {"first": 0, "second": 0}
    for _ in range(60):
        for _ in range(8):
            if await first.try_acquire() is not None:
                admitted["first"] += 1
        if await second.try_acquire() is not None:
            admitted["second"] += 1
    assert admitted["first"] + admitted["second"] == 320
    await first_backend.drain()
    assert await used(second) == [320.0]
    # The second still got its share until the window was full: credits of the first
    # never hold the room it needs (the last of it is never drawn ahead).
    assert admitted["second"] >= 35


async def test_a_credit_ends_with_its_slice_and_what_is_left_is_handed_back(
    backends: Backends,
) -> None:
    clock = FakeClock(BASE_S + 0.2)
    backend = backends()
    limiter = Limiter(Limits(rpm=1600), backend=backend, clock=clock)
    for _ in range(5):
        async with limiter.acquire():
            pass
    other = Limiter(Limits(rpm=1600), backend=backends(), clock=clock)
    # Another process sees the credit drawn ahead (more than 5), never less than used.
    assert (await used(other))[0] > 5
    clock.advance(0.8)  # the next slice: the credit is over
    async with limiter.acquire():
        pass
    await backend.drain()
    assert await used(other) == [6.0]
    # The first five count until their own slice's end plus the window.
    clock.advance(59.99)
    assert await used(other) == [6.0]
    clock.advance(0.02)
    assert await used(other) == [1.0]


async def test_refunds_go_back_to_the_credit_and_to_redis_after_it(backends: Backends) -> None:
    clock = FakeClock(BASE_S)
    backend = backends()
    reserves = count_reserves(backend)
    limiter = Limiter(Limits(rpm=10_000), backend=backend, clock=clock)
    admissions = [await limiter.acquire() for _ in range(40)]
    sent_before = len(reserves)
    for admission in admissions[:20]:
        await admission.refund()
    # Handed back to the credit: the next twenty need no round trip.
    again = [await limiter.acquire() for _ in range(20)]
    assert len(reserves) == sent_before
    await backend.drain()  # the credit ends; the rest are refunded through Redis
    for admission in admissions[20:] + again:
        await admission.refund()
    assert await used(limiter) == [0.0]


async def test_a_process_with_callers_waiting_elsewhere_draws_no_credit(
    backends: Backends,
) -> None:
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=320)
    first_backend = backends()
    first = Limiter(limits, backend=first_backend, clock=clock)
    second = Limiter(limits, backend=backends(), clock=clock)
    for _ in range(200):
        assert await second.try_acquire() is not None
    # A caller of the second asks for more than is left, and waits: its refusal says
    # so to the account (for as long as a lease lasts at most).
    waiting = await second.backend.reserve(limits, Demand(200, 0, 0), clock.instant())
    assert isinstance(waiting, Refusal)
    reserves = count_reserves(first_backend)
    clock.advance(1.0)
    for _ in range(10):
        assert await first.try_acquire() is not None
    assert len(reserves) == 10  # one round trip each: no credit while someone waits


async def test_a_pause_ends_the_credit_at_once(backends: Backends) -> None:
    clock = FakeClock(BASE_S)
    backend = backends()
    limiter = Limiter(Limits(rpm=10**6), backend=backend, clock=clock)
    for _ in range(50):
        async with limiter.acquire():
            pass
    await backend.pause(5.0, clock.instant())
    assert await limiter.try_acquire() is None
    clock.advance(5.0)
    assert await limiter.try_acquire() is not None
    assert await used(limiter) == [51.0]


async def test_without_credits_every_admission_is_a_round_trip() -> None:
    clock = FakeClock(BASE_S)
    backend = RedisBackend(
        fakeredis.FakeAsyncRedis(), namespace="plain", server_time=False, credits=False
    )
    reserves = count_reserves(backend)
    limiter = Limiter(Limits(rpm=10**6), backend=backend, clock=clock)
    for _ in range(50):
        async with limiter.acquire():
            pass
    assert len(reserves) == 50
    assert await used(limiter) == [50.0]
    await backend.aclose()


def test_credits_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgumentError, match=r"RedisBackend\.credits must be a bool"):
        RedisBackend(fakeredis.FakeAsyncRedis(), namespace="x", credits="no")  # type: ignore[arg-type]


@pytest.mark.redis
async def test_an_outage_counts_each_call_alone_in_the_local_fallback(
    fresh_server: RedisServer,
) -> None:
    """Redis goes away after credits grew: under the "local" policy each call counts
    itself alone in this process's share, never a credit's size too."""
    clock = FakeClock(BASE_S)
    backend = RedisBackend(
        fresh_server.url, namespace="outage", server_time=False, on_unavailable="local"
    )
    limits = Limits(rpm=1600)
    limiter = Limiter(limits, backend=backend, clock=clock)
    for _ in range(150):
        async with limiter.acquire():
            pass
    clock.advance(1.0)  # the credit is over
    fresh_server.stop()
    admitted = 0
    for _ in range(600):  # 600 calls over a minute
        admission = await limiter.try_acquire()
        if admission is not None:
            admitted += 1
            await admission.release()
        clock.advance(0.1)
    await backend.aclose()
    assert admitted == 600


async def test_a_pause_elsewhere_ends_this_process_credit_at_once(backends: Backends) -> None:
    clock = FakeClock(BASE_S)  # frozen: only the notice can end the credit
    first_backend = backends()
    first = Limiter(Limits(rpm=10**6), backend=first_backend, clock=clock)
    for _ in range(30):
        async with first.acquire():
            pass
    assert first_backend._credit is not None
    assert first_backend._credit.left > 0
    await asyncio.sleep(0.2)  # its listener subscribes
    await backends().pause(30.0, clock.instant())  # another process met a 429
    # Well before the credit's own end (its slice lasts a second of real time too).
    await asyncio.sleep(0.2)
    assert await first.try_acquire() is None


async def test_a_draw_on_its_way_when_its_process_pauses_is_refunded(backends: Backends) -> None:
    clock = FakeClock(BASE_S)
    backend = backends()
    limiter = Limiter(Limits(rpm=1600), backend=backend, clock=clock)
    async with limiter.acquire():
        pass
    call = asyncio.ensure_future(limiter.acquire())  # draws a credit with it
    await asyncio.sleep(0)
    await limiter.pause(30.0)
    await (await call).release()
    assert await limiter.try_acquire() is None
    clock.advance(30.0)
    assert await used(limiter) == [2.0]


async def test_a_draw_on_its_way_at_aclose_is_refunded(backends: Backends) -> None:
    clock = FakeClock(BASE_S)
    backend = backends()
    limits = Limits(rpm=1600)
    assert isinstance(await backend.reserve(limits, Demand(1, 0, 0), clock.instant()), RedisGrant)
    draw = asyncio.ensure_future(backend.reserve(limits, Demand(1, 0, 0), clock.instant()))
    await asyncio.sleep(0)
    await backend.aclose()
    assert isinstance(await draw, RedisGrant)
    other = backends()
    assert [d.used for d in await other.statistics(limits, clock.instant())] == [2.0]


@pytest.mark.redis
async def test_with_the_servers_clock_a_credit_lasts_by_real_time_not_the_limiters(
    redis_server: RedisServer,
) -> None:
    """A limiter on a clock that stands still (a FakeClock) and the server's TIME: a
    credit still ends with its slice in real time, so that a call admitted after that
    is never recorded in the slice before."""
    limits = Limits(rates=(Rate(1600, 10.0, name="r10s", slices=10),))  # 1 s slices
    backend = RedisBackend(redis_server.url, namespace=f"real-{uuid.uuid4().hex}")
    limiter = Limiter(limits, backend=backend, clock=FakeClock(1000.0))
    for _ in range(20):
        async with limiter.acquire():
            pass
    credit = backend._credit
    assert credit is not None
    # The loop is blocked past the slice's end: the timer cannot run.
    time.sleep(1.1)  # noqa: ASYNC251
    admission = await limiter.acquire()
    assert backend._credit is not credit
    assert admission._grant.indexes != credit.indexes  # type: ignore[attr-defined]
    await admission.release()
    await backend.aclose()


@pytest.mark.redis
async def test_a_pool_of_one_connection_draws_no_credit_and_never_stalls(
    redis_server: RedisServer,
) -> None:
    """Credits need the release listener, which holds a connection of its own: a pool
    that cannot spare one gets no credits, and its calls go on, one round trip each."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_server.url, max_connections=1)
    backend = RedisBackend(client, namespace=f"one-{uuid.uuid4().hex}")
    reserves = count_reserves(backend)
    limits = Limits(rpm=6000)
    clock = FakeClock(BASE_S)
    with anyio.fail_after(10):
        for _ in range(60):
            assert isinstance(
                await backend.reserve(limits, Demand(1, 0, 0), clock.instant()), RedisGrant
            )
    assert len(reserves) == 60
    await backend.aclose()
    await client.aclose()


async def test_a_pause_just_after_the_first_calls_is_heard(backends: Backends) -> None:
    """A process draws credits only once it hears the account's channel, so a pause
    announced right after its first calls reaches it."""
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=6000)
    first, other = backends(), backends()
    await other.statistics(limits, clock.instant())  # connected: its pause goes out at once
    for _ in range(3):
        assert isinstance(await first.reserve(limits, Demand(1, 0, 0), clock.instant()), RedisGrant)
    await other.pause(30.0, clock.instant())
    await asyncio.sleep(0.1)
    assert isinstance(await first.reserve(limits, Demand(1, 0, 0), clock.instant()), Refusal)
