"""Schedulers of several pods sharing one account through Redis (fakeredis with Lua)."""

from __future__ import annotations

import anyio
import fakeredis
import pytest

import ratekit
from ratekit import Account, Scheduler
from ratekit.backends.redis import RedisBackend

from .test_scheduler import Signal, TooManyRequests, classify

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pod(server: fakeredis.FakeServer, tier: str = "tier1", provider: str = "moonshot") -> Scheduler:
    backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct-7")
    return Scheduler(Account(provider, tier=tier), backend=backend, classify=classify)


async def close(*schedulers: Scheduler) -> None:
    for scheduler in schedulers:
        await scheduler.limiter().backend.aclose()  # type: ignore[attr-defined]


async def test_a_429_in_one_pod_pauses_the_other() -> None:
    """The cooldown after a 429 is the account's, not the pod's."""
    server = fakeredis.FakeServer()
    first, second = pod(server), pod(server)
    await first.rate_limited(None, Signal(retry_after_s=30.0, retryable=True))
    with pytest.raises(ratekit.AcquireTimeout) as caught:
        async with second.slot(timeout=1):
            pass
    assert caught.value.dimension == "cooldown"
    assert 29 < caught.value.retry_after_s <= 30
    await close(first, second)


async def test_a_tier_change_in_one_pod_reaches_the_others() -> None:
    """A tier set in one pod applies in a running pod (pub/sub) and in a new one (stored)."""
    server = fakeredis.FakeServer()
    first, second = pod(server, "tier0"), pod(server, "tier0")
    async with second.slot():  # starts its listener
        pass
    changed = anyio.Event()
    second.account.on_change(lambda old, new: changed.set())
    await first.set_tier("tier2")
    with anyio.fail_after(5):
        await changed.wait()
    assert second.account.tier.name == "Tier2"
    assert second.limiter().limits.rpm == 500
    third = pod(server, "tier0")
    async with third.slot():
        pass
    assert third.account.tier.name == "Tier2"
    await close(first, second, third)


async def test_a_tier_change_made_before_a_pod_hears_the_channel_reaches_it() -> None:
    """A pod that read the tier at its first admission, then missed the notice of a change
    published before its listener had subscribed, still adopts the change: the listener
    reads the stored tier once it hears the channel."""
    server = fakeredis.FakeServer()
    first, second = pod(server, "tier1"), pod(server, "tier1")
    async with first.slot():
        pass
    async with second.slot():  # its first admission reads the tier; its listener starts
        pass
    changed = anyio.Event()
    second.account.on_change(lambda old, new: changed.set())
    await first.set_tier("tier2")  # at once: the notice may come before the listener
    with anyio.fail_after(5):
        await changed.wait()
    assert second.account.tier.name == "Tier2"
    assert second.limiter().limits.rpm == 500
    await close(first, second)


async def test_a_pod_started_during_an_outage_adopts_the_tier_once_redis_answers() -> None:
    """A new pod whose first call meets a Redis outage waits it out (the default), and
    adopts the tier the other pods agreed on at a later call, once Redis answers."""
    server = fakeredis.FakeServer()
    first = pod(server, "tier0")
    await first.set_tier("tier2")
    late = pod(server, "tier0")
    server.connected = False
    async with anyio.create_task_group() as group:

        async def first_call() -> None:
            async with late.slot():
                pass

        group.start_soon(first_call)
        await anyio.sleep(0.3)
        assert late.account.tier.name == "Tier0"  # not known yet
        server.connected = True
    async with late.slot():
        pass
    assert late.account.tier.name == "Tier2"
    assert late.limiter().limits.rpm == 500
    await close(first, late)


async def a_fleet_at_tier2_and_a_new_pod() -> tuple[Scheduler, Scheduler, RedisBackend]:
    """A pod that set the fleet's tier to tier2, and a new pod of tier0 (with its
    backend) that has not read it yet."""
    server = fakeredis.FakeServer()
    first = pod(server, "tier0")
    await first.set_tier("tier2")
    late = pod(server, "tier0")
    backend = late.limiter().backend
    assert isinstance(backend, RedisBackend)
    return first, late, backend


async def test_callers_gathered_before_the_first_admission_read_the_tier_once() -> None:
    """200 callers gathered on a new pod share one read of the fleet's tier (not one
    each, which on a cluster is a command and a connection each) and all adopt it."""
    first, late, backend = await a_fleet_at_tier2_and_a_new_pod()
    reads: list[str] = []
    shared_tier = backend.shared_tier

    async def counted() -> str | None:
        reads.append("GET")
        return await shared_tier()

    backend.shared_tier = counted  # type: ignore[method-assign]

    async def call() -> None:
        async with late.slot():
            pass

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for _ in range(200):
                group.start_soon(call)
    assert len(reads) == 1
    assert late.account.tier.name == "Tier2"
    await close(first, late)


async def test_a_caller_waiting_for_anothers_tier_read_keeps_its_timeout() -> None:
    """A caller with a timeout, waiting for another caller's read of the tier that hangs
    (that caller has no timeout), goes on to its admission at its own deadline (the
    tier is read at a later call)."""
    server = fakeredis.FakeServer()
    late = pod(server, "tier0")
    backend = late.limiter().backend
    assert isinstance(backend, RedisBackend)
    hang = anyio.Event()

    async def hanging() -> str | None:
        await hang.wait()
        return None

    backend.shared_tier = hanging  # type: ignore[method-assign]
    waited: dict[str, float] = {}
    second_done = anyio.Event()

    async def call(name: str, deadline_s: float | None) -> None:
        started = anyio.current_time()
        async with late.slot(timeout=deadline_s):
            waited[name] = anyio.current_time() - started
        if name == "second":
            second_done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(call, "first", None)  # reads the tier, and hangs there
            await anyio.sleep(0.05)
            group.start_soon(call, "second", 0.2)
            await second_done.wait()
            assert "first" not in waited
            hang.set()
    assert 0.15 <= waited["second"] < 1.0, waited
    await close(late)


async def test_callers_behind_a_tier_read_that_ends_without_it_read_it_again() -> None:
    """The caller reading the fleet's tier leaves mid-read (its task cancelled): the
    callers gathered behind it read it again, and are admitted under the fleet's tier,
    not the pod's own."""
    first, late, backend = await a_fleet_at_tier2_and_a_new_pod()
    shared_tier = backend.shared_tier

    async def slow() -> str | None:
        await anyio.sleep(0.05)  # a store that takes 50 ms to answer
        return await shared_tier()

    backend.shared_tier = slow  # type: ignore[method-assign]
    seen: list[str] = []

    async def call() -> None:
        async with late.slot():
            seen.append(late.account.tier.name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group, anyio.create_task_group() as reader:
            reader.start_soon(call)  # reads the tier first
            await anyio.sleep(0.01)
            for _ in range(5):
                group.start_soon(call)
            await anyio.sleep(0.01)
            reader.cancel_scope.cancel()  # the reader leaves mid-read
    assert seen == ["Tier2"] * 5
    await close(first, late)


async def test_models_with_their_own_limits_get_their_own_namespace() -> None:
    """MiniMax-M2 and MiniMax-M2-Stable count apart in Redis too."""
    server = fakeredis.FakeServer()
    scheduler = pod(server, "free", provider="minimax")
    for _ in range(20):
        async with scheduler.slot(model="MiniMax-M2"):
            pass
    stable = await scheduler.limiter("MiniMax-M2-Stable").try_acquire()
    assert stable is not None
    await stable.release()
    assert await scheduler.limiter("MiniMax-M2").try_acquire() is None
    keys = {key.decode() for key in await fakeredis.FakeAsyncRedis(server=server).keys("*")}
    assert any("{acct-7.MiniMax-M2}" in key for key in keys)
    assert any("{acct-7.MiniMax-M2-Stable}" in key for key in keys)
    await close(scheduler)


async def test_a_429_raised_in_a_slot_is_answered_and_re_raised() -> None:
    """A 429 inside ``async with scheduler.slot()`` pauses the account, then propagates."""
    server = fakeredis.FakeServer()
    scheduler = pod(server)
    with pytest.raises(TooManyRequests):
        async with scheduler.slot():
            raise TooManyRequests(retry_after_s=5)
    stats = await scheduler.statistics()
    assert (stats.rate_limited, stats.cooldowns) == (1, 1)
    assert await scheduler.limiter().try_acquire() is None
    await close(scheduler)
