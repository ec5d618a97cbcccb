"""How the scripts reach a real server: as one function library run by FCALL, loaded
once and again after a flush or a restart, or as scripts run by EVALSHA on a server
without functions. No permit is lost on the way."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as redis

from ratekit import Limits
from ratekit.backends import Demand, Refusal
from ratekit.backends._scripts import LIBRARY
from ratekit.backends.redis import RedisBackend, RedisGrant
from ratekit.clock import FakeClock, Instant

from .redis_server import NO_FUNCTIONS, RedisServer, require_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ONE = Demand(1, 0, 0)
LIMITS = Limits(concurrency=2, rpm=100)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def bare_server() -> Iterator[RedisServer]:
    """A redis-server of one test alone that has no functions (FCALL and FUNCTION are
    unknown commands, as before Redis 7.0)."""
    server = RedisServer(require_redis_server(), extra=NO_FUNCTIONS)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def probe(fresh_server: RedisServer) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(fresh_server.url, decode_responses=True)
    yield client
    await client.aclose()


def now() -> Instant:
    return Instant(time.monotonic(), time.time())


def backend_on(url: str) -> RedisBackend:
    return RedisBackend(url, namespace=uuid.uuid4().hex)


async def calls(client: redis.Redis) -> dict[str, int]:
    """Commands the server ran since its counters were reset, by name."""
    stats: dict[str, Any] = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


async def in_use(backend: RedisBackend) -> dict[str, float]:
    return {d.name: d.used for d in await backend.statistics(LIMITS, now())}


async def test_the_library_is_loaded_once_and_runs_every_script(
    fresh_server: RedisServer, probe: redis.Redis
) -> None:
    """Reserves, settles and statistics, one by one and gathered, all run as FCALLs of
    one library, loaded ahead of the first call (so no call is tried before it) and
    never again."""
    backend = backend_on(fresh_server.url)
    for _ in range(3):
        grant = await backend.reserve(LIMITS, ONE, now())
        assert isinstance(grant, RedisGrant)
        await backend.settle(LIMITS, grant, ONE, now())
    grants = await asyncio.gather(*(backend.reserve(LIMITS, ONE, now()) for _ in range(2)))
    await asyncio.gather(*(backend.settle(LIMITS, g, ONE, now()) for g in grants))  # type: ignore[arg-type]
    assert await in_use(backend) == {"concurrency": 0, "rpm": 5}
    ran = await calls(probe)
    assert ran["function|load"] == 1
    # The gathered reserves run as one, their settles as one; then the statistics. A
    # settle a sender takes with the next reserve runs with it, as one step.
    assert 6 <= ran["fcall"] <= 3 * 2 + 1 + 1 + 1
    assert "evalsha" not in ran
    assert "eval" not in ran
    libraries = await probe.execute_command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY.name)
    assert len(libraries) == 1
    await backend.aclose()


@pytest.mark.parametrize("flush", ["FUNCTION FLUSH", "SCRIPT FLUSH"])
async def test_a_flush_between_reserve_and_settle_loses_no_permit(
    fresh_server: RedisServer, probe: redis.Redis, flush: str
) -> None:
    """Functions (or scripts) flushed while calls are in flight: the library is loaded
    again and the settles, alone and gathered, end their leases (still live: nothing
    lapsed, nothing counted twice)."""
    backend = backend_on(fresh_server.url)
    first = await backend.reserve(LIMITS, ONE, now())
    second = await backend.reserve(LIMITS, ONE, now())
    assert isinstance(first, RedisGrant)
    assert isinstance(second, RedisGrant)
    await probe.execute_command(*flush.split())
    await backend.settle(LIMITS, first, ONE, now())
    # A settle is posted, not awaited: a snapshot waits for it, before the next flush.
    assert await in_use(backend) == {"concurrency": 1, "rpm": 2}
    await probe.execute_command(*flush.split())
    third = await backend.reserve(LIMITS, ONE, now())
    assert isinstance(third, RedisGrant)
    await probe.execute_command(*flush.split())
    await asyncio.gather(
        backend.settle(LIMITS, second, ONE, now()), backend.settle(LIMITS, third, ONE, now())
    )
    assert await in_use(backend) == {"concurrency": 0, "rpm": 3}
    ran = await calls(probe)
    assert ran["function|load"] == (1 if flush == "SCRIPT FLUSH" else 4)
    assert "evalsha" not in ran
    await backend.aclose()


async def test_the_library_is_loaded_again_after_a_restart(fresh_server: RedisServer) -> None:
    """A server restarted (nothing kept) gets the library again from the first call."""
    backend = backend_on(fresh_server.url)
    assert isinstance(await backend.reserve(LIMITS, ONE, now()), RedisGrant)
    fresh_server.stop()
    fresh_server.start()
    deadline = time.monotonic() + 10
    while True:
        grant = await backend.reserve(LIMITS, ONE, now())
        if not isinstance(grant, Refusal):
            break
        assert grant.dimension == "unavailable"  # until the client reconnects
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert isinstance(grant, RedisGrant)
    await backend.settle(LIMITS, grant, ONE, now())
    assert await in_use(backend) == {"concurrency": 0, "rpm": 1}
    probe = redis.Redis.from_url(fresh_server.url, decode_responses=True)
    assert (await calls(probe))["function|load"] == 1
    await probe.aclose()
    await backend.aclose()


async def test_a_server_without_functions_runs_the_scripts_by_evalsha(
    bare_server: RedisServer,
) -> None:
    """FCALL is an unknown command: the link learns it from its first reply and runs
    every script by EVALSHA from then on (loaded again after a flush), never trying
    FCALL again."""
    backend = backend_on(bare_server.url)
    probe = redis.Redis.from_url(bare_server.url, decode_responses=True)

    async def errors() -> dict[str, int]:
        stats: dict[str, Any] = await probe.info("errorstats")
        return {name.removeprefix("errorstat_"): int(e["count"]) for name, e in stats.items()}

    grant = await backend.reserve(LIMITS, ONE, now())
    assert isinstance(grant, RedisGrant)
    before = await errors()  # the first FCALL's unknown command among them
    await probe.script_flush()
    await backend.settle(LIMITS, grant, ONE, now())
    # A settle is posted, not awaited: a snapshot waits for it.
    assert await in_use(backend) == {"concurrency": 0, "rpm": 1}
    grant = await backend.reserve(LIMITS, ONE, now())
    assert isinstance(grant, RedisGrant)
    await probe.script_flush()
    await backend.settle(LIMITS, grant, ONE, now())
    assert await in_use(backend) == {"concurrency": 0, "rpm": 2}
    after = await errors()
    assert after.get("ERR") == before.get("ERR")  # no unknown command since
    assert after["NOSCRIPT"] == 2  # the settle after each flush (then all are loaded)
    grants = await asyncio.gather(*(backend.reserve(LIMITS, ONE, now()) for _ in range(2)))
    await probe.script_flush()
    await asyncio.gather(*(backend.settle(LIMITS, g, ONE, now()) for g in grants))  # type: ignore[arg-type]
    assert await in_use(backend) == {"concurrency": 0, "rpm": 4}
    ran = await calls(probe)
    # + the statistics, + those sent again after NOSCRIPT
    # (the two gathered reserves run as one, and so do their settles)
    assert ran["evalsha"] == 4 * 2 - 2 + 3 + (await errors())["NOSCRIPT"]
    assert "fcall" not in ran
    await probe.aclose()
    await backend.aclose()


@pytest.mark.parametrize("functions", [True, False])
async def test_a_settle_and_the_next_reserve_run_as_one_step_also_after_a_flush(
    request: pytest.FixtureRequest, steps: list[Any], functions: bool
) -> None:
    """Each settle goes out with the next reserve as one step (step.lua), as a function
    or, on a server without functions, by EVALSHA; a flush just before one of them
    (the function or the script gone) has it loaded again and sent again, once."""
    server: RedisServer = request.getfixturevalue("fresh_server" if functions else "bare_server")
    backend = backend_on(server.url)
    probe = redis.Redis.from_url(server.url, decode_responses=True)
    grant = await backend.reserve(LIMITS, ONE, now())
    for flush in (False, True, False):
        if flush:
            await (probe.function_flush() if functions else probe.script_flush())
        await backend.settle(LIMITS, grant, ONE, now())  # posted: goes with the reserve
        grant = await backend.reserve(LIMITS, ONE, now())
        assert isinstance(grant, RedisGrant)
    await backend.settle(LIMITS, grant, ONE, now())
    assert await in_use(backend) == {"concurrency": 0, "rpm": 4}
    assert len(steps) == 3
    await probe.aclose()


# Four dimensions, none of them near its limit.
FOUR = Limits(concurrency=10, rpm=1000, tpm=10**6, tpd=10**7)


async def ran_since(probe: redis.Redis, before: dict[str, int]) -> dict[str, int]:
    """The commands the server ran since `before` (see `calls`), the probe's own left out."""
    after = await calls(probe)
    ran = {name: count - before.get(name, 0) for name, count in after.items()}
    return {name: count for name, count in ran.items() if count and name != "info"}


async def test_an_admission_of_four_dimensions_runs_four_commands_and_its_settle_five(
    fresh_server: RedisServer, probe: redis.Redis
) -> None:
    """Once the account exists, a reserve of four dimensions with a slot runs FCALL, TIME,
    HMGET and HSET on the server (its lease is a field of the state: no key of its own to
    write or to keep alive), and its settle FCALL, TIME, HMGET, HSET and HDEL."""
    backend = backend_on(fresh_server.url)
    demand, used = Demand(1, 100, 0), Demand(1, 80, 0)
    for _ in range(3):
        grant = await backend.reserve(FOUR, demand, now())
        assert isinstance(grant, RedisGrant)
        await backend.settle(FOUR, grant, used, now())
    await backend.drain()
    for _ in range(3):
        before = await calls(probe)
        grant = await backend.reserve(FOUR, demand, now())
        assert isinstance(grant, RedisGrant)
        assert await ran_since(probe, before) == {"fcall": 1, "time": 1, "hmget": 1, "hset": 1}
        before = await calls(probe)
        await backend.settle(FOUR, grant, used, now())
        await backend.drain()
        settled = {"fcall": 1, "time": 1, "hmget": 1, "hset": 1, "hdel": 1}
        assert await ran_since(probe, before) == settled
    await backend.aclose()


async def test_a_refusal_scans_the_leases_only_when_one_may_have_lapsed(
    fresh_server: RedisServer, probe: redis.Redis
) -> None:
    """Refusals while no lease can have lapsed read no lease: their wait for a release
    is the earliest expiry, kept in the state. One renewed leaves that a bound below the
    earliest, and the next such refusal scans the leases once; so does the first refusal
    after the earliest lease lapsed, which reclaims it."""
    clock = FakeClock()
    backend = RedisBackend(
        fresh_server.url, namespace=uuid.uuid4().hex, server_time=False, lease_ttl_s=10
    )
    limits = Limits(concurrency=1)

    async def refused(expected_wait_s: float, scans: int) -> None:
        before = await calls(probe)
        refusal = await backend.reserve(limits, ONE, clock.instant())
        assert isinstance(refusal, Refusal)
        assert refusal.dimension == "concurrency"
        assert refusal.wait_s == pytest.approx(expected_wait_s)
        ran = await ran_since(probe, before)
        assert ran.get("hscan", 0) == scans, ran
        # The clock given: no TIME; the key's ttl set by every call (see finish).
        assert set(ran) <= {"fcall", "hmget", "hset", "pexpire", "hscan"}, ran

    held = await backend.reserve(limits, ONE, clock.instant())
    assert isinstance(held, RedisGrant)
    clock.advance(1)
    await refused(9, scans=0)
    clock.advance(4)
    await refused(5, scans=0)
    assert await backend._renew()  # at 5 s, the backend's last instant: until 15 s
    clock.advance(2)
    await refused(8, scans=1)
    clock.advance(1)
    await refused(7, scans=0)
    clock.advance(9)  # past 15 s: the holder stopped renewing
    before = await calls(probe)
    again = await backend.reserve(limits, ONE, clock.instant())
    assert isinstance(again, RedisGrant)
    assert (await ran_since(probe, before)).get("hscan", 0) == 1
    await backend.settle(limits, again, ONE, clock.instant())
    await backend.aclose()
