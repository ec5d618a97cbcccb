"""The Redis backend's own behaviour: policies when Redis is down, leases, scripts, secrets.

Fast layer on fakeredis (with Lua); the fleet and restart tests with a real
redis-server are in test_redis_fleet.py.
"""

from __future__ import annotations

import anyio
import fakeredis
import pytest

import ratekit
from ratekit import FakeClock, Limiter, Limits, TokenCounting
from ratekit.backends import Demand, Refusal
from ratekit.backends import _scripts as scripts
from ratekit.backends.redis import RedisBackend, RedisGrant

from .window_cases import BASE_S

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(
    server: fakeredis.FakeServer | None = None, clock: FakeClock | None = None, **kwargs: object
) -> RedisBackend:
    client = fakeredis.FakeAsyncRedis(server=server or fakeredis.FakeServer())
    return RedisBackend(client, namespace="acct-42", clock=clock, **kwargs)  # type: ignore[arg-type]


async def test_fail_closed_raises_a_typed_error_without_secrets() -> None:
    """With Redis down and the default policy, an acquire raises BackendUnavailableError."""
    server = fakeredis.FakeServer()
    backend = make(server)
    limiter = Limiter(Limits(rpm=10), backend=backend)
    server.connected = False
    with pytest.raises(ratekit.BackendUnavailableError) as caught:
        await limiter.acquire()
    host = backend.client.connection_pool.connection_kwargs["host"]
    assert str(caught.value) == (
        f"redis at redis://{host}:6379/0 is unreachable (ConnectionError); "
        "namespace 'acct-42', policy fail_closed"
    )
    await backend.aclose()


async def test_fail_open_admits_and_counts_nothing() -> None:
    """With fail_open, calls are admitted while Redis is down, and nothing is counted."""
    server = fakeredis.FakeServer()
    backend = make(server, on_unavailable="fail_open")
    limiter = Limiter(Limits(rpm=1), backend=backend)
    server.connected = False
    for _ in range(5):
        async with limiter.acquire():
            pass
    server.connected = True
    backend._retry_at = 0.0  # skip the backoff
    assert (await limiter.statistics()).dimension("rpm").used == 0
    await backend.aclose()


async def test_local_fallback_admits_within_the_local_share() -> None:
    """With "local", a pod admits within its share of the limits while Redis is down."""
    server = fakeredis.FakeServer()
    backend = make(server, on_unavailable="local", local_share=0.25)
    limiter = Limiter(Limits(concurrency=8, rpm=20), backend=backend)
    server.connected = False
    admitted = 0
    while (permit := await limiter.try_acquire()) is not None:
        admitted += 1
        await permit.release()
    assert admitted == 5  # a quarter of 20 per minute
    await backend.aclose()


async def test_backend_recovers_when_redis_answers_again() -> None:
    """After an outage, the next acquire past the backoff uses Redis again."""
    server = fakeredis.FakeServer()
    backend = make(server)
    limiter = Limiter(Limits(rpm=10), backend=backend)
    server.connected = False
    with pytest.raises(ratekit.BackendUnavailableError):
        await limiter.acquire()
    server.connected = True
    # Within the backoff Redis is not even tried.
    with pytest.raises(ratekit.BackendUnavailableError):
        await limiter.acquire()
    backend._retry_at = 0.0
    async with limiter.acquire():
        pass
    assert (await limiter.statistics()).dimension("rpm").used == 1
    await backend.aclose()


async def test_a_settle_that_cannot_reach_redis_is_sent_later() -> None:
    """Usage settled while Redis is down is recorded once Redis answers."""
    server = fakeredis.FakeServer()
    backend = make(server)
    limits = Limits(tpm=1000, token_counting=TokenCounting.USAGE)
    limiter = Limiter(limits, backend=backend)
    permit = await limiter.acquire(tokens=500)
    permit.settle(tokens=300)
    server.connected = False
    await permit.release()
    server.connected = True
    backend._retry_at = 0.0
    async with limiter.acquire(tokens=1):
        pass
    stats = (await limiter.statistics()).dimension("tpm")
    assert stats.used == 301
    assert stats.in_flight == 0
    await backend.aclose()


async def test_a_lapsed_lease_frees_the_slot_and_its_holds() -> None:
    """A holder that stops renewing loses its slot and held tokens when its lease lapses."""
    clock = FakeClock(BASE_S)
    backend = make(clock=clock, lease_ttl_s=5.0)
    limits = Limits(concurrency=1, tpm=1000, token_counting=TokenCounting.USAGE)
    grant = await backend.reserve(limits, Demand(1, 800, 0))
    assert isinstance(grant, RedisGrant)
    refusal = await backend.reserve(limits, Demand(1, 100, 0))
    assert refusal == Refusal(5.0, "concurrency")
    clock.advance(5.0)
    assert isinstance(await backend.reserve(limits, Demand(1, 900, 0)), RedisGrant)
    await backend.aclose()


async def test_two_namespaces_never_share_counts() -> None:
    """Accounts in different namespaces of one server count separately."""
    server = fakeredis.FakeServer()
    first_backend = make(server)
    other_client = fakeredis.FakeAsyncRedis(server=server)
    second_backend = RedisBackend(other_client, namespace="acct-43")
    first = Limiter(Limits(rpm=2), backend=first_backend)
    second = Limiter(Limits(rpm=2), backend=second_backend)
    for _ in range(2):
        async with first.acquire():
            pass
    assert await first.try_acquire() is None
    permit = await second.try_acquire()
    assert permit is not None
    await permit.release()
    assert (await second.statistics()).dimension("rpm").used == 1
    await first_backend.aclose()
    await second_backend.aclose()


async def test_scripts_are_loaded_again_after_a_flush() -> None:
    """After SCRIPT FLUSH (or a restart), EVALSHA's NOSCRIPT loads the script and retries."""
    backend = make()
    limiter = Limiter(Limits(rpm=10), backend=backend)
    async with limiter.acquire():
        pass
    await backend.client.script_flush()
    async with limiter.acquire():
        pass
    assert (await limiter.statistics()).dimension("rpm").used == 2
    await backend.aclose()


async def test_a_release_elsewhere_wakes_a_waiter_through_pubsub() -> None:
    """A slot released by another process wakes this one's waiter before its hint."""
    server = fakeredis.FakeServer()
    here = Limiter(Limits(concurrency=1), backend=make(server, lease_ttl_s=30.0))
    there_backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct-42")
    there = Limiter(Limits(concurrency=1), backend=there_backend)
    held = await there.acquire()
    woke_after: list[float] = []

    async def wait_here() -> None:
        start = anyio.current_time()
        async with here.acquire():
            woke_after.append(anyio.current_time() - start)

    async with anyio.create_task_group() as group:
        group.start_soon(wait_here)
        await anyio.sleep(0.3)  # the waiter is refused, subscribes and sleeps
        await held.release()
    # The lease hint was 30 s: only the release notice can have woken it.
    assert len(woke_after) == 1
    assert woke_after[0] < 5
    await here.backend.aclose()  # type: ignore[attr-defined]
    await there_backend.aclose()


def test_every_script_is_one_file_loaded_in_one_place() -> None:
    """Each atomic operation is its own .lua file, prefixed by the shared window helpers."""
    for script in (scripts.RESERVE, scripts.SETTLE, scripts.RENEW, scripts.STATS):
        assert script.text.startswith("-- Shared window helpers")
        assert f"-- {script.name}:" in script.text


def test_password_never_shows_in_repr() -> None:
    """A URL's password is not in the backend's repr."""
    backend = RedisBackend("rediss://user:s3cr3t-pw@cache.internal:6380/2", namespace="a")
    assert repr(backend) == "RedisBackend(rediss://cache.internal:6380/2, namespace='a')"
    assert "s3cr3t" not in repr(backend)


def test_bad_configuration_is_a_typed_error() -> None:
    """Namespace, policy, share and lease ttl are validated with exact messages."""
    client = fakeredis.FakeAsyncRedis()
    cases = [
        ({"namespace": "a{b}"}, "namespace must be non-empty without braces, got 'a{b}'"),
        (
            {"namespace": "a", "on_unavailable": "maybe"},
            "on_unavailable must be one of fail_closed, fail_open, local, got 'maybe'",
        ),
        ({"namespace": "a", "local_share": 0}, "local_share must be in (0, 1], got 0"),
        ({"namespace": "a", "lease_ttl_s": -1}, "lease_ttl_s must be positive, got -1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ratekit.LimitsError) as caught:
            RedisBackend(client, **kwargs)  # type: ignore[arg-type]
        assert str(caught.value) == f"RedisBackend.{message}"
