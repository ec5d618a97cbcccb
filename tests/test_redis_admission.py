"""One admission on Redis, owned end to end (issue 9), through the Backend protocol.

A healthy Redis is never reported down however many callers wait; every call is
cancellable and a cancelled reserve never admits nor counts; a dropped grant's
slot comes back; background failures are surfaced; time never goes back and a
calendar day is right across a daylight-saving change; a second event loop gets
a clear error; the shared tier follows the outage policy. Real-time parts run on
compressed periods with generous bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import fakeredis
import pytest
import trio
from fakeredis.commands_mixins import server_mixin
from redis import exceptions as redis_exceptions
from redis._parsers import _AsyncRESP3Parser
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

import ratekit
from ratekit import Limits, Rate, TokenCounting
from ratekit.backends import Demand, Refusal
from ratekit.backends import redis as redis_backend_module
from ratekit.backends._base import SharedAccount
from ratekit.backends._scripts import RESERVE, SETTLE
from ratekit.backends.memory import MemoryBackend
from ratekit.backends.redis import NO_LEASE, RedisBackend, RedisGrant, zone_transition
from ratekit.clock import FakeClock, Instant

from .redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.anyio

ONE = Demand(1, 0, 0)
ROOT = Path(__file__).resolve().parent.parent
NEW_YORK = ZoneInfo("America/New_York")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio only


def now() -> Instant:
    return Instant(time.monotonic(), time.time())


def namespace() -> str:
    return f"adm-{uuid.uuid4().hex[:12]}"


async def statistics(
    backend: Any, limits: Limits, instant: Instant | None = None
) -> dict[str, Any]:
    return {d.name: d for d in await backend.statistics(limits, instant or now())}


class GatedRedis(fakeredis.FakeAsyncRedis):
    """A client whose script replies are held back until `gate` opens: the server has
    already run the script (`executed` says so), the caller has not heard yet."""

    def __init__(self, **kwargs: Any) -> None:
        gate = self.gate = asyncio.Event()
        executed = self.executed = asyncio.Event()

        class Connection(fakeredis.FakeAsyncRedisConnection):
            # Whether the last write held a script whose replies were not read yet.
            scripts = False

            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                packed = command if isinstance(command, bytes) else b"".join(command)
                self.scripts = b"$7\r\nEVALSHA\r\n" in packed or b"$5\r\nFCALL\r\n" in packed
                await super().send_packed_command(command, check_health)

            async def read_response(self, **kwargs: Any) -> Any:
                if self.scripts:  # run on the server when written
                    self.scripts = False
                    executed.set()
                    await gate.wait()
                return await super().read_response(**kwargs)

        super().__init__(connection_class=Connection, **kwargs)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


# -- a busy Redis is not a down Redis ----------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("callers", [300, 10_000])
async def test_gathered_callers_on_a_healthy_redis_see_no_error(
    fresh_server: RedisServer, callers: int
) -> None:
    """300 and 10,000 reserve+settle gathered at once on one healthy redis-server, failing
    closed: zero errors, a handful of connections, and one script run per 128 callers
    gathered for their admissions (they run as one reserve script each), and about as
    few for their settles (posted together, they run as one settle script each)."""
    client = Redis.from_url(fresh_server.url)  # the default pool: 100 connections
    # Leases long enough that no renewal falls within the burst (it would be counted).
    backend = RedisBackend(client, namespace=namespace(), lease_ttl_s=60.0)
    limits = Limits(concurrency=100_000, rpm=10**7, tpm=10**9)
    probe = Redis.from_url(fresh_server.url)
    errors: list[BaseException | Refusal] = []
    most_clients = 0
    done = asyncio.Event()

    async def call() -> None:
        try:
            grant = await backend.reserve(limits, Demand(1, 100, 0), now())
            if isinstance(grant, Refusal):
                errors.append(grant)
                return
            await backend.settle(limits, grant, Demand(1, 80, 0), now())
        except Exception as exc:
            errors.append(exc)

    async def sample() -> None:
        nonlocal most_clients
        while not done.is_set():
            info = await probe.info("clients")
            most_clients = max(most_clients, int(info["connected_clients"]) - 1)  # not the probe
            await asyncio.sleep(0.01)

    try:
        # Scripts loaded and counters reset: the burst's own commands are counted.
        await call()
        await statistics(backend, limits)
        await probe.config_resetstat()
        reserves, settles = reserve_runs(backend), settle_runs(backend)
        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        await asyncio.gather(*(call() for _ in range(callers)))
        took_s = time.monotonic() - started
        done.set()
        await sampler
        stats = await statistics(backend, limits)
        # Each script run once: an FCALL of the library's function (Redis 7).
        fcall = (await probe.info("commandstats"))["cmdstat_fcall"]["calls"]
    finally:
        await backend.aclose()
        await client.aclose()
        await probe.aclose()
    print(
        f"\n{callers} gathered: {len(errors)} errors in {took_s:.2f} s, at most "
        f"{most_clients} client connections, {fcall} FCALL: {len(reserves)} reserve runs, "
        f"{len(settles)} settle runs"
    )
    assert errors == []
    assert stats["rpm"].used == callers + 1
    assert stats["tpm"].used == 100 * (callers + 1)  # "safe": the larger of estimate and use
    assert stats["concurrency"].used == 0
    assert most_clients <= 8
    # The reserves ran 128 at a time; the settles in a few runs; then the statistics.
    assert len(reserves) == math.ceil(callers / 128)
    assert sum(settles) == callers
    assert len(settles) <= 2 * math.ceil(callers / 128)
    assert fcall == len(reserves) + len(settles) + 1
    assert took_s < 20


# One process of test_four_processes_of_gathered_callers: argv is url, namespace, callers.
_WORKER = """
import asyncio, json, sys, time
from ratekit import Limits
from ratekit.clock import Instant
from ratekit.backends import Demand, Refusal
from ratekit.backends.redis import RedisBackend

async def main(url, namespace, callers):
    backend = RedisBackend(url, namespace=namespace, lease_ttl_s=60.0)
    limits = Limits(concurrency=100_000, rpm=10**7, tpm=10**9)
    errors = []

    async def call():
        try:
            now = Instant(time.monotonic(), time.time())
            grant = await backend.reserve(limits, Demand(1, 100, 0), now)
            if isinstance(grant, Refusal):
                errors.append(repr(grant))
                return
            await backend.settle(limits, grant, Demand(1, 80, 0), now)
        except Exception as exc:
            errors.append(repr(exc))

    started = time.monotonic()
    await asyncio.gather(*(call() for _ in range(callers)))
    took_s = time.monotonic() - started
    await backend.aclose()
    print(json.dumps({"errors": errors, "took_s": took_s}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _start_worker(url: str, account: str, callers: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, url, account, str(callers)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.redis
async def test_four_processes_of_gathered_callers(fresh_server: RedisServer) -> None:
    """10,000 reserve+settle over four processes gathered at once on one redis-server:
    zero errors, every one counted."""
    account = namespace()
    processes = [_start_worker(fresh_server.url, account, 2500) for _ in range(4)]
    reports = []
    for process in processes:
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
        assert process.returncode == 0, stderr
        reports.append(json.loads(stdout.splitlines()[-1]))
    backend = RedisBackend(fresh_server.url, namespace=account)
    stats = await statistics(backend, Limits(concurrency=100_000, rpm=10**7, tpm=10**9))
    await backend.aclose()
    took = ", ".join(f"{report['took_s']:.2f} s" for report in reports)
    print(f"\nfour processes of 2,500 gathered callers: took {took}")
    assert [report["errors"] for report in reports] == [[]] * 4
    assert stats["rpm"].used == 10_000
    assert stats["concurrency"].used == 0


async def test_a_small_pool_is_waited_for_never_an_outage() -> None:
    """With a pool of 2 connections, 300 gathered callers all get through."""
    client = fakeredis.FakeAsyncRedis(max_connections=2)
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(rpm=10**6)
    grants = await asyncio.gather(*(backend.reserve(limits, ONE, now()) for _ in range(300)))
    assert all(isinstance(grant, RedisGrant) for grant in grants)
    assert backend._link.failures == 0
    await backend.aclose()


async def test_a_pool_exhausted_by_someone_else_is_waited_for() -> None:
    """Connections held by other users of the client make a reserve wait, not fail."""
    client = fakeredis.FakeAsyncRedis(max_connections=1)
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(rpm=10)
    taken = await client.connection_pool.get_connection()  # someone else's call
    reserve = asyncio.create_task(backend.reserve(limits, ONE, now()))
    await asyncio.sleep(0.2)
    assert not reserve.done()  # waiting for the connection, not failed
    await client.connection_pool.release(taken)
    grant = await asyncio.wait_for(reserve, 2)
    assert isinstance(grant, RedisGrant)
    assert backend._link.failures == 0
    await backend.aclose()


# -- a short outage is waited out -----------------------------------------------------


async def test_callers_wait_out_a_short_outage_and_go_in_their_order() -> None:
    """Failing closed (the default), callers that come while Redis is down wait for it as
    for capacity: none raises, and once it answers they are admitted in the order they
    came, each counted in Redis."""
    server = fakeredis.FakeServer()
    backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace=namespace())
    limiter = ratekit.Limiter(Limits(rpm=10_000), backend=backend)
    async with limiter.acquire():
        pass  # Redis known up, then it goes
    server.connected = False
    admitted: list[int] = []

    async def call(index: int) -> None:
        async with limiter.acquire():
            admitted.append(index)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for index in range(50):
                group.start_soon(call, index)
                await anyio.sleep(0.002)  # they come one after the other
            await anyio.sleep(0.4)
            assert admitted == []
            server.connected = True
    assert admitted == list(range(50))
    assert (await limiter.statistics()).dimension("rpm").used == 51
    await backend.aclose()


async def _gathered(call: Any, count: int) -> float:
    """Seconds until `count` tasks of `call`, started at once, have all ended (at most 5)."""
    started = time.monotonic()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(call)
    return time.monotonic() - started


async def test_past_outage_wait_s_every_waiting_caller_gets_the_error() -> None:
    """An outage longer than `outage_wait_s` ends every wait with BackendUnavailableError,
    for the callers queued and for those that come after: none hangs."""
    server = fakeredis.FakeServer()
    backend = RedisBackend(
        fakeredis.FakeAsyncRedis(server=server), namespace=namespace(), outage_wait_s=0.3
    )
    limiter = ratekit.Limiter(Limits(rpm=10_000), backend=backend)
    server.connected = False
    outcomes: list[str] = []

    async def call() -> None:
        try:
            async with limiter.acquire():
                outcomes.append("admitted")
        except ratekit.BackendUnavailableError:
            outcomes.append("unavailable")

    waited_s = await _gathered(call, 20)
    with anyio.fail_after(1), pytest.raises(ratekit.BackendUnavailableError):
        await limiter.acquire()
    assert outcomes == ["unavailable"] * 20
    assert waited_s >= 0.3
    await backend.aclose()


async def test_a_timeout_that_ends_during_an_outage_raises_backend_unavailable() -> None:
    """A caller's own timeout that passes while Redis is down ends its wait with
    BackendUnavailableError (the cause), for the head and for those queued behind it."""
    server = fakeredis.FakeServer()
    backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace=namespace())
    limiter = ratekit.Limiter(Limits(rpm=10_000), backend=backend)
    server.connected = False
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            async with limiter.acquire(timeout=0.3):
                pass
        except Exception as error:
            errors.append(error)

    waited_s = await _gathered(call, 5)
    assert len(errors) == 5
    assert all(isinstance(error, ratekit.BackendUnavailableError) for error in errors), errors
    assert "no permit within 0.3 s" in str(errors[0])
    assert 0.25 <= waited_s < 2
    await backend.aclose()


async def test_a_timeout_holds_against_a_server_that_does_not_answer(silent_server: int) -> None:
    """A caller's timeout bounds its wait also while its round trip hangs (a server that
    accepts and never answers): `AcquireTimeout` ("reply") at its deadline, or half a
    second into the round trip when that is later (timeout 0 included), not once the
    link gives the server up (two command timeouts later)."""
    client = Redis(host="127.0.0.1", port=silent_server)
    backend = RedisBackend(client, namespace=namespace(), command_timeout_s=2.0)
    limiter = ratekit.Limiter(Limits(rpm=10), backend=backend)
    took_s = {}
    for timeout_s in (0.8, 0.0):
        started = time.monotonic()
        with anyio.fail_after(5), pytest.raises(ratekit.AcquireTimeout) as caught:
            await limiter.acquire(timeout=timeout_s)
        took_s[timeout_s] = time.monotonic() - started
        assert caught.value.dimension == "reply"
        assert str(caught.value) == (
            f"no permit within {timeout_s:g} s: the shared backend had not replied"
        )
    await backend.aclose()
    assert 0.75 <= took_s[0.8] < 2.0, took_s
    assert 0.45 <= took_s[0.0] < 2.0, took_s


async def test_a_schedulers_first_call_is_bounded_by_its_timeout(silent_server: int) -> None:
    """A scheduler's first call reads the fleet's tier before its admission: against a
    server that never answers, that read too ends with the caller's timeout (the tier
    is read at a later call), not once the link gives the server up."""
    client = Redis(host="127.0.0.1", port=silent_server)
    backend = RedisBackend(client, namespace=namespace(), command_timeout_s=2.0)
    scheduler = ratekit.Scheduler(ratekit.Account("moonshot", tier="tier1"), backend=backend)
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(ratekit.AcquireTimeout):
        async with scheduler.slot(timeout=0.5):
            pass
    took_s = time.monotonic() - started
    await backend.aclose()
    assert took_s < 1.5, took_s


async def test_a_caller_with_a_timeout_waits_for_a_slot_released_in_time() -> None:
    """A full concurrency cap on Redis refuses with a wait bounded by the oldest lease (in
    case its holder died), which is no forecast: a caller whose timeout is shorter
    than that waits, and is admitted when the slot is released; so does a caller queued
    behind it."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    limiter = ratekit.Limiter(Limits(concurrency=1), backend=backend)
    held = await limiter.acquire()
    admitted: list[int] = []

    async def release_soon() -> None:
        await anyio.sleep(0.1)
        await held.release()

    async def caller(index: int) -> None:
        admission = await limiter.acquire(timeout=2)  # the lease ttl is 10 s
        admitted.append(index)
        await admission.release()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(caller, 0)
            await anyio.sleep(0.02)
            group.start_soon(caller, 1)
            group.start_soon(release_soon)
    assert admitted == [0, 1]
    await backend.aclose()


async def test_an_earlier_version_is_not_looked_for_again_when_the_server_refuses() -> None:
    """The look for an earlier version's keys, refused by the server (an ACL that allows
    this version's keys only), is not made again at every call."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    link = backend._link
    post = link.post
    looks: list[tuple[str, ...]] = []

    def refusing(args: tuple[str, ...], script: Any, done: Any) -> bool:
        if args[0] != "EXISTS":
            return post(args, script, done)
        looks.append(args)
        assert link.loop is not None
        refused: asyncio.Future[Any] = link.loop.create_future()
        refused.set_exception(redis_exceptions.NoPermissionError("NOPERM no permissions"))
        link.loop.call_soon(done, refused)  # as a reply comes: after the post
        return True

    link.post = refusing  # type: ignore[method-assign]
    for _ in range(5):
        assert isinstance(await backend.reserve(Limits(rpm=100), ONE, now()), RedisGrant)
    assert len(looks) == 1
    await backend.aclose()


@pytest.mark.redis
async def test_a_server_that_stops_answering_after_a_rest_is_given_up_on_time() -> None:
    """A round trip begun while its sender's watch timer still counts from an earlier
    one (a quick call, a short rest, then a server that stops answering) is watched
    all the same: given up about one command timeout for it and one for a PING later,
    not left to hang with the server."""
    import signal

    with RedisServer(require_redis_server()) as server:
        assert server.process is not None
        client = Redis.from_url(server.url)
        backend = RedisBackend(
            client, namespace=namespace(), command_timeout_s=0.5, outage_wait_s=0
        )
        limits = Limits(concurrency=100)  # a lease: every reserve is a round trip
        try:
            assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
            await asyncio.sleep(0.3)  # the first round trip's due time is 0.2 s ahead
            server.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            try:
                with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError):
                    await backend.reserve(limits, ONE, now())
            finally:
                server.process.send_signal(signal.SIGCONT)
            took_s = time.monotonic() - started
        finally:
            await backend.aclose()
            await client.aclose()
    # 0.5 s to the round trip's due time, then up to 0.5 s for the PING.
    assert 0.9 <= took_s < 2.5, took_s


@pytest.mark.redis
async def test_a_slot_a_lost_reserve_took_comes_back_once_a_stalled_server_answers() -> None:
    """A server that stalls runs, once it resumes, the reserve it had read, whose round
    trip was given up meanwhile: the slot it took comes back as soon as the server
    answers, not when its lease lapses (10 s), and what it counted stays counted."""
    import signal

    with RedisServer(require_redis_server()) as server:
        assert server.process is not None
        client = Redis.from_url(server.url)
        backend = RedisBackend(
            client, namespace=namespace(), command_timeout_s=0.3, outage_wait_s=0
        )
        limits = Limits(concurrency=1, rpm=1000)
        try:
            grant = await backend.reserve(limits, ONE, now())  # the scripts are loaded
            assert isinstance(grant, RedisGrant)
            await backend.settle(limits, grant, None, now())
            server.process.send_signal(signal.SIGSTOP)
            try:
                with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError):
                    await backend.reserve(limits, ONE, now())  # read, not answered
            finally:
                server.process.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            with anyio.fail_after(5):
                while True:
                    try:
                        outcome = await backend.reserve(limits, ONE, now())
                    except ratekit.BackendUnavailableError:
                        outcome = None  # within the outage's backoff
                    if isinstance(outcome, RedisGrant):
                        break
                    await asyncio.sleep(0.05)
            took_s = time.monotonic() - resumed
            rpm = [d for d in await backend.statistics(limits, now()) if d.name == "rpm"]
        finally:
            await backend.aclose()
            await client.aclose()
    assert took_s < 3, took_s
    assert rpm[0].used == 2  # the lost one (counted: it ran) and the last; the first refunded


async def test_reserves_refused_a_connection_queue_no_release() -> None:
    """A reserve whose connection was refused never reached the server: nothing of it is
    released later (a queue of such releases would push real settles out of the writes
    kept for when Redis answers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free again: connections to it are refused
    client = Redis(host="127.0.0.1", port=port)
    backend = RedisBackend(client, namespace=namespace(), outage_wait_s=600)
    limits = Limits(concurrency=5)
    try:
        for _ in range(2):
            outcome = await backend.reserve(limits, ONE, now())
            assert isinstance(outcome, Refusal)
            await asyncio.sleep(outcome.wait_s)  # the backoff: the next one is tried
        assert not backend._link.pending
    finally:
        await backend.aclose()
        await client.aclose()


# -- every call is cancellable -------------------------------------------------------


async def test_a_hung_server_is_cancellable_and_then_counts_as_down(silent_server: int) -> None:
    """A user-built client with no socket timeout against a server that never answers:
    the caller's deadline ends the reserve at once, and on its own the command times
    out, a PING gets no answer either, and it counts as an outage (fail_closed raises)."""
    client = Redis(host="127.0.0.1", port=silent_server)  # no socket timeout
    backend = RedisBackend(client, namespace=namespace(), command_timeout_s=0.5)
    limits = Limits(rpm=10)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await backend.reserve(limits, ONE, now())
    cancelled_after_s = time.monotonic() - started
    await backend.aclose()
    backend = RedisBackend(client, namespace=namespace(), command_timeout_s=0.5, outage_wait_s=0)
    started = time.monotonic()
    with pytest.raises(ratekit.BackendUnavailableError):
        await backend.reserve(limits, ONE, now())
    down_after_s = time.monotonic() - started
    print(
        f"\nhung server: cancelled after {cancelled_after_s:.3f} s, down after {down_after_s:.3f} s"
    )
    assert cancelled_after_s < 0.5
    # One timeout for the command, one for a PING that tells slow from gone.
    assert 0.9 < down_after_s < 2.5
    await backend.aclose()
    await client.aclose()


@pytest.mark.redis
async def test_a_slow_server_that_answers_is_waited_for_on_a_url_built_client(
    redis_server: RedisServer,
) -> None:
    """A backend built from a URL, its round trip's reply held back for 2.4 command
    timeouts while the server answers a PING on a new connection: busy, not gone. The
    reserve is admitted when the reply comes, and nothing counts as an outage (the
    client's sockets have no timeout of their own that would give up first)."""
    upstream_port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    opened: list[asyncio.StreamWriter] = []
    held: set[asyncio.StreamWriter] = set()  # whose replies are held back
    hold_s = 0.0

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        opened.append(writer)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if sink is writer and writer in held:
                        await asyncio.sleep(hold_s)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend(
        f"redis://127.0.0.1:{port}/0", namespace=namespace(), command_timeout_s=0.5
    )
    limits = Limits(rpm=100)
    try:
        assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
        # The connections open now are held back; a PING's new one goes straight through.
        held.update(opened)
        hold_s = 1.2
        started = time.monotonic()
        grant = await asyncio.wait_for(backend.reserve(limits, ONE, now()), 5)
        waited_s = time.monotonic() - started
        assert isinstance(grant, RedisGrant)
        assert not grant.local
        assert waited_s >= 1.2
        assert backend._link.failures == 0
    finally:
        hold_s = 0.0
        await backend.aclose()
        server.close()


async def test_callers_waiting_behind_a_hung_server_fail_over_together(
    silent_server: int,
) -> None:
    """300 callers queued on a hung server all fall back (local policy) within about one
    command timeout (and its PING), not one timeout each."""
    client = Redis(host="127.0.0.1", port=silent_server)
    backend = RedisBackend(
        client, namespace=namespace(), command_timeout_s=0.3, on_unavailable="local"
    )
    limits = Limits(rpm=10**6)
    started = time.monotonic()
    outcomes = await asyncio.gather(*(backend.reserve(limits, ONE, now()) for _ in range(300)))
    took_s = time.monotonic() - started
    assert all(isinstance(outcome, RedisGrant) and outcome.local for outcome in outcomes)
    assert took_s < 1.5
    await backend.aclose()
    await client.aclose()


async def test_a_grant_that_arrives_after_its_caller_left_is_handed_back() -> None:
    """The server admitted, the caller was cancelled before hearing: the backend refunds
    the grant, so it neither holds a slot nor counts."""
    client = GatedRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=1, rpm=100)
    reserve = asyncio.create_task(backend.reserve(limits, ONE, now()))
    await client.executed.wait()  # admitted on the server
    reserve.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reserve
    client.gate.set()
    await asyncio.sleep(0.05)  # the refund is sent in the background
    stats = await statistics(backend, limits)
    assert stats["concurrency"].used == 0
    assert stats["rpm"].used == 0
    assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
    await backend.aclose()


async def test_a_settle_returns_before_redis_answers_it_and_a_snapshot_waits_for_it() -> None:
    """A settle is posted, not awaited: it returns while Redis has not answered it (its
    caller goes on, and its next reserve can share the settle's round trip). The slot
    is back once Redis has run it, and a statistics snapshot taken meanwhile waits for
    its reply, so that it counts it."""
    client = GatedRedis()
    client.gate.set()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=1, rpm=100)
    grant = await backend.reserve(limits, ONE, now())
    assert isinstance(grant, RedisGrant)
    client.gate.clear()
    client.executed.clear()
    await asyncio.wait_for(backend.settle(limits, grant, ONE, now()), 1)
    await client.executed.wait()  # run on the server, its reply held back
    snapshot = asyncio.create_task(statistics(backend, limits))
    await asyncio.sleep(0.05)
    assert not snapshot.done()
    client.gate.set()
    stats = await snapshot
    assert stats["concurrency"].used == 0
    assert stats["rpm"].used == 1
    assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
    await backend.aclose()


async def test_a_release_heard_while_a_refusal_is_on_its_way_is_not_waited_out() -> None:
    """A caller's try is refused on the server while the slot is taken; the slot's
    release is heard here before that refusal comes back (its settle ran after the
    try, its notice came first). The caller asks again at once instead of waiting for
    a wake-up that already happened (here: until the holder's lease would lapse)."""
    client = GatedRedis()
    client.gate.set()
    backend = RedisBackend(client, namespace=namespace(), lease_ttl_s=30.0)
    limiter = ratekit.Limiter(Limits(concurrency=1, rpm=1000), backend=backend)

    async def acquire() -> Any:
        return await limiter.acquire()

    # A first wait, so that the limiter listens to the account's release notices.
    first = await limiter.acquire()
    queued = asyncio.create_task(acquire())
    await asyncio.sleep(0.2)
    await first.release()
    held = await asyncio.wait_for(queued, 5)
    await asyncio.sleep(0.2)
    client.gate.clear()
    client.executed.clear()
    second = asyncio.create_task(acquire())
    await client.executed.wait()  # refused on the server, its reply held back
    try_gate, client.gate = client.gate, asyncio.Event()
    client.gate.set()  # everything else goes through
    await held.release()  # its settle runs after the try, and is answered
    await asyncio.sleep(0.2)  # its notice arrives too: all before the refusal
    try_gate.set()
    admission = await asyncio.wait_for(second, 5)
    await admission.release()
    await backend.aclose()


async def test_a_sender_cancelled_during_its_round_trip_ends() -> None:
    """redis-py can swallow a cancel that arrives while it reads a reply: the sender
    sees it and ends, instead of waiting idle for ever (the loop's shutdown, which
    cancels every task and waits for each, would wait with it)."""
    for steps in range(8):
        backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
        limits = Limits(concurrency=2, rpm=100)
        grant = await backend.reserve(limits, ONE, now())
        await backend.settle(limits, grant, ONE, now())  # posted: a sender takes it
        for _ in range(steps):
            await asyncio.sleep(0)
        senders = [t for t in backend._link.tasks if "_send_loop" in repr(t.get_coro())]
        for task in senders:
            task.cancel()
        _, running = await asyncio.wait(senders, timeout=2)
        assert not running, f"a sender cancelled {steps} steps in runs on"
        await backend.aclose()


@pytest.mark.parametrize("started", [False, True])
async def test_a_woken_sender_cancelled_before_it_runs_leaves_the_work_to_another(
    started: bool,
) -> None:
    """The sender woken for a reserve (a resting one, or one just started) is cancelled
    before it runs, while the loop runs on (an application cancelling tasks): another
    sender sends the reserve; nothing waits for ever."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    limits = Limits(rpm=10**6)
    if started:
        await backend.reserve(limits, ONE, now())  # a sender runs, and rests
    reserve = asyncio.create_task(backend.reserve(limits, ONE, now()))
    await asyncio.sleep(0)  # the reserve is queued, its sender woken, not run yet
    senders = [t for t in backend._link.tasks if "_send_loop" in repr(t.get_coro())]
    assert len(senders) == 1
    assert not senders[0].done()
    senders[0].cancel()
    assert isinstance(await asyncio.wait_for(reserve, 2), RedisGrant)
    await backend.aclose()


async def test_a_sender_that_fails_fails_the_waiting_work_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender that fails outside a round trip (a bug) fails the calls waiting in the
    queue with its error, at once, instead of handing them to new senders that would
    fail the same way for ever; the error is raised again by aclose."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    limits = Limits(rpm=10**6)
    assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
    starts = 0

    def planted(self: Any) -> list[Any]:
        nonlocal starts
        starts += 1
        raise RuntimeError("planted")

    monkeypatch.setattr(type(backend._link), "_take_batch", planted)
    with pytest.raises(RuntimeError, match="planted"):
        await asyncio.wait_for(backend.reserve(limits, ONE, now()), 2)
    assert starts == 1
    monkeypatch.undo()
    with pytest.raises(ExceptionGroup) as raised:
        await backend.aclose()
    assert [str(error) for error in raised.value.exceptions] == ["planted"]


async def run_python(script: str, *argv: str) -> None:
    """Run `script` in a Python process of its own with `argv`; it must exit 0."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# A process whose event loop ends (asyncio.run returns) with the backend still open,
# right after its calls: argv is the URL and the account.
_LEAVER = """
import asyncio, sys
import ratekit
from ratekit.backends.redis import RedisBackend

from redis.asyncio import Redis

# The server busy for 0.3 s (a script that spins on TIME): what is sent meanwhile waits.
BUSY = (
    "local t = redis.call('TIME') local start = t[1] * 1e6 + t[2] "
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > 300000"
)

async def main() -> None:
    # One sender: a settle on its way keeps the refunds behind it in the queue.
    backend = RedisBackend(sys.argv[1], namespace=sys.argv[2], connections=1)
    slots = ratekit.Limiter(ratekit.Limits(concurrency=100, rpm=10**6), backend=backend)
    requests = ratekit.Limiter(ratekit.Limits(rpm=10**6), backend=backend.child("requests"))

    async def call() -> None:
        async with slots.acquire(tokens=0):
            await asyncio.sleep(0)

    await asyncio.gather(*(call() for _ in range(50)))
    held = await slots.acquire(tokens=0)
    refunds = [await requests.acquire() for _ in range(5)]  # no lease: a refund alone
    probe = Redis.from_url(sys.argv[1])
    busy = asyncio.create_task(probe.eval(BUSY, 0))
    await asyncio.sleep(0.1)
    await held.release()
    await asyncio.sleep(0.05)  # its settle on its way, while the server is busy
    for admission in refunds:
        await admission.refund()  # queued behind it

asyncio.run(main())
"""


@pytest.mark.redis
async def test_a_process_that_leaves_without_closing_its_backend_still_ends_its_calls(
    fresh_server: RedisServer,
) -> None:
    """Settles and refunds still on their way when the loop shuts down (asyncio.run's
    end, the backend never closed) are sent then: every slot is free at once, not only
    when the leases lapse, every refunded request is given back, and the process exits
    at once."""
    account = namespace()
    for _ in range(3):
        started = time.monotonic()
        await run_python(_LEAVER, fresh_server.url, account)
        assert time.monotonic() - started < 20
        backend = RedisBackend(fresh_server.url, namespace=account)
        stats = await statistics(backend, Limits(concurrency=100, rpm=10**6))
        refunds = await statistics(backend.child("requests"), Limits(rpm=10**6))
        await backend.aclose()
        assert stats["concurrency"].used == 0
        assert refunds["rpm"].used == 0


# A process whose loop ends while its sender waits for a new connection, with refunds of
# admissions without a lease queued: argv is the URL and the account.
_CONNECTING_LEAVER = """
import asyncio, sys
import ratekit
from ratekit.backends.redis import RedisBackend

async def main() -> None:
    backend = RedisBackend(sys.argv[1], namespace=sys.argv[2])
    requests = ratekit.Limiter(ratekit.Limits(rpm=10**6), backend=backend)
    admissions = [await requests.acquire() for _ in range(5)]  # no lease: a refund alone
    await backend.client.connection_pool.disconnect()  # the next command connects anew
    for admission in admissions:
        await admission.refund()
    await asyncio.sleep(0)  # the sender starts, and waits for its connection

asyncio.run(main())
"""


@pytest.mark.redis
async def test_refunds_whose_sender_was_still_connecting_at_the_loops_end_are_sent(
    fresh_server: RedisServer,
) -> None:
    """The loop shuts down while the sender waits for a connection, nothing of its batch
    written: the batch goes back to the queue and is sent by the shutdown's flush, so
    the refunds of admissions without a lease (which are never replayed, for they may
    have arrived) are not lost."""
    for _ in range(3):
        account = namespace()
        await run_python(_CONNECTING_LEAVER, fresh_server.url, account)
        backend = RedisBackend(fresh_server.url, namespace=account)
        stats = await statistics(backend, Limits(rpm=10**6))
        await backend.aclose()
        assert stats["rpm"].used == 0


@pytest.mark.redis
async def test_a_sender_cancelled_while_the_loop_runs_on_leaves_its_batch_to_another(
    fresh_server: RedisServer,
) -> None:
    """An application cancels its other tasks (a common way to stop; here ratekit's) while
    ratekit's sender waits for a connection of a full blocking pool, then goes on: the
    settle it had taken is sent by another sender once a connection is free, and
    `drain` returns instead of waiting for a command that nobody would send."""
    pool = BlockingConnectionPool.from_url(fresh_server.url, max_connections=6, timeout=30)
    client = Redis(connection_pool=pool)
    backend = RedisBackend(client, namespace=namespace(), connections=1)
    limiter = ratekit.Limiter(Limits(concurrency=5, rpm=100), backend=backend)
    held: list[Any] = []
    try:
        admission = await limiter.acquire()
        await backend.drain()
        with contextlib.suppress(TimeoutError):
            while True:  # every connection taken by someone else
                held.append(await asyncio.wait_for(pool.get_connection(), 0.1))
        await admission.release()  # its settle posted: the sender waits for a connection
        await asyncio.sleep(0.05)
        assert backend._link.senders == 1
        for task in list(backend._link.tasks):  # what the application's cancel reaches
            task.cancel()
        await asyncio.sleep(0.05)
        for connection in held:
            await pool.release(connection)
        held.clear()
        await asyncio.wait_for(backend.drain(), 5)
        stats = await statistics(backend, Limits(concurrency=5, rpm=100))
        assert stats["concurrency"].used == 0
    finally:
        for connection in held:
            await pool.release(connection)
        await backend.aclose()
        await client.aclose()


@pytest.mark.redis
async def test_a_pool_that_wants_a_command_name_is_served(fresh_server: RedisServer) -> None:
    """A connection pool whose get_connection still requires a command name (redis-py
    before 5.3 has no default for it) serves ratekit's commands."""

    class Pool(ConnectionPool):
        async def get_connection(  # type: ignore[override]
            self, command_name: str, *keys: Any, **options: Any
        ) -> Any:
            assert isinstance(command_name, str)
            return await super().get_connection()

    client = Redis(connection_pool=Pool.from_url(fresh_server.url))
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=5, rpm=100)
    try:
        grant = await backend.reserve(limits, ONE, now())
        assert isinstance(grant, RedisGrant)
        await backend.settle(limits, grant, ONE, now())
        stats = await statistics(backend, limits)
        assert (stats["concurrency"].used, stats["rpm"].used) == (0, 1)
    finally:
        await backend.aclose()
        await client.aclose()


class CountingPool(ConnectionPool):
    """A connection pool that counts the connections it hands out and gets back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0
        self.given_back = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super().get_connection(*args, **kwargs)
        self.taken += 1
        return connection

    async def release(self, connection: Any) -> None:
        self.given_back += 1
        await super().release(connection)

    @property
    def out(self) -> int:
        return self.taken - self.given_back


@pytest.mark.redis
async def test_one_task_calling_in_a_loop_keeps_one_connection_until_it_idles(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that calls again and again is served on the connections its senders
    keep: none taken from the pool for 50 admissions once they run, given back once
    the senders have had nothing to send for a while (only the release listener's
    stays out), and none left out at close."""
    # A linger no stall of a busy machine between two calls outlasts; short at the end.
    monkeypatch.setattr(redis_backend_module, "_LINGER_S", 60.0)
    pool = CountingPool.from_url(redis_server.url)
    client = Redis(connection_pool=pool)
    backend = RedisBackend(client, namespace=namespace())
    limiter = ratekit.Limiter(Limits(concurrency=10, rpm=10**6), backend=backend)
    try:
        for _ in range(5):
            async with limiter.acquire():
                pass
        # The release listener takes its connection once subscribed: on a slow machine
        # that may come after the first calls (a full CI run met it once), so it is
        # waited for, and what is counted from here is the calls' own.
        observer = Redis.from_url(redis_server.url)
        channel = backend._channel.encode()
        for _ in range(200):
            if dict(await observer.pubsub_numsub(channel)).get(channel):
                break
            await asyncio.sleep(0.02)
        await observer.aclose()
        taken = pool.taken
        for _ in range(50):
            async with limiter.acquire():
                pass
        assert pool.taken == taken  # no connection taken from the pool per call
        held = pool.out
        assert held <= 2  # one sender's (a settle and the next reserve go together), the listener's
        monkeypatch.setattr(redis_backend_module, "_LINGER_S", 0.05)
        async with limiter.acquire():  # its sender then rests with the short linger
            pass
        await asyncio.sleep(0.5)
        assert pool.out < held
        assert pool.out <= 1  # the release listener's subscription
        async with limiter.acquire():
            pass
        stats = await statistics(backend, limiter.limits)
        assert (stats["concurrency"].used, stats["rpm"].used) == (0, 57)
    finally:
        await backend.aclose()
    assert pool.out == 0
    await client.aclose()


@pytest.mark.redis
async def test_a_small_blocking_pool_is_not_kept_from_the_users_own_calls(
    redis_server: RedisServer,
) -> None:
    """In a pool too small to leave spare connections (two: the release listener
    and one sender), a sender gives its connection back after each batch, as
    before it kept one: the user's own commands on the client are served while a
    task calls in a loop, instead of waiting for a connection that never frees."""
    pool = BlockingConnectionPool.from_url(redis_server.url, max_connections=2, timeout=1)
    client = Redis(connection_pool=pool)
    backend = RedisBackend(client, namespace=namespace())
    limiter = ratekit.Limiter(Limits(concurrency=10, rpm=10**6), backend=backend)
    stop = asyncio.Event()

    async def calls() -> None:
        while not stop.is_set():
            async with limiter.acquire():
                await asyncio.sleep(0.005)

    task = asyncio.create_task(calls())
    try:
        await asyncio.sleep(0.1)
        for i in range(3):
            await client.set(f"{namespace()}-own", i)  # ConnectionError after 1 s if starved
    finally:
        stop.set()
        await task
        await backend.aclose()
        await client.aclose()


# redis-py's reply parsers: its default (hiredis's, which the `redis` extra installs),
# and its own pure-Python one (what a client without hiredis uses).
PARSERS = {"default": {}, "python": {"parser_class": _AsyncRESP3Parser}}


@pytest.mark.redis
@pytest.mark.parametrize("parser", sorted(PARSERS))
async def test_a_kept_connection_the_server_closed_is_replaced_without_an_outage(
    fresh_server: RedisServer, parser: str
) -> None:
    """The server closes every client connection while a sender rests with one (a
    restart of the proxy, CLIENT KILL, an idle timeout): the next call is served on a
    new connection, and nothing counts as an outage."""
    client = Redis.from_url(fresh_server.url, **PARSERS[parser])
    harness = Redis.from_url(fresh_server.url)
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=10, rpm=10**6)
    try:
        grant = await backend.reserve(limits, ONE, now())
        await backend.settle(limits, grant, ONE, now())
        await backend.drain()
        killed = await harness.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
        await asyncio.sleep(0.05)  # the close reaches this process
        for _ in range(3):
            grant = await backend.reserve(limits, ONE, now())
            assert isinstance(grant, RedisGrant)
            await backend.settle(limits, grant, ONE, now())
        await backend.drain()
        assert backend._link.failures == 0
        stats = await statistics(backend, limits)
        assert (stats["concurrency"].used, stats["rpm"].used) == (0, 4)
    finally:
        await backend.aclose()
        await client.aclose()
        await harness.aclose()


@pytest.mark.redis
@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("decode", [False, True])
async def test_releases_are_heard_on_a_client_of_another_encoding(
    fresh_server: RedisServer, decode: bool, parser: str
) -> None:
    """Two pods whose clients encode text as Latin-1 (decoding replies or not), on an
    account whose name is not ASCII: a caller waiting for a slot in one pod is admitted
    as soon as the other pod releases it (the notice is heard), not when the holder's
    lease would lapse; a tier whose name is not ASCII reaches the other pod intact."""
    account = f"café-{uuid.uuid4().hex[:8]}"
    clients = [
        Redis.from_url(
            fresh_server.url, encoding="latin-1", decode_responses=decode, **PARSERS[parser]
        )
        for _ in range(2)
    ]
    backends = [RedisBackend(c, namespace=account, lease_ttl_s=30.0) for c in clients]
    limits = Limits(concurrency=1, rpm=1000)
    holder, waiter = (ratekit.Limiter(limits, backend=b) for b in backends)
    try:
        held = await holder.acquire()

        async def take() -> Any:
            return await waiter.acquire()

        waiting = asyncio.create_task(take())
        await asyncio.sleep(0.5)  # refused, listening for the release
        assert not waiting.done()
        started = time.monotonic()
        await held.release()
        admission = await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - started < 5  # the notice, not the lease's 30 s
        await admission.release()
        heard: list[str] = []
        backends[1].on_tier(heard.append)
        await backends[0].publish_tier("pro-ü")
        assert await backends[1].shared_tier() == "pro-ü"
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == ["pro-ü"]
    finally:
        for backend in backends:
            await backend.aclose()
        for client in clients:
            await client.aclose()


async def test_a_cancel_arriving_with_the_reply_is_never_lost() -> None:
    """A cancel delivered in the very step the reply arrives (what Python 3.11's
    wait_for can swallow): the caller is cancelled, and the grant handed back."""
    client = GatedRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=1, rpm=100)
    outcomes: list[str] = []
    for _ in range(30):
        client.gate.clear()
        client.executed.clear()
        reserve = asyncio.create_task(backend.reserve(limits, ONE, now()))
        await client.executed.wait()
        client.gate.set()
        reserve.cancel()
        try:
            grant = await reserve
        except asyncio.CancelledError:
            outcomes.append("cancelled")
        else:
            outcomes.append("granted")
            await backend.settle(limits, grant, None, now())
        await asyncio.sleep(0.01)
        stats = await statistics(backend, limits)
        assert stats["concurrency"].used == 0
        assert stats["rpm"].used == 0
    assert outcomes == ["cancelled"] * 30
    await backend.aclose()


@pytest.mark.redis
async def test_a_cancellation_storm_never_admits_a_cancelled_caller(
    redis_server: RedisServer,
) -> None:
    """500 reserves cancelled at random instants on a real server, before, during and
    after their round trip: every grant a caller received is counted once, and nothing
    a cancelled caller was given is held or counted."""
    client = Redis.from_url(redis_server.url)
    backend = RedisBackend(client, namespace=namespace(), lease_ttl_s=30.0)
    limits = Limits(concurrency=40, rpm=10**6)
    await statistics(backend, limits)  # scripts loaded
    rng = random.Random(9)
    outcomes: list[str] = []
    late_grants = 0
    refund_orphan = backend._refund_orphan

    def spy(binding: Any, demand: Demand, lease_id: str, future: Any) -> None:
        nonlocal late_grants
        if not future.cancelled() and future.exception() is None and int(future.result()[0]):
            late_grants += 1
        refund_orphan(binding, demand, lease_id, future)

    backend._refund_orphan = spy  # type: ignore[method-assign]

    async def caller() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(rng.uniform(0, 0.06), task.cancel)
        try:
            grant = await backend.reserve(limits, ONE, now())
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            return
        if isinstance(grant, Refusal):
            outcomes.append("refused")
            return
        outcomes.append("granted")
        with contextlib.suppress(asyncio.CancelledError):
            await backend.settle(limits, grant, ONE, now())  # the call was made

    try:
        await asyncio.gather(*(caller() for _ in range(500)))
        await asyncio.sleep(0.2)  # late refunds
        stats = await statistics(backend, limits)
    finally:
        await backend.aclose()
        await client.aclose()
    counts = {kind: outcomes.count(kind) for kind in ("granted", "refused", "cancelled")}
    print(f"\nstorm: {counts}, {late_grants} granted after their caller left (refunded)")
    assert stats["concurrency"].used == 0
    assert stats["rpm"].used == counts["granted"]
    assert counts["cancelled"] > 0


# -- reserves that wait together run as one -----------------------------------------------


def settle_runs(backend: RedisBackend) -> list[int]:
    """How many admissions each settle script run `backend` sends from now on ends."""
    runs: list[int] = []
    wire = backend._link._wire

    def spy(command: Any) -> tuple[Any, ...]:
        if command.args[:2] == ("EVALSHA", SETTLE.sha):
            runs.append(command.args[6].count("|") + 1)  # its lease ids
        return wire(command)

    backend._link._wire = spy  # type: ignore[method-assign]
    return runs


def reserve_runs(backend: RedisBackend) -> list[str]:
    """The demands (ARGV[7]) of each reserve script run `backend` sends from now on, as
    sent: a run waits alone for its round trip in these tests."""
    runs: list[str] = []
    wire = backend._link._wire  # what goes out for each command sent

    def spy(command: Any) -> tuple[Any, ...]:
        if command.args[:2] == ("EVALSHA", RESERVE.sha):
            runs.append(command.args[-1])
        return wire(command)

    backend._link._wire = spy  # type: ignore[method-assign]
    return runs


@pytest.mark.redis
async def test_gathered_reserves_of_one_account_run_as_one_script(
    fresh_server: RedisServer,
) -> None:
    """Seven reserves and a reserve_many of three gathered on one account run as ONE
    reserve script on the server (a child account's, gathered with them, as one of its
    own): each caller gets its own grants and leases, every one counted once."""
    client = Redis.from_url(fresh_server.url)
    backend = RedisBackend(client, namespace=namespace(), lease_ttl_s=60.0)
    child = backend.child("model")
    limits = Limits(concurrency=100, rpm=1000)
    try:
        for account in (backend, child):  # scripts loaded, connections made
            warm = await account.reserve(limits, ONE, now())
            assert isinstance(warm, RedisGrant)
            await account.settle(limits, warm, None, now())
        await backend.drain()  # the refunds are posted, not awaited
        await client.config_resetstat()
        outcomes = await asyncio.gather(
            *(backend.reserve(limits, ONE, now()) for _ in range(4)),
            backend.reserve_many(limits, [ONE] * 3, now()),
            child.reserve(limits, ONE, now()),
            *(backend.reserve(limits, ONE, now()) for _ in range(3)),
        )
        evalsha = (await client.info("commandstats"))["cmdstat_fcall"]["calls"]
        grants: list[Any] = [*outcomes[:4], *outcomes[6:]]
        many, refusal = outcomes[4]  # type: ignore[misc]
        assert refusal is None
        grants += many
        assert evalsha == 2  # the account's ten demands, and the child's one (FCALLs)
        assert all(isinstance(grant, RedisGrant) for grant in [*grants, outcomes[5]])
        assert len({grant.lease_id for grant in grants}) == 10
        stats = await statistics(backend, limits)
        assert stats["concurrency"].used == 10
        assert stats["rpm"].used == 10
        assert (await statistics(child, limits))["rpm"].used == 1
        for grant in grants:
            await backend.settle(limits, grant, ONE, now())
        stats = await statistics(backend, limits)
        assert stats["concurrency"].used == 0
        assert stats["rpm"].used == 10
    finally:
        await backend.aclose()
        await client.aclose()


@pytest.mark.redis
async def test_settles_posted_together_run_as_one_script(fresh_server: RedisServer) -> None:
    """Six settles posted at once on one account (settles of real usage, refunds, and a
    refund of an admission without a lease, on the account and on a child) run as ONE
    settle script per account: each admission ends as it would alone (its slot free, its
    real tokens recorded, a refund's taken back), and each settle hears its own reply."""
    client = Redis.from_url(fresh_server.url)
    backend = RedisBackend(client, namespace=namespace(), lease_ttl_s=60.0)
    child = backend.child("model")
    limits = Limits(concurrency=100, rpm=1000, tpm=100_000, token_counting=TokenCounting.USAGE)
    requests_only = Limits(rpm=1000)
    ask = Demand(1, 100, 0)
    try:
        grants = [await backend.reserve(limits, ask, now()) for _ in range(4)]
        bare = await backend.reserve(requests_only, ONE, now())
        own = await child.reserve(limits, ask, now())
        assert all(isinstance(g, RedisGrant) for g in [*grants, bare, own])
        assert bare.lease_id == "-"  # type: ignore[union-attr]
        await client.config_resetstat()
        await backend.settle(limits, grants[0], Demand(1, 30, 0), now())
        await backend.settle(limits, grants[1], None, now())  # never sent: refunded
        await backend.settle(limits, grants[2], Demand(1, 250, 0), now())
        await child.settle(limits, own, Demand(1, 40, 0), now())
        await backend.settle(limits, grants[3], Demand(1, 0, 0), now())
        await backend.settle(requests_only, bare, None, now())  # no lease: a refund alone
        await backend.drain()
        calls = (await client.info("commandstats"))["cmdstat_fcall"]["calls"]
        # The account's four (one run), the child's one, the refund under other limits.
        assert calls == 3
        stats = await statistics(backend, limits)
        assert stats["concurrency"].used == 0
        assert stats["rpm"].used == 3  # the refunded call is taken back
        assert stats["tpm"].used == 30 + 250 + 0
        assert stats["tpm"].in_flight == 0
        child_stats = await statistics(child, limits)
        assert (child_stats["concurrency"].used, child_stats["tpm"].used) == (0, 40)
        assert (await statistics(backend, requests_only))["rpm"].used == 3
    finally:
        await backend.aclose()
        await client.aclose()


async def test_settles_run_as_one_end_each_admission_as_alone() -> None:
    """Random admissions and ends (settles of random usage, refunds, leases that lapsed
    first, refunds of admissions without a lease): each batch of settles posted at once
    leaves the account as the same settles sent one by one do, on every window and in
    every lease's reply."""
    rng = random.Random(7)
    limits = Limits(
        concurrency=50, rpm=500, tpm=20_000, tpd=10**6, token_counting=TokenCounting.SAFE
    )
    requests_only = Limits(rpm=10**6)
    clock = FakeClock()
    together = RedisBackend(fakeredis.FakeAsyncRedis(), namespace="a", server_time=False)
    alone = RedisBackend(fakeredis.FakeAsyncRedis(), namespace="a", server_time=False)
    replies: dict[str, list[Any]] = {"together": [], "alone": []}

    def spy(backend: RedisBackend, name: str) -> None:
        settled = backend._settled

        def record(lease: str, command: Any, tenant: Any, future: Any) -> None:
            replies[name].append((lease, future.result()))
            settled(lease, command, tenant, future)

        backend._settled = record  # type: ignore[method-assign]

    spy(together, "together")
    spy(alone, "alone")
    runs = settle_runs(together)
    try:
        for _ in range(12):
            demands = [Demand(1, rng.choice([0, 50, 400]), 0) for _ in range(rng.randint(1, 9))]
            ends = [
                None if rng.random() < 0.3 else Demand(1, rng.choice([0, 20, 900]), 0)
                for _ in demands
            ]
            batches = []
            for backend in (together, alone):
                grants = [await backend.reserve(limits, d, clock.instant()) for d in demands]
                assert all(isinstance(g, RedisGrant) for g in grants)
                batches.append(grants)
            if rng.random() < 0.3:
                clock.advance(11)  # past the leases' 10 s: they lapsed, not renewed
                # A demand the tokens in flight leave no room for: its refusal reclaims
                # the lapsed leases (their settles then find them gone).
                for backend in (together, alone):
                    big = await backend.reserve(limits, Demand(1, 19_999, 0), clock.instant())
                    if isinstance(big, RedisGrant):
                        await backend.settle(limits, big, None, clock.instant())
                        await backend.drain()
            for grant, end in zip(batches[0], ends, strict=True):
                await together.settle(limits, grant, end, clock.instant())
            del runs[:]
            await together.drain()
            assert runs == [len(demands)]  # one run of them all
            for grant, end in zip(batches[1], ends, strict=True):
                await alone.settle(limits, grant, end, clock.instant())
                await alone.drain()
            # Admissions without a lease always find it "live" (and a credit's refund,
            # see `_Credit`, comes when the credit ends): the leases' replies are compared.
            assert [live for lease, live in replies["together"] if lease != NO_LEASE] == [
                live for lease, live in replies["alone"] if lease != NO_LEASE
            ]
            assert await together.statistics(limits, clock.instant()) == await alone.statistics(
                limits, clock.instant()
            )
            # Admissions of requests alone (no lease), refunded together.
            bare = [
                [await backend.reserve(requests_only, ONE, clock.instant()) for _ in demands]
                for backend in (together, alone)
            ]
            for grant in bare[0]:
                await together.settle(requests_only, grant, None, clock.instant())
            await together.drain()
            for grant in bare[1]:
                await alone.settle(requests_only, grant, None, clock.instant())
                await alone.drain()
            assert await together.statistics(requests_only, clock.instant()) == (
                await alone.statistics(requests_only, clock.instant())
            )
            clock.advance(rng.choice([0.5, 7, 31]))
        assert 0 in [live for _, live in replies["together"]]  # some leases had lapsed
    finally:
        await together.aclose()
        await alone.aclose()


async def test_a_run_of_gathered_reserves_admits_in_order_and_refuses_the_rest() -> None:
    """Under 100 tokens a minute, gathered reserves of 20 tokens, of (20, 20, 50), of 10 and
    of (10,) run as one: 60 tokens are admitted in order; the 50 is refused with its exact
    wait; the 10s behind it would fit alone but do not jump it: refused too, with the
    same wait and dimension, and nothing is taken for them."""
    clock = FakeClock()
    client = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(client, namespace=namespace(), server_time=False)
    limits = Limits(tpm=100, token_counting=TokenCounting.RESERVE)
    runs = reserve_runs(backend)

    def tokens(amount: int) -> Demand:
        return Demand(0, amount, 0)

    first, many, small, last = await asyncio.gather(
        backend.reserve(limits, tokens(20), clock.instant()),
        backend.reserve_many(limits, [tokens(20), tokens(20), tokens(50)], clock.instant()),
        backend.reserve(limits, tokens(10), clock.instant()),
        backend.reserve_many(limits, [tokens(10)], clock.instant()),
    )
    assert runs == ["0 20 0|0 20 0|0 20 0|0 50 0|0 10 0|0 10 0"]
    assert isinstance(first, RedisGrant)
    granted, refusal = many  # type: ignore[misc]
    assert [grant.demand.tokens for grant in granted] == [20, 20]
    assert all(len(grant.indexes) == 1 for grant in [first, *granted])
    assert isinstance(refusal, Refusal)
    assert refusal.dimension == "tpm"
    assert 60 <= refusal.wait_s <= 61  # the first slice's end, a minute on
    assert small == refusal
    assert last == ([], refusal)
    assert (await statistics(backend, limits, clock.instant()))["tpm"].used == 60
    # Alone, the 10 fits: it was held back by the order alone.
    assert isinstance(await backend.reserve(limits, tokens(10), clock.instant()), RedisGrant)
    await backend.aclose()


async def test_a_caller_that_leaves_before_the_run_is_sent_drops_out_of_it() -> None:
    """Three reserves wait for a sender together and the second caller is cancelled
    before a sender takes them: the one run carries the other two demands only, and
    nothing is reserved for the one that left."""
    client = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=10, rpm=100)
    await statistics(backend, limits)  # a sender idles, woken by the first reserve
    runs = reserve_runs(backend)
    orphans: list[Any] = []
    backend._refund_orphan = lambda *args, **kwargs: orphans.append(args)  # type: ignore[method-assign]
    tasks = [asyncio.create_task(backend.reserve(limits, ONE, now())) for _ in range(3)]
    await asyncio.sleep(0)  # each has joined the run; no sender has taken it yet
    assert len(backend._link.queue) == 1
    tasks[1].cancel()
    first, left, third = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(left, asyncio.CancelledError)
    assert isinstance(first, RedisGrant)
    assert isinstance(third, RedisGrant)
    assert runs == ["1 0 0|1 0 0"]
    assert orphans == []  # nothing came back for the caller who left
    stats = await statistics(backend, limits)
    assert stats["concurrency"].used == 2
    assert stats["rpm"].used == 2
    await backend.aclose()


async def test_a_caller_that_leaves_while_the_run_waits_for_a_connection_drops_out() -> None:
    """Three reserves run as one, but the client's only connection is someone else's:
    the run waits for it, unsent; the second caller leaves meanwhile, and once the
    connection is free the run carries the other two demands alone."""
    client = fakeredis.FakeAsyncRedis(max_connections=1)
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=10, rpm=100)
    runs = reserve_runs(backend)
    taken = await client.connection_pool.get_connection()  # someone else's call
    tasks = [asyncio.create_task(backend.reserve(limits, ONE, now())) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in tasks)  # waiting for the connection
    tasks[1].cancel()
    await asyncio.sleep(0.1)
    await client.connection_pool.release(taken)
    first, left, third = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert isinstance(left, asyncio.CancelledError)
    assert isinstance(first, RedisGrant)
    assert isinstance(third, RedisGrant)
    assert runs[-1] == "1 0 0|1 0 0"
    stats = await statistics(backend, limits)
    assert stats["concurrency"].used == 2
    assert stats["rpm"].used == 2
    assert backend._link.failures == 0
    await backend.aclose()


async def test_a_caller_that_leaves_after_the_run_is_sent_has_its_grant_handed_back() -> None:
    """Three reserves run as one; the second caller is cancelled after the script ran,
    before the reply came: the others keep their grants, and the backend refunds the
    second's alone (its slot and its count), once."""
    client = GatedRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=10, rpm=100)
    runs = reserve_runs(backend)
    tasks = [asyncio.create_task(backend.reserve(limits, ONE, now())) for _ in range(3)]
    await client.executed.wait()  # all three admitted on the server
    tasks[1].cancel()
    client.gate.set()
    first, left, third = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(left, asyncio.CancelledError)
    assert isinstance(first, RedisGrant)
    assert isinstance(third, RedisGrant)
    assert runs == ["1 0 0|1 0 0|1 0 0"]
    await asyncio.sleep(0.05)  # the refund is sent in the background
    stats = await statistics(backend, limits)
    assert stats["concurrency"].used == 2
    assert stats["rpm"].used == 2
    for grant in (first, third):
        await backend.settle(limits, grant, None, now())
    stats = await statistics(backend, limits)
    assert stats["concurrency"].used == 0
    assert stats["rpm"].used == 0
    await backend.aclose()


async def test_gathered_acquires_under_a_tight_limit_are_admitted_in_order() -> None:
    """Six acquires gathered on a limiter of 3 requests a minute over Redis: the first
    three are admitted in one script run; the three refused with them wait in order of
    arrival (the head on the run's wait, nobody retrying in a loop meanwhile), and are
    admitted in that order, in one run, once the window moves on."""
    clock = FakeClock()
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace(), server_time=False)
    limiter = ratekit.Limiter(Limits(rpm=3), backend=backend, clock=clock)
    runs = reserve_runs(backend)
    order: list[int] = []

    async def call(number: int) -> None:
        async with limiter.acquire():
            order.append(number)

    tasks = [asyncio.create_task(call(number)) for number in range(6)]
    await asyncio.sleep(0.2)  # real time: any retry loop would show in the runs
    assert order == [0, 1, 2]
    assert runs[0] == "|".join(["1 0 0"] * 6)
    assert len(runs) <= 2  # the run, and at most the head's retry when notices start
    assert clock.pending_timers == 1  # the head waits for the window; the rest, their turn
    clock.advance(61)
    with anyio.fail_after(5):
        await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4, 5]
    assert runs[-1] == "1 0 0|1 0 0|1 0 0"  # the head and the two behind it
    assert (await statistics(backend, limiter.limits, limiter.instant()))["rpm"].used == 3
    await backend.aclose()


# -- dropped grants ------------------------------------------------------------------


async def test_an_abandoned_grant_frees_its_slot_at_once() -> None:
    """`abandon` (the limiter's hand-back of a dropped admission) settles in the
    background: the slot is free within moments, long before the lease would lapse."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace(), lease_ttl_s=30.0)
    limits = Limits(concurrency=1, rpm=100)
    grant = await backend.reserve(limits, ONE, now())
    backend.abandon(limits, grant, None, now())
    await asyncio.sleep(0.05)
    stats = await statistics(backend, limits)
    assert stats["concurrency"].used == 0
    assert stats["rpm"].used == 0  # abandoned unsent: refunded
    assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
    await backend.aclose()


async def test_a_dropped_grant_stops_being_renewed_and_its_lease_lapses() -> None:
    """A grant nobody holds any more is not renewed: its slot comes back when its lease
    lapses. A grant still held keeps its slot however long."""
    lease_ttl_s = 0.3
    backend = RedisBackend(
        fakeredis.FakeAsyncRedis(), namespace=namespace(), lease_ttl_s=lease_ttl_s
    )
    limits = Limits(concurrency=1, rpm=10_000)
    held = await backend.reserve(limits, ONE, now())
    await asyncio.sleep(3 * lease_ttl_s)  # renewed all along
    assert isinstance(await backend.reserve(limits, ONE, now()), Refusal)
    await backend.settle(limits, held, ONE, now())

    dropped: Any = await backend.reserve(limits, ONE, now())
    assert isinstance(dropped, RedisGrant)
    dropped_at = time.monotonic()
    del dropped
    gc.collect()
    while isinstance(await backend.reserve(limits, ONE, now()), Refusal):
        assert time.monotonic() - dropped_at < 3 * lease_ttl_s, "a dropped grant's slot is held"
        await asyncio.sleep(0.02)
    back_after_s = time.monotonic() - dropped_at
    print(f"\ndropped grant: slot back after {back_after_s:.3f} s (lease {lease_ttl_s} s)")
    assert back_after_s >= lease_ttl_s * 0.9
    await asyncio.sleep(lease_ttl_s / 2)  # a renewal pass forgets the grants nobody holds
    assert [lease for lease, (ref, _) in backend._live.items() if ref() is None] == []
    await backend.aclose()


# -- background work -------------------------------------------------------------------


async def test_a_queued_write_that_redis_refuses_is_dropped_and_harms_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A settle replayed after an outage that fails for a non-network reason is dropped
    with a warning; the writes after it and every later reserve go through."""
    server = fakeredis.FakeServer()
    backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace=namespace())
    limits = Limits(tpm=1000, token_counting=TokenCounting.USAGE)
    grant = await backend.reserve(limits, Demand(1, 500, 0), now())
    server.connected = False
    backend._link.defer("bogus", ("NOSUCHCOMMAND",), None)
    await backend.settle(limits, grant, Demand(1, 300, 0), now())  # kept for later
    server.connected = True
    backend._link.retry_at = 0.0
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        for _ in range(3):
            assert isinstance(await backend.reserve(limits, Demand(1, 1, 0), now()), RedisGrant)
            await asyncio.sleep(0.05)
    assert "dropped a queued Redis write ('bogus')" in caplog.text
    assert not backend._link.pending
    stats = await statistics(backend, limits)
    assert stats["tpm"].used == 300 + 3  # the settle after the bogus write went through
    await backend.aclose()


async def test_a_failure_in_the_background_is_logged_and_raised_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Background work that fails unexpectedly is logged at once and raised by aclose."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    await backend.reserve(Limits(rpm=10), ONE, now())

    async def broken() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, logger="ratekit.redis"):
        backend._link.spawn(broken())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert "background work failed" in caplog.text
    with pytest.raises(ExceptionGroup) as caught:
        await backend.aclose()
    assert [str(e) for e in caught.value.exceptions] == ["a bug"]


# -- time -----------------------------------------------------------------------------


class SteppableTime:
    """Stands in for the `time` module of fakeredis's TIME command: a server clock that
    an operator can step."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def time(self) -> float:
        return time.time() + self.offset_s


async def test_a_server_clock_stepped_back_stalls_neither_pacing_nor_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TIME stepped back an hour: pacing goes on one per spacing and a full window frees
    up a period later, as if nothing had happened (the account's clock never goes back)."""
    server_time = SteppableTime()
    monkeypatch.setattr(server_mixin, "time", server_time)
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    paced = Limits(rates=(Rate(60, 6.0, "requests", name="paced"),), pacing=True)  # 1 / 0.1 s
    # The schedule may lag by one spacing: two at once, then one per 0.1 s.
    while isinstance(first := await backend.reserve(paced, ONE, now()), RedisGrant):
        pass
    assert isinstance(first, Refusal)
    assert 0 < first.wait_s <= 0.1
    server_time.offset_s -= 3600
    refusal = await backend.reserve(paced, ONE, now())
    assert isinstance(refusal, Refusal)
    assert refusal.wait_s <= 0.1
    await asyncio.sleep(0.12)
    assert isinstance(await backend.reserve(paced, ONE, now()), RedisGrant)

    window = Limits(rates=(Rate(2, 0.5, "requests", name="burst", slices=5),))
    for _ in range(2):
        assert isinstance(await backend.reserve(window, ONE, now()), RedisGrant)
    server_time.offset_s -= 3600
    refusal = await backend.reserve(window, ONE, now())
    assert isinstance(refusal, Refusal)
    assert refusal.wait_s <= 0.7
    await asyncio.sleep(refusal.wait_s + 0.05)
    assert isinstance(await backend.reserve(window, ONE, now()), RedisGrant)
    await backend.aclose()


def test_the_zone_transition_nearest_an_instant() -> None:
    """The offsets around New York's spring change, found from a day before it."""
    change = datetime(2026, 3, 8, 7, tzinfo=UTC).timestamp()  # 2 am EST
    assert zone_transition("America/New_York", change - 86_400) == (-18000.0, change, -14400.0)
    assert zone_transition("America/New_York", change + 86_400) == (-18000.0, change, -14400.0)
    summer = datetime(2026, 7, 1, tzinfo=UTC).timestamp()
    assert zone_transition("America/New_York", summer) == (-14400.0, 0.0, -14400.0)
    assert zone_transition("Asia/Shanghai", change) == (28800.0, 0.0, 28800.0)


def next_midnight(instant: datetime) -> float:
    """The Unix instant of the local midnight that ends `instant`'s day in New York."""
    day = instant.astimezone(NEW_YORK).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=NEW_YORK).timestamp()


@pytest.mark.parametrize(
    "instants",
    [
        # The 23-hour day: filled at 1:30 am EST, before the change; asked again after.
        [datetime(2026, 3, 8, 1, 30, tzinfo=NEW_YORK), datetime(2026, 3, 8, 12, tzinfo=NEW_YORK)],
        # Specs packed the evening before the change, used after it (a new day).
        [datetime(2026, 3, 7, 20, tzinfo=NEW_YORK), datetime(2026, 3, 8, 12, tzinfo=NEW_YORK)],
        # The 25-hour day of the autumn change.
        [datetime(2026, 11, 1, 0, 30, tzinfo=NEW_YORK), datetime(2026, 11, 1, 22, tzinfo=NEW_YORK)],
    ],
    ids=["spring-day", "spring-specs-packed-before", "autumn-day"],
)
async def test_a_calendar_day_is_right_across_a_daylight_saving_change(
    instants: list[datetime],
) -> None:
    """A calendar TPD on Redis resets at the zone's midnight on both sides of a
    daylight-saving change, with the very hints of the memory backend."""
    limits = Limits(tpd=100, tpd_calendar_tz="America/New_York", token_counting="reserve")
    clock = FakeClock(1_000_000.0, wall_start_s=instants[0].timestamp())
    backends = [
        MemoryBackend(),
        RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace(), server_time=False),
    ]
    previous_day = None
    for instant in instants:
        clock.advance(instant.timestamp() - clock.wall())
        new_day = instant.date() != previous_day
        previous_day = instant.date()
        for backend in backends:
            filled = await backend.reserve(limits, Demand(1, 100, 0), clock.instant())
            assert isinstance(filled, Refusal) is not new_day, (backend, instant)
            refusal = await backend.reserve(limits, Demand(1, 1, 0), clock.instant())
            assert isinstance(refusal, Refusal), (backend, instant)
            expected_s = next_midnight(instant) - instant.timestamp()
            assert refusal.wait_s == pytest.approx(expected_s, abs=1e-6), (backend, instant)
    clock.advance(expected_s)
    for backend in backends:
        assert not isinstance(
            await backend.reserve(limits, Demand(1, 100, 0), clock.instant()), Refusal
        )
        await backend.aclose()


# -- event loops ------------------------------------------------------------------------


def test_a_second_event_loop_gets_a_clear_error() -> None:
    """A backend first used in one loop refuses another one, with a message that says
    what to do, instead of failing inside redis-py ("Event loop is closed")."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    limits = Limits(rpm=10)
    asyncio.run(backend.reserve(limits, ONE, now()))
    with pytest.raises(ratekit.errors.WrongEventLoopError) as caught:
        asyncio.run(backend.reserve(limits, ONE, now()))
    assert "belongs to the event loop it was first used in (now closed)" in str(caught.value)
    assert "one RedisBackend (and limiter, and scheduler) per event loop" in str(caught.value)


def test_two_threads_loops_the_second_is_refused() -> None:
    """Used from two threads' loops at once: the second gets WrongEventLoopError, the
    first goes on working."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    limits = Limits(rpm=1000)
    first_in = threading.Event()
    second_done = threading.Event()
    results: dict[str, Any] = {}

    def first() -> None:
        async def run() -> None:
            await backend.reserve(limits, ONE, now())
            first_in.set()
            await asyncio.to_thread(second_done.wait, 10)
            results["first"] = await backend.reserve(limits, ONE, now())

        asyncio.run(run())

    def second() -> None:
        first_in.wait(10)
        try:
            asyncio.run(backend.reserve(limits, ONE, now()))
        except ratekit.errors.WrongEventLoopError as exc:
            results["second"] = exc
        finally:
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert isinstance(results["second"], ratekit.errors.WrongEventLoopError)
    assert "(now still running)" in str(results["second"])
    assert isinstance(results["first"], RedisGrant)


def test_trio_gets_a_clear_error() -> None:
    """redis-py's client is asyncio only: under trio the backend says so."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    with pytest.raises(ratekit.errors.WrongEventLoopError, match="runs on asyncio"):
        trio.run(backend.reserve, Limits(rpm=10), ONE, now())


# -- the shared tier ---------------------------------------------------------------------


async def test_the_shared_tier_fails_closed_with_a_typed_error() -> None:
    """With Redis down and fail_closed, reading and publishing the shared tier raise
    BackendUnavailableError, never redis-py's own ConnectionError."""
    server = fakeredis.FakeServer()
    backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace=namespace())
    assert isinstance(backend, SharedAccount)
    server.connected = False
    with pytest.raises(ratekit.BackendUnavailableError):
        await backend.shared_tier()
    with pytest.raises(ratekit.BackendUnavailableError):
        await backend.publish_tier("tier3")
    await backend.aclose()


@pytest.mark.parametrize("policy", ["fail_open", "local"])
async def test_the_shared_tier_is_kept_for_later_when_failing_open(
    policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down and fail_open or local, the shared tier is not known (a typed error:
    the scheduler asks again later) and a published tier is sent once Redis answers
    again (a warning says so)."""
    server = fakeredis.FakeServer()
    backend = RedisBackend(
        fakeredis.FakeAsyncRedis(server=server),
        namespace=namespace(),
        on_unavailable=policy,  # type: ignore[arg-type]
    )
    server.connected = False
    with pytest.raises(ratekit.BackendUnavailableError):
        await backend.shared_tier()
    with caplog.at_level(logging.WARNING, logger="ratekit.redis"):
        await backend.publish_tier("tier3")
    assert "tier 'tier3'" in caplog.text
    assert "once it answers again" in caplog.text
    server.connected = True
    backend._link.retry_at = 0.0
    await backend.reserve(Limits(rpm=10), ONE, now())  # Redis answers: the replay starts
    await asyncio.sleep(0.05)
    assert await backend.shared_tier() == "tier3"
    await backend.aclose()


# -- memory and Redis agree -----------------------------------------------------------------


@pytest.mark.parametrize("counting", [TokenCounting.USAGE, TokenCounting.SAFE])
async def test_real_usage_above_an_estimate_of_zero_counts_on_both_backends(
    counting: TokenCounting,
) -> None:
    """An estimate of 0 tokens that really used 500: both backends count the 500."""
    limits = Limits(tpm=1000, token_counting=counting)
    clock = FakeClock(1_000_000.0)
    used = []
    for backend in (
        MemoryBackend(),
        RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace(), server_time=False),
    ):
        grant = await backend.reserve(limits, Demand(1, 0, 0), clock.instant())
        await backend.settle(limits, grant, Demand(1, 500, 0), clock.instant())
        used.append((await statistics(backend, limits, clock.instant()))["tpm"].used)
        await backend.aclose()
    assert used == [500, 500]


async def test_pause_rejects_a_duration_that_cannot_work() -> None:
    """pause(nan | inf | negative) is a typed error naming the argument."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    for seconds in (math.nan, math.inf, -1.0, 1e308):
        with pytest.raises(ratekit.InvalidArgumentError, match="pause: seconds must be in"):
            await backend.pause(seconds, now())
    await backend.aclose()


async def test_a_closed_backend_says_so_and_lets_late_settles_go() -> None:
    """After aclose a reserve is a typed error naming the backend; a settle of a grant
    still held is dropped quietly (its lease lapses)."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace="closing")
    limits = Limits(rpm=10)
    grant = await backend.reserve(limits, ONE, now())
    child = backend.child("gpt")
    await child.reserve(limits, ONE, now())
    await backend.aclose()
    for closed in (backend, child):
        with pytest.raises(ratekit.BackendUnavailableError, match="is closed"):
            await closed.reserve(limits, ONE, now())
    await backend.settle(limits, grant, ONE, now())


async def test_a_child_counts_apart_and_shares_the_connections() -> None:
    """A child namespace (a model's own limits) counts apart from its parent, over the
    parent's client and turns at sending."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace="parent")
    child = backend.child("model-a")
    assert isinstance(child, RedisBackend)
    assert child._link is backend._link
    assert child.key_prefix() == "ratekit:{parent.model-a}:v2"
    limits = Limits(rpm=1)
    assert isinstance(await child.reserve(limits, ONE, now()), RedisGrant)
    assert isinstance(await child.reserve(limits, ONE, now()), Refusal)
    assert isinstance(await backend.reserve(limits, ONE, now()), RedisGrant)
    with pytest.raises(ratekit.errors.LimitsError, match="child name must be non-empty"):
        backend.child("a{b}")
    await backend.aclose()


async def test_a_failing_tier_callback_does_not_stop_the_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tier callback that raises is logged; release notices still arrive after it."""
    server = fakeredis.FakeServer()
    here = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="tiers")
    there = RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="tiers")
    limits = Limits(concurrency=1)
    woken = asyncio.Event()

    def broken(tier: str) -> None:
        raise RuntimeError(f"cannot apply {tier}")

    here.on_tier(broken)
    here.subscribe(woken.set)
    held = await there.reserve(limits, ONE, now())
    assert isinstance(await here.reserve(limits, ONE, now()), Refusal)  # listening now
    await asyncio.sleep(0.3)
    with caplog.at_level(logging.ERROR, logger="ratekit.redis"):
        await there.publish_tier("tier9")
        await asyncio.sleep(0.2)
    assert "a callback of a Redis notice failed" in caplog.text
    await there.settle(limits, held, ONE, now())
    await asyncio.wait_for(woken.wait(), 5)
    await here.aclose()
    await there.aclose()


async def test_a_refund_sent_again_takes_back_only_once() -> None:
    """A refund whose reply was lost and that is sent again (a replay after a timeout)
    gives back the admission once: another admission's count is not taken with it."""
    backend = RedisBackend(fakeredis.FakeAsyncRedis(), namespace=namespace())
    limits = Limits(rpm=10, concurrency=5)  # a slot: the admission takes a lease
    first = await backend.reserve(limits, ONE, now())
    await backend.reserve(limits, ONE, now())
    assert isinstance(first, RedisGrant)
    assert first.binding is not None
    refund = backend._settle_command(first.binding, first.lease_id, ONE, first.indexes, None, now())
    for _ in range(2):
        await backend._link.call(refund, SETTLE, abortable=False)
    assert (await statistics(backend, limits))["rpm"].used == 1
    await backend.aclose()


async def test_an_admission_of_requests_alone_takes_no_lease_and_sends_no_settle() -> None:
    """Under rates of requests only (no slot, nothing held, nothing to correct) an
    admission is one round trip: no lease, no renewal, and its settle sends nothing.
    Its refund (the call never went out) is sent once, never kept for a replay: sent
    twice it would give back twice."""
    client = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(rpm=10, rates=(Rate(100, 3600),))
    sent: list[tuple[Any, ...]] = []
    wire = backend._link._wire  # what goes out for each command sent

    def counting(command: Any) -> tuple[Any, ...]:
        if command.args[0] != "EXISTS":  # the first call's look for an earlier layout
            sent.append(command.args)
        return wire(command)

    backend._link._wire = counting  # type: ignore[method-assign]
    first = await backend.reserve(limits, ONE, now())
    second = await backend.reserve(limits, ONE, now())
    assert isinstance(first, RedisGrant)
    assert isinstance(second, RedisGrant)
    assert len(sent) == 2
    fields = await client.hkeys(f"{backend.key_prefix()}:state")
    assert not [field for field in fields if field.startswith(b"l|")]
    await backend.settle(limits, first, ONE, now())
    await backend.drain()
    assert len(sent) == 2  # nothing to send
    await backend.settle(limits, second, None, now())
    await backend.drain()  # the refund is posted, not awaited
    assert len(sent) == 3
    assert (await statistics(backend, limits))["rpm"].used == 1
    backend._link.defer(second.lease_id, sent[-1], SETTLE)
    assert not backend._link.pending
    await backend.aclose()


async def test_a_settle_sent_again_does_not_correct_a_reservation_twice() -> None:
    """A settle whose reply was lost is sent again (the replay queue): the provider's own
    count replaces the estimate once, and never takes from what other calls recorded."""
    redis = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(redis, namespace=namespace())
    limits = Limits(tpm=10_000, token_counting=TokenCounting.RESERVE)
    other = await backend.reserve(limits, Demand(1, 3000, 0), now())
    mine = await backend.reserve(limits, Demand(1, 2000, 0), now())
    assert isinstance(other, RedisGrant)
    assert isinstance(mine, RedisGrant)
    actual = Demand(1, 700, 0, 500.0)  # the provider reserved 500 for it at arrival
    command = backend._settle_command(
        mine.binding, mine.lease_id, mine.demand, mine.indexes, actual, None
    )  # type: ignore[arg-type]
    await redis.script_load(SETTLE.text)
    await redis.execute_command(*command)
    assert (await statistics(backend, limits))["tpm"].used == 3500
    await redis.execute_command(*command)  # the same settle, replayed
    assert (await statistics(backend, limits))["tpm"].used == 3500
    await backend.aclose()


async def test_a_count_of_leases_that_are_not_there_does_not_block_the_account() -> None:
    """A state that counts leases it does not hold (left by a version that kept them in
    a key of their own) and knows nothing of their expiries: the next admission that the
    count would refuse counts the leases again and is admitted."""
    client = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=1)
    await client.hset(f"{backend.key_prefix()}:state", "nl", 1)
    held = await backend.reserve(limits, ONE, now())
    assert isinstance(held, RedisGrant)
    assert isinstance(await backend.reserve(limits, ONE, now()), Refusal)
    await backend.settle(limits, held, ONE, now())
    again = await backend.reserve(limits, ONE, now())
    assert isinstance(again, RedisGrant)
    await backend.settle(limits, again, ONE, now())
    await backend.aclose()


async def test_a_lost_state_loses_its_leases_and_no_more() -> None:
    """The state hash gone while calls are in flight (evicted, flushed): its leases went
    with it, so the settles of those calls find them gone and free nothing that the
    admissions after the loss took."""
    client = fakeredis.FakeAsyncRedis()
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=2)
    first = await backend.reserve(limits, ONE, now())
    second = await backend.reserve(limits, ONE, now())
    assert isinstance(first, RedisGrant)
    assert isinstance(second, RedisGrant)
    await client.delete(f"{backend.key_prefix()}:state")
    third = await backend.reserve(limits, ONE, now())
    assert isinstance(third, RedisGrant)
    for grant in (first, second):
        await backend.settle(limits, grant, ONE, now())
    fourth = await backend.reserve(limits, ONE, now())
    assert isinstance(fourth, RedisGrant)
    fifth = await backend.reserve(limits, ONE, now())
    assert isinstance(fifth, Refusal)
    assert fifth.dimension == "concurrency"
    for grant in (third, fourth):
        await backend.settle(limits, grant, ONE, now())
    await backend.aclose()


def _stored(fields: dict[bytes, bytes], leases: dict[str, int]) -> dict[str, str]:
    """An account's state hash with each lease id (in a lease's field and a held
    amount's) replaced by the number of its admission, so that two accounts' can be
    compared."""
    stored = {}
    for name, value in fields.items():
        window, held, lease = name.decode().partition("|h|")
        key = f"{window}|h|#{leases[lease]}" if held else window
        if key.startswith("l|"):
            key = f"l|#{leases[key[2:]]}"
        stored[key] = value.decode()
    return stored


@pytest.mark.redis
@pytest.mark.parametrize("counting", list(TokenCounting))
@pytest.mark.parametrize("seed", range(3))
async def test_settles_sent_with_the_next_reserves_as_one_step_end_as_if_sent_alone(
    redis_server: RedisServer, steps: list[Any], counting: TokenCounting, seed: int
) -> None:
    """A random run of admissions and their ends (refunds, tokens below and above the
    estimate, tokens the provider counted) on two accounts at the same instants: on one
    each end goes out with the next reserves, as one step (step.lua); on the other it is
    answered before they are sent. Every reply, and each account's stored state after
    every operation, are the same."""
    rng = random.Random(seed)
    limits = Limits(concurrency=4, rpm=30, tpm=3000, tpd=20000, token_counting=counting)
    client = Redis.from_url(redis_server.url)
    stepped, alone = (
        RedisBackend(client, namespace=namespace(), server_time=False) for _ in range(2)
    )
    clock = FakeClock(1000.0, wall_start_s=1_700_000_000.0)
    held: list[tuple[RedisGrant, RedisGrant]] = []
    # Each account's lease ids, numbered in the order of their admissions.
    leases: tuple[dict[str, int], dict[str, int]] = ({}, {})

    async def state(backend: RedisBackend, numbers: dict[str, int]) -> dict[str, str]:
        return _stored(await client.hgetall(f"{backend._prefix}:state"), numbers)

    try:
        for _ in range(120):
            clock.advance(rng.choice([0.0, 0.0, 0.5, 3.0, 11.0]))
            if held and rng.random() < 0.5:
                grants = held.pop(rng.randrange(len(held)))
                if rng.random() < 0.2:
                    actual = None  # never sent: all handed back
                else:
                    tokens = rng.choice([0.0, 50.0, 150.0, 400.0])
                    counted = rng.choice([math.nan, math.nan, 120.0, 300.0])
                    actual = Demand(1, tokens, 0, counted)
                await alone.settle(limits, grants[1], actual, clock.instant())
                await alone.drain()
                await stepped.settle(limits, grants[0], actual, clock.instant())  # posted: no await
            demand = Demand(1, rng.choice([0.0, 100.0, 200.0]))
            replies = [
                await backend.reserve(limits, demand, clock.instant())
                for backend in (stepped, alone)
            ]
            if isinstance(replies[0], RedisGrant):
                assert isinstance(replies[1], RedisGrant)
                assert replies[0].indexes == replies[1].indexes
                held.append((replies[0], replies[1]))
                for numbers, grant in zip(leases, replies, strict=True):
                    numbers[grant.lease_id] = len(numbers)
            else:
                assert replies[0] == replies[1]
            await stepped.drain()
            assert await state(stepped, leases[0]) == await state(alone, leases[1])
        assert len(steps) >= 20  # the run went through steps, not only the two scripts
    finally:
        await stepped.aclose()
        await alone.aclose()
        await client.aclose()


@pytest.mark.redis
async def test_a_task_calling_in_a_loop_runs_one_script_per_call(fresh_server: RedisServer) -> None:
    """One task admits, settles and admits again, on 4 dimensions: each settle goes out
    with the next reserve as one step, so the server runs one FCALL per call and, in
    all, at most 8 commands (INFO commandstats, the scripts' own calls included)."""
    client = Redis.from_url(fresh_server.url)
    harness = Redis.from_url(fresh_server.url)
    backend = RedisBackend(client, namespace=namespace())
    limits = Limits(concurrency=100, rpm=10**6, tpm=10**9, tpd=10**10)
    limiter = ratekit.Limiter(limits, backend=backend)
    calls = 50
    try:
        for _ in range(5):
            async with limiter.acquire(tokens=100) as admission:
                admission.settle(tokens=80)
        await backend.drain()
        await harness.config_resetstat()
        for _ in range(calls):
            async with limiter.acquire(tokens=100) as admission:
                admission.settle(tokens=80)
        await backend.drain()
        stats = await harness.info("commandstats")
        ran = {
            name.removeprefix("cmdstat_"): int(entry["calls"])
            for name, entry in stats.items()
            if name not in ("cmdstat_config|resetstat", "cmdstat_info")
        }
        # The last settle goes alone (nothing follows it): one FCALL more, and its commands.
        assert ran["fcall"] == calls + 1
        assert sum(ran.values()) <= 8 * (calls + 1)
        used = await statistics(backend, limits)
        assert (used["concurrency"].used, used["rpm"].used) == (0, 5 + calls)
    finally:
        await backend.aclose()
        await client.aclose()
        await harness.aclose()


async def test_a_lapsed_lease_is_reclaimed_by_a_refusal_and_no_renewal_brings_it_back() -> None:
    """A holder that stopped renewing (its process hung or died): once its lease lapsed,
    the first admission its slot or hold would refuse reclaims both and is admitted; a
    renewal of that lease afterwards does not make it again, and its settle frees
    nothing that others hold."""
    client = fakeredis.FakeAsyncRedis()
    clock = FakeClock()
    backend = RedisBackend(client, namespace=namespace(), server_time=False, lease_ttl_s=10)
    limits = Limits(concurrency=1, tpm=1000, token_counting=TokenCounting.SAFE)
    state = f"{backend.key_prefix()}:state"
    stopped = await backend.reserve(limits, Demand(1, 600, 0), clock.instant())
    assert isinstance(stopped, RedisGrant)
    clock.advance(9)
    early = await backend.reserve(limits, Demand(1, 600, 0), clock.instant())
    assert isinstance(early, Refusal)
    assert early.dimension == "concurrency"
    assert early.wait_s == pytest.approx(1.0)  # until the lease lapses
    clock.advance(2)
    taken = await backend.reserve(limits, Demand(1, 600, 0), clock.instant())
    assert isinstance(taken, RedisGrant)  # the slot and the 600 tokens held came back
    assert f"l|{stopped.lease_id}".encode() not in await client.hkeys(state)

    clock.advance(1)
    assert (await statistics(backend, limits, clock.instant()))["concurrency"].used == 1
    assert await backend._renew()  # both grants are still held: both are renewed
    lease = await client.hget(state, f"l|{taken.lease_id}")
    assert lease is not None
    assert float(lease) == pytest.approx(clock.now() + 10)
    assert f"l|{stopped.lease_id}".encode() not in await client.hkeys(state)
    assert isinstance(await backend.reserve(limits, ONE, clock.instant()), Refusal)

    await backend.settle(limits, stopped, None, clock.instant())
    used = await statistics(backend, limits, clock.instant())
    assert used["concurrency"].used == 1
    assert used["tpm"].in_flight == 600
    await backend.settle(limits, taken, None, clock.instant())
    assert (await statistics(backend, limits, clock.instant()))["concurrency"].used == 0
    await backend.aclose()
