"""The Redis backend's own behaviour: policies when Redis is down, leases, scripts, secrets.

Fast layer on fakeredis (with Lua), through the Backend protocol with the instant
handed in; the admission path (busy pools, cancellation, dropped grants, clocks,
loops) is in test_redis_admission.py, and the fleet and restart tests with a real
redis-server in test_redis_fleet.py.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import math
import time
import weakref
from unittest.mock import ANY

import anyio
import fakeredis
import pytest

import ratekit
from ratekit import Limits, TokenCounting
from ratekit.backends import Demand, Refusal
from ratekit.backends import _scripts as scripts
from ratekit.backends import redis as redis_backend
from ratekit.backends.redis import _PACKED_WORDS, RedisBackend, RedisGrant, _pack
from ratekit.clock import FakeClock, Instant

from .window_cases import BASE_S

pytestmark = pytest.mark.anyio

ONE = Demand(1, 0, 0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(server: fakeredis.FakeServer | None = None, **kwargs: object) -> RedisBackend:
    client = fakeredis.FakeAsyncRedis(server=server or fakeredis.FakeServer())
    return RedisBackend(client, namespace="acct-42", **kwargs)  # type: ignore[arg-type]


def real_now() -> Instant:
    return Instant(time.monotonic(), time.time())


async def used(backend: RedisBackend, limits: Limits, name: str) -> float:
    stats = {d.name: d for d in await backend.statistics(limits, real_now())}
    return stats[name].used


async def test_fail_closed_raises_a_typed_error_without_secrets() -> None:
    """With Redis down, fail_closed and no outage to wait out, a reserve raises
    BackendUnavailableError naming the server, the error's type and the namespace."""
    server = fakeredis.FakeServer()
    backend = make(server, outage_wait_s=0)
    server.connected = False
    with pytest.raises(ratekit.BackendUnavailableError) as caught:
        await backend.reserve(Limits(rpm=10), ONE, real_now())
    host = backend.client.connection_pool.connection_kwargs["host"]
    assert str(caught.value) == (
        f"redis at redis://{host}:6379/0 is unreachable (ConnectionError, for 0.0 s); "
        "namespace 'acct-42', policy fail_closed"
    )
    await backend.aclose()


async def test_fail_closed_waits_out_an_outage_until_outage_wait_s() -> None:
    """By default a reserve during an outage is refused as for capacity ("unavailable"),
    its wait the backoff before Redis is tried again; past `outage_wait_s` from the
    outage's first failure it raises."""
    server = fakeredis.FakeServer()
    backend = make(server, outage_wait_s=0.3)
    limits = Limits(rpm=10)
    server.connected = False
    first = await backend.reserve(limits, ONE, real_now())
    assert isinstance(first, Refusal)
    assert first.dimension == "unavailable"
    assert 0.2 < first.wait_s <= 0.25  # the first backoff
    second = await backend.reserve(limits, ONE, real_now())  # within it: not even tried
    assert isinstance(second, Refusal)
    assert second.dimension == "unavailable"
    assert second.wait_s <= first.wait_s
    await asyncio.sleep(0.31)
    with pytest.raises(ratekit.BackendUnavailableError, match=r"for 0\.3 s"):
        await backend.reserve(limits, ONE, real_now())
    await backend.aclose()


async def test_statistics_during_an_outage_say_how_long_it_has_lasted() -> None:
    """`statistics()` while Redis is down raises BackendUnavailableError with the outage's
    age as this backend has seen it (from its first call that met it), not 0 s."""
    server = fakeredis.FakeServer()
    backend = make(server, outage_wait_s=60)
    limits = Limits(rpm=10)
    server.connected = False
    start = real_now()
    assert isinstance(await backend.reserve(limits, ONE, start), Refusal)
    later = Instant(start.mono + 2.5, start.wall + 2.5)
    with pytest.raises(ratekit.BackendUnavailableError, match=r"for 2\.5 s"):
        await backend.statistics(limits, later)
    await backend.aclose()


async def test_fail_open_admits_and_counts_nothing() -> None:
    """With fail_open, calls are admitted while Redis is down, and nothing is counted."""
    server = fakeredis.FakeServer()
    backend = make(server, on_unavailable="fail_open")
    limits = Limits(rpm=1)
    server.connected = False
    for _ in range(5):
        grant = await backend.reserve(limits, ONE, real_now())
        assert isinstance(grant, RedisGrant)
        await backend.settle(limits, grant, ONE, real_now())
    server.connected = True
    backend._link.retry_at = 0.0  # skip the backoff
    assert await used(backend, limits, "rpm") == 0
    await backend.aclose()


async def test_local_fallback_admits_within_the_local_share() -> None:
    """With "local", a pod admits within its share of the limits while Redis is down."""
    server = fakeredis.FakeServer()
    backend = make(server, on_unavailable="local", local_share=0.25)
    limits = Limits(concurrency=8, rpm=20)
    server.connected = False
    admitted = 0
    while not isinstance(grant := await backend.reserve(limits, ONE, real_now()), Refusal):
        admitted += 1
        await backend.settle(limits, grant, ONE, real_now())
    assert admitted == 5  # a quarter of 20 per minute
    await backend.aclose()


async def test_a_later_outage_is_waited_out_anew() -> None:
    """An outage that ended while nothing was sent (nothing said it ended) does not make a
    later one count from its start: the later outage is waited out for a whole
    `outage_wait_s` again."""
    server = fakeredis.FakeServer()
    backend = make(server, outage_wait_s=0.5)
    limits = Limits(rpm=10)
    server.connected = False
    assert await backend.reserve(limits, ONE, real_now()) == Refusal(ANY, "unavailable")
    server.connected = True  # back, and nobody asks for a while
    backend._link.retry_at -= 60.0  # as if a minute passed since
    backend._link.failed_at -= 60.0
    await asyncio.sleep(0.6)  # longer than outage_wait_s since the first outage began
    server.connected = False
    assert await backend.reserve(limits, ONE, real_now()) == Refusal(ANY, "unavailable")
    await backend.aclose()


async def test_a_retry_slow_to_fail_is_the_same_outage(caplog: pytest.LogCaptureFixture) -> None:
    """A retry made when due that takes long to fail (a hung server: a command timeout and
    a PING) is the same outage: its age runs on, it is logged once, and past
    `outage_wait_s` the callers get the error."""
    server = fakeredis.FakeServer()
    backend = make(server, server_time=False, outage_wait_s=30)
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=10)
    link = backend._link
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        server.connected = False
        assert await backend.reserve(limits, ONE, clock.instant()) == Refusal(ANY, "unavailable")
        first = link.outage
        for _ in range(3):
            # The retry was sent when due; its failure comes 4 s after that.
            link.retry_at = time.monotonic() - 4.0
            link.mark_down(ConnectionError("no reply"))
            clock.advance(12)
        assert link.outage == first
        with pytest.raises(ratekit.BackendUnavailableError, match=r"for 36\.0 s"):
            await backend.reserve(limits, ONE, clock.instant())
    assert sum("is unreachable" in r.getMessage() for r in caplog.records) == 1
    await backend.aclose()


async def test_an_outage_is_aged_on_the_limiters_clock() -> None:
    """The time an outage has been waited out runs on the instants the limiter hands in
    (a fake clock's too): advanced past `outage_wait_s`, the next call raises."""
    server = fakeredis.FakeServer()
    backend = make(server, server_time=False, outage_wait_s=30)
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=10)
    server.connected = False
    assert await backend.reserve(limits, ONE, clock.instant()) == Refusal(ANY, "unavailable")
    clock.advance(29)
    assert await backend.reserve(limits, ONE, clock.instant()) == Refusal(ANY, "unavailable")
    clock.advance(2)
    with pytest.raises(ratekit.BackendUnavailableError, match=r"for 31\.0 s"):
        await backend.reserve(limits, ONE, clock.instant())
    await backend.aclose()


async def test_the_look_for_an_earlier_version_is_made_once_redis_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend whose first call met an outage still looks for an earlier version's
    state once Redis answers, and warns."""
    server = fakeredis.FakeServer()
    backend = make(server, server_time=False)
    await backend.client.hset("ratekit:{acct-42}:state", "nl", 0)
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=10)
    server.connected = False
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        assert await backend.reserve(limits, ONE, clock.instant()) == Refusal(ANY, "unavailable")
        server.connected = True
        backend._link.retry_at = 0.0
        assert isinstance(await backend.reserve(limits, ONE, clock.instant()), RedisGrant)
        await backend.drain()
    assert sum("earlier ratekit" in r.getMessage() for r in caplog.records) == 1
    await backend.aclose()


async def test_an_earlier_version_started_later_is_warned_of(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod of an earlier version that starts after this one is found too: the look
    for its state is made again every `_LEGACY_LOOK_S`, and warned of once."""
    monkeypatch.setattr(redis_backend, "_LEGACY_LOOK_S", 0.05)
    server = fakeredis.FakeServer()
    backend = make(server, server_time=False)
    clock = FakeClock(BASE_S)
    limits = Limits(rpm=100)
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        await backend.reserve(limits, ONE, clock.instant())
        await backend.drain()
        assert not caplog.records
        await backend.client.hset("ratekit:{acct-42}:state", "nl", 0)  # an old pod starts
        for _ in range(5):
            await asyncio.sleep(0.06)
            await backend.reserve(limits, ONE, clock.instant())
            await backend.drain()
    assert sum("earlier ratekit" in r.getMessage() for r in caplog.records) == 1
    await backend.aclose()


async def test_an_outage_is_logged_when_it_starts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Operators see an outage in the log: one warning when Redis is found unreachable,
    one when it answers again, however many calls met it."""
    server = fakeredis.FakeServer()
    backend = make(server)
    limits = Limits(rpm=100)
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        server.connected = False
        for _ in range(3):
            assert await backend.reserve(limits, ONE, real_now()) == Refusal(ANY, "unavailable")
        server.connected = True
        backend._link.retry_at = 0.0
        assert isinstance(await backend.reserve(limits, ONE, real_now()), RedisGrant)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "is unreachable (ConnectionError)" in messages[0]
    assert "answers again" in messages[1]
    await backend.aclose()


async def test_backend_recovers_when_redis_answers_again() -> None:
    """After an outage, the next reserve past the backoff uses Redis again."""
    server = fakeredis.FakeServer()
    backend = make(server)
    limits = Limits(rpm=10)
    server.connected = False
    assert await backend.reserve(limits, ONE, real_now()) == Refusal(ANY, "unavailable")
    server.connected = True
    # Within the backoff Redis is not even tried.
    assert await backend.reserve(limits, ONE, real_now()) == Refusal(ANY, "unavailable")
    backend._link.retry_at = 0.0
    grant = await backend.reserve(limits, ONE, real_now())
    await backend.settle(limits, grant, ONE, real_now())
    assert await used(backend, limits, "rpm") == 1
    await backend.aclose()


async def test_a_settle_that_cannot_reach_redis_is_sent_later() -> None:
    """Usage settled while Redis is down is recorded once Redis answers."""
    server = fakeredis.FakeServer()
    backend = make(server)
    limits = Limits(tpm=1000, token_counting=TokenCounting.USAGE)
    grant = await backend.reserve(limits, Demand(1, 500, 0), real_now())
    server.connected = False
    await backend.settle(limits, grant, Demand(1, 300, 0), real_now())  # kept, no error
    server.connected = True
    backend._link.retry_at = 0.0
    second = await backend.reserve(limits, Demand(1, 1, 0), real_now())
    await backend.settle(limits, second, Demand(1, 1, 0), real_now())
    await asyncio.sleep(0.05)  # the replay runs in the background
    stats = {d.name: d for d in await backend.statistics(limits, real_now())}
    assert stats["tpm"].used == 301
    assert stats["tpm"].in_flight == 0
    await backend.aclose()


async def test_a_lapsed_lease_frees_the_slot_and_its_holds() -> None:
    """A holder that stops renewing loses its slot and held tokens when its lease lapses."""
    clock = FakeClock(BASE_S)
    backend = make(server_time=False, lease_ttl_s=5.0)
    limits = Limits(concurrency=1, tpm=1000, token_counting=TokenCounting.USAGE)
    grant = await backend.reserve(limits, Demand(1, 800, 0), clock.instant())
    assert isinstance(grant, RedisGrant)
    refusal = await backend.reserve(limits, Demand(1, 100, 0), clock.instant())
    assert refusal == Refusal(5.0, "concurrency")
    clock.advance(5.0)
    assert isinstance(await backend.reserve(limits, Demand(1, 900, 0), clock.instant()), RedisGrant)
    await backend.aclose()


async def test_two_namespaces_never_share_counts() -> None:
    """Accounts in different namespaces of one server count separately."""
    server = fakeredis.FakeServer()
    first = make(server)
    second = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct-43")
    limits = Limits(rpm=2)
    for _ in range(2):
        assert isinstance(await first.reserve(limits, ONE, real_now()), RedisGrant)
    assert isinstance(await first.reserve(limits, ONE, real_now()), Refusal)
    assert isinstance(await second.reserve(limits, ONE, real_now()), RedisGrant)
    assert await used(second, limits, "rpm") == 1
    await first.aclose()
    await second.aclose()


async def test_scripts_are_loaded_again_after_a_flush() -> None:
    """After SCRIPT FLUSH (or a restart), EVALSHA's NOSCRIPT loads the script and retries."""
    backend = make()
    limits = Limits(rpm=10)
    await backend.reserve(limits, ONE, real_now())
    await backend.client.script_flush()
    await backend.reserve(limits, ONE, real_now())
    assert await used(backend, limits, "rpm") == 2
    await backend.aclose()


async def test_a_release_elsewhere_wakes_a_waiter_through_pubsub() -> None:
    """A slot released by another process is announced to this one before its hint."""
    server = fakeredis.FakeServer()
    here = make(server, lease_ttl_s=30.0)
    there = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct-42")
    limits = Limits(concurrency=1)
    woken = asyncio.Event()
    here.subscribe(woken.set)
    held = await there.reserve(limits, ONE, real_now())
    refusal = await here.reserve(limits, ONE, real_now())  # subscribes, records a waiter
    assert isinstance(refusal, Refusal)
    assert refusal.wait_s > 5
    await asyncio.sleep(0.3)  # the listener subscribed
    started = time.monotonic()
    await there.settle(limits, held, ONE, real_now())
    await asyncio.wait_for(woken.wait(), 5)
    assert time.monotonic() - started < 5
    assert isinstance(await here.reserve(limits, ONE, real_now()), RedisGrant)
    await here.aclose()
    await there.aclose()


async def test_a_refund_elsewhere_of_a_call_without_a_lease_wakes_a_waiter() -> None:
    """Requests alone (no cap, no lease): a call refunded by another process (never sent)
    frees its request at once, and the waiter here hears of it before its hint."""
    server = fakeredis.FakeServer()
    here = make(server)
    there = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct-42")
    limits = Limits(rpm=1)
    woken = asyncio.Event()
    here.subscribe(woken.set)
    taken = await there.reserve(limits, ONE, real_now())
    assert isinstance(taken, RedisGrant)
    refusal = await here.reserve(limits, ONE, real_now())  # records a waiter
    assert isinstance(refusal, Refusal)
    assert refusal.wait_s > 30
    await asyncio.sleep(0.3)  # the listener subscribed (and said so once)
    woken.clear()
    await there.settle(limits, taken, None, real_now())
    await asyncio.wait_for(woken.wait(), 5)
    assert isinstance(await here.reserve(limits, ONE, real_now()), RedisGrant)
    await here.aclose()
    await there.aclose()


async def test_a_release_on_redis_ends_at_once_and_posts_what_it_sends() -> None:
    """Every admission on Redis ends without letting the loop run (as in process): one
    of requests alone sends nothing; one that holds a slot, or a refund, posts its
    settle, and the slot is back once Redis has run it."""
    backend = make()
    loop = asyncio.get_running_loop()
    sent: list[str] = []
    post = backend._link.post

    def counting(args: tuple[str, ...], *rest: object) -> bool:
        sent.append(args[0])
        return post(args, *rest)  # type: ignore[arg-type]

    backend._link.post = counting  # type: ignore[method-assign]
    cases = (
        (Limits(rpm=10), False, 0),
        (Limits(rpm=10), True, 1),
        (Limits(concurrency=2, rpm=10), False, 1),
        (Limits(concurrency=2, rpm=10), True, 1),
    )
    for limits, refund, posted in cases:
        limiter = ratekit.Limiter(limits, backend=backend)
        admission = await limiter.acquire()
        ran: list[int] = []
        loop.call_soon(ran.append, 1)
        before = len(sent)
        await (admission.refund() if refund else admission.release())
        assert ran == [], limits
        assert len(sent) - before == posted, (limits, refund)
        assert not admission.granted
        stats = await limiter.statistics()  # waits for what was posted
        assert stats.dimension("rpm").used >= (0 if refund else 1)
        if limits.concurrency:
            assert stats.dimension("concurrency").used == 0
    await backend.aclose()


async def test_pause_outlasts_a_renewal() -> None:
    """A cooldown longer than the windows' key ttl is not cut short by lease renewals."""
    clock = FakeClock(BASE_S)
    backend = make(server_time=False, lease_ttl_s=0.03)
    limits = Limits(concurrency=2, rpm=100).compressed(60)  # keys live about 1 s
    grant = await backend.reserve(limits, ONE, clock.instant())
    assert await backend.pause(30.0, clock.instant()) == 30.0
    await asyncio.sleep(0.1)  # several renewals
    pttl = await backend.client.pttl(f"{backend.key_prefix()}:state")
    assert pttl > 25_000
    refusal = await backend.reserve(limits, ONE, clock.instant())
    assert refusal == Refusal(30.0, "cooldown")
    await backend.settle(limits, grant, ONE, clock.instant())
    await backend.aclose()


async def test_an_earlier_versions_state_is_left_alone_and_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Keys are named with their layout: the state an earlier ratekit version keeps under
    the namespace (a pod of it still running, its slots full) is neither read nor
    written, and the first call warns that the two versions do not share their counts."""
    server = fakeredis.FakeServer()
    backend = make(server, server_time=False)
    client = backend.client
    legacy = "ratekit:{acct-42}:state"
    kept = {b"nl": b"2", b"l|old:1": b"1e18", b"l|old:2": b"1e18", b"c": b"5"}
    await client.hset(legacy, mapping=kept)
    clock = FakeClock(BASE_S)
    limits = Limits(concurrency=2, rpm=100)
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        grant = await backend.reserve(limits, ONE, clock.instant())
        assert isinstance(grant, RedisGrant)
        await backend.settle(limits, grant, ONE, clock.instant())
        await backend.drain()
    assert await client.hgetall(legacy) == kept
    assert backend.key_prefix() == "ratekit:{acct-42}:v2"
    assert await client.exists("ratekit:{acct-42}:v2:state") == 1
    warned = [r.getMessage() for r in caplog.records if "earlier ratekit" in r.getMessage()]
    assert len(warned) == 1
    assert "'ratekit:{acct-42}:state'" in warned[0]
    assert "namespace 'acct-42'" in warned[0]
    await backend.aclose()


async def test_no_earlier_version_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A namespace only this version uses draws no warning about earlier ones."""
    backend = make(server_time=False)
    clock = FakeClock(BASE_S)
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        grant = await backend.reserve(Limits(concurrency=2, rpm=100), ONE, clock.instant())
        await backend.settle(Limits(concurrency=2, rpm=100), grant, ONE, clock.instant())
        await backend.drain()
    assert not caplog.records
    await backend.aclose()


def test_every_script_is_one_file_loaded_in_one_place() -> None:
    """Each atomic operation is its own .lua file, prefixed by the shared window helpers."""
    for script in (scripts.RESERVE, scripts.SETTLE, scripts.RENEW, scripts.STATS, scripts.PAUSE):
        assert script.text.startswith("-- Shared window helpers")
        assert f"-- {script.name}:" in script.text


def test_password_never_shows_in_repr() -> None:
    """A URL's password is not in the backend's repr."""
    backend = RedisBackend("rediss://user:s3cr3t-pw@cache.internal:6380/2", namespace="a")
    assert repr(backend) == "RedisBackend(rediss://cache.internal:6380/2, namespace='a')"
    assert "s3cr3t" not in repr(backend)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"namespace": "a{b}"},
            ratekit.errors.LimitsError,
            "namespace must be non-empty without braces, got 'a{b}'",
        ),
        ({"namespace": 42}, ratekit.InvalidArgumentError, "namespace must be a str, got 42"),
        (
            {"on_unavailable": "maybe"},
            ratekit.errors.LimitsError,
            "on_unavailable must be one of fail_closed, fail_open, local, got 'maybe'",
        ),
        ({"local_share": 0}, ratekit.errors.LimitsError, "local_share must be in (0, 1], got 0"),
        (
            {"local_share": math.nan},
            ratekit.errors.LimitsError,
            "local_share must be in (0, 1], got nan",
        ),
        (
            {"local_share": "half"},
            ratekit.InvalidArgumentError,
            "local_share must be a number, got 'half'",
        ),
        (
            {"lease_ttl_s": -1},
            ratekit.errors.LimitsError,
            "lease_ttl_s must be in [0.01, 1e+06] s, got -1",
        ),
        (
            {"lease_ttl_s": 1e308},
            ratekit.errors.LimitsError,
            "lease_ttl_s must be in [0.01, 1e+06] s, got 1e+308",
        ),
        (
            {"lease_ttl_s": math.nan},
            ratekit.errors.LimitsError,
            "lease_ttl_s must be in [0.01, 1e+06] s, got nan",
        ),
        (
            {"lease_ttl_s": "10"},
            ratekit.InvalidArgumentError,
            "lease_ttl_s must be a number, got '10'",
        ),
        (
            {"lease_ttl_s": True},
            ratekit.InvalidArgumentError,
            "lease_ttl_s must be a number, got True",
        ),
        (
            {"command_timeout_s": math.inf},
            ratekit.errors.LimitsError,
            "command_timeout_s must be in [0.001, 3600] s, got inf",
        ),
        (
            {"outage_wait_s": -1},
            ratekit.errors.LimitsError,
            "outage_wait_s must be in [0, 1e+06] s, got -1",
        ),
        (
            {"outage_wait_s": math.nan},
            ratekit.errors.LimitsError,
            "outage_wait_s must be in [0, 1e+06] s, got nan",
        ),
        (
            {"outage_wait_s": None},
            ratekit.InvalidArgumentError,
            "outage_wait_s must be a number, got None",
        ),
        (
            {"server_time": "no"},
            ratekit.InvalidArgumentError,
            "server_time must be True or False, got 'no'",
        ),
        (
            {"connections": 0},
            ratekit.InvalidArgumentError,
            "connections must be a positive int or None, got 0",
        ),
        (
            {"cluster": "yes"},
            ratekit.InvalidArgumentError,
            "cluster must be True or False, got 'yes'",
        ),
        (
            {"cluster": True},
            ratekit.InvalidArgumentError,
            "cluster=True takes a URL; pass a client of a cluster as a "
            "redis.asyncio.cluster.RedisCluster instead",
        ),
        (
            {"prefix": ""},
            ratekit.errors.LimitsError,
            "prefix must be non-empty without braces, got ''",
        ),
    ],
)
def test_bad_configuration_is_a_typed_error(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """Every argument is validated where it is given, with a typed error naming it."""
    arguments: dict[str, object] = {"namespace": "a", **kwargs}
    with pytest.raises(error) as caught:
        RedisBackend(fakeredis.FakeAsyncRedis(), **arguments)  # type: ignore[arg-type]
    assert str(caught.value) == f"RedisBackend.{message}"


def test_a_client_of_the_wrong_kind_is_a_typed_error() -> None:
    """Neither a URL nor a redis.asyncio client: InvalidArgumentError naming the argument."""
    with pytest.raises(ratekit.InvalidArgumentError) as caught:
        RedisBackend(42, namespace="a")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "RedisBackend.redis must be a redis:// URL, a redis.asyncio.Redis client or a "
        "redis.asyncio.cluster.RedisCluster client, got int"
    )


@pytest.mark.parametrize("tenant", [None, "capped"])
async def test_a_wait_runs_from_the_instant_asked_not_from_the_reply(
    tenant: str | None,
) -> None:
    """With the limiter's clock (``server_time=False``), a refusal's wait runs from the
    instant handed to Redis: a clock that moved past it while the reply was on its way
    admits the caller at once, instead of making it wait the whole hint again."""
    clock = FakeClock()
    backend = make(server_time=False)
    real = backend.reserve_tenants if tenant else backend.reserve
    replies = 0

    async def late(*args: object) -> object:
        nonlocal replies
        outcome = await real(*args)  # type: ignore[operator]
        replies += 1
        if replies == 2:
            clock.advance(61)  # past the 60 s the refusal names, before it comes back
        return outcome

    setattr(backend, "reserve_tenants" if tenant else "reserve", late)
    if tenant:
        limits = Limits(concurrency=10)
        tenants = ratekit.Tenants(named={"capped": ratekit.Tenant(Limits(rpm=1))})
    else:
        limits, tenants = Limits(rpm=1), None
    limiter = ratekit.Limiter(limits, backend=backend, clock=clock, tenants=tenants)
    start = clock.now()
    try:
        async with limiter.acquire(tenant=tenant):
            pass
        # Its end told, and the release channel listened to, before the next try: no
        # notice comes while that try is on its way to make the limiter ask again.
        await backend.drain()
        while not (await backend.client.pubsub_numsub(backend._channel))[0][1]:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        with anyio.fail_after(5):
            async with limiter.acquire(tenant=tenant):
                assert clock.now() == start + 61
        assert replies == 3  # refused once, then admitted without a further wait
    finally:
        await backend.aclose()


def test_a_text_enum_is_packed_as_its_text() -> None:
    """A tenant or model named by a member of a str Enum goes to Redis as its text (as
    redis-py would send it), not as the member's name."""

    class Customer(str, enum.Enum):  # noqa: UP042 - a mixin, as older code declares them
        ACME = "acme"

    packed = _pack([("PUBLISH", "channel", Customer.ACME)])  # type: ignore[list-item]
    assert packed == b"*3\r\n$7\r\nPUBLISH\r\n$7\r\nchannel\r\n$4\r\nacme\r\n"


def test_words_packed_again_from_memory_are_packed_as_the_first_time() -> None:
    """The packer keeps the words it packed twice (a command's name, key, specs) and
    reuses them: a command packs to the same bytes the first time and every time after,
    for text of any length and script, through a run of unique words (lease ids) that
    it does not keep, and beside bytes and numbers, which it does not keep either."""

    def by_hand(words: tuple[object, ...]) -> bytes:
        out = b"*%d\r\n" % len(words)
        for word in words:
            data = word if isinstance(word, bytes) else str(word).encode()
            out += b"$%d\r\n%s\r\n" % (len(data), data)
        return out

    commands = [
        ("FCALL", "ratekit_step", "1", "ratekit:{acct}:state", "", "81000", "lease:1"),
        ("PUBLISH", "ratekit:{acct}:released", "x" * 200, "é" * 40, "数" * 30),
        ("SET", b"raw\x00bytes", 7, 2.5),
    ]
    for lease in range(3 * 512):
        unique = ("FCALL", "ratekit_step", f"{lease}:{'é' * (lease % 3)}")
        assert _pack([unique]) == by_hand(unique)
        for command in commands:
            assert _pack([command]) == by_hand(command)  # type: ignore[list-item]
    assert _pack(commands) == b"".join(map(by_hand, commands))  # type: ignore[arg-type]
    # The words that come back stay kept through the run of words seen once.
    assert "ratekit:{acct}:state" in _PACKED_WORDS
    assert "0:" not in _PACKED_WORDS


async def test_a_timeout_waiting_for_a_slot_on_redis_is_not_told_as_a_prediction() -> None:
    """A caller that times out waiting for a concurrency slot on Redis is told it frees
    up when a call ends; the wait Redis gives (until the oldest lease lapses, for a
    holder that died) is told as that bound, not as when the slot frees up."""
    clock = FakeClock()
    backend = make(server_time=False)
    limiter = ratekit.Limiter(Limits(concurrency=1), backend=backend, clock=clock)
    held = await limiter.acquire()
    outcome: list[ratekit.AcquireTimeout] = []

    async def times_out() -> None:
        with pytest.raises(ratekit.AcquireTimeout) as caught:
            await limiter.acquire(timeout=5)
        outcome.append(caught.value)

    async with anyio.create_task_group() as group:
        group.start_soon(times_out)
        await asyncio.sleep(0.5)  # its try reaches Redis and is refused
        clock.advance(5)
    assert str(outcome[0]) == (
        "no permit within 5 s: concurrency frees up when a call in flight ends (at the "
        "latest in 5.000 s, when the oldest lease lapses if its holder died)"
    )
    assert outcome[0].retry_after_s == pytest.approx(5.0)  # the lease ttl (10 s) less 5 s
    await held.release()
    await backend.aclose()


async def test_a_dropped_limiter_is_freed_at_once_and_told_nothing_more() -> None:
    """A limiter on a shared backend listens to its notices from the start. Dropped, it
    is freed by reference counting alone (nothing left in a cycle for the collector),
    and the backend's listeners forget it: no later release reaches it."""
    client = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(client, namespace="dropped", server_time=False)
    gc.disable()
    try:
        limiter = ratekit.Limiter(Limits(rpm=100), backend=backend)
        async with limiter.acquire():
            pass
        assert [entry for entry in backend._listeners if entry() is not None]
        dropped = weakref.ref(limiter)
        del limiter
        assert dropped() is None
        assert not [entry for entry in backend._listeners if entry() is not None]
    finally:
        gc.enable()
        await backend.aclose()
        await client.aclose()
