"""Admissions through Redis: ratekit's RedisBackend beside raw EVALSHA, limits and pyrate-limiter.

Run from the repository root::

    python -m bench.redis [--seconds S | --iterations N] [--concurrency C]
                          [--bursts N,N...] [--memory-ops M] [--json FILE]

It starts its own redis-server on a free loopback port, then measures, in one run:

- calls per second, one task (latency-bound) and `concurrency` tasks on one
  asyncio loop, for ratekit (1 and 4 dimensions, acquire + settle + release),
  ratekit's own Lua scripts sent as plain EVALSHAs through redis-py (no ratekit
  Python layer), limits' Redis storage (three strategies), pyrate-limiter's
  `RedisBucket`, and the floor: a raw ``EVALSHA`` of ``return 1``;
- what one call costs: round trips and commands written by the client (counted
  by a redis-py connection class of the bench's own, so nothing is patched),
  commands run by the server (``INFO commandstats`` deltas, calls made inside
  scripts included), the server's read events, and CPU on both sides;
- bursts of many gathered callers (`bursts`, one call each): calls per second
  and the client connections each library holds for them (``INFO clients``);
- the Redis memory of one account after `memory-ops` admissions under
  ``Limits(rpm=200_000, tpm=100_000_000)``, spread over a whole window (ratekit
  runs on a fake clock, so the minute is compressed), and what limits and
  pyrate-limiter keep for the same traffic.

The project's goals, against the floor (a raw EVALSHA of `return 1`): with one
task, a rate-only admission (nothing to release: one round trip) costs <= 1.2x the
floor's time per call, and an admission with a concurrency slot <= 2.2x (judged on
a slot and rpm, and on 4 dimensions with a settle); with 16 tasks, rate-only
admissions reach >= 0.8x the floor's calls/s; an admission of 4 dimensions runs
<= 8 server commands.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.metadata
import itertools
import json
import os
import platform
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench._common import BenchError, Op, Subject, positive_int, require
from ratekit.testing import SERVER_HINT, RedisServer, redis_server_binary

# A limit no benchmark run comes near: requests (or tokens) per period.
HUGE = 10**9
EXTRA_HINT = "pip install -e '.[bench,redis]'"
# Import name -> distribution name of every library the bench needs.
PEERS = {"redis": "redis", "limits": "limits", "pyrate_limiter": "pyrate-limiter"}
FLOOR = "raw EVALSHA `return 1`"
RAW_ONE = "raw EVALSHA, ratekit's 1-dim script"
RAW_FOUR = "raw EVALSHA x2, ratekit's 4-dim scripts"
ONE = "ratekit, 1 dimension"
# The same with RedisBackend(credits=False): every admission a round trip.
ONE_ROUND_TRIP = "ratekit, 1 dimension, credits off"
GOAL = "ratekit, 4 dimensions"
# A concurrency slot and a rate, nothing settled: the time goal's case as the issue words it.
SLOT = "ratekit, slot + rpm"
# The project's goals, per call against the floor's (one task: time; 16: calls/s).
ONE_TIME_GOAL = 1.2  # a rate-only admission: one round trip, nothing to release
FOUR_TIME_GOAL = 2.2  # a slot (and a settle): one round trip more
ONE_RATE_GOAL = 0.8
SERVER_COMMANDS_GOAL = 8.0  # per admission of 4 dimensions
ROUND_TRIPS = {ONE: 1.0, ONE_ROUND_TRIP: 1.0, SLOT: 2.0, GOAL: 2.0}
# The account of the memory section: StepFun V5's 200,000 RPM.
MEMORY_RPM = 200_000
MEMORY_TPM = 100_000_000
# ARGV positions (0-based, after the keys) of the lease id in ratekit's scripts
# (reserve.lua's ARGV[4], settle.lua's ARGV[3]); checked against a recorded admission.
RESERVE_LEASE_ARG = 3
SETTLE_LEASE_ARG = 2
# Commands of the harness (its INFO and FLUSHALL) and of a connection's handshake:
# not counted against a contender.
HARNESS_COMMANDS = frozenset(
    {"info", "flushall", "config|resetstat", "hello", "client|setinfo", "client|setname", "select"}
)
# Seconds a subject may take to close before the bench reports it and moves on.
CLOSE_TIMEOUT_S = 5.0
# Sequential calls before a burst (scripts loaded, a first connection open), and
# how long a burst may last before it is reported as timed out.
BURST_WARMUP_OPS = 10
BURST_TIMEOUT_S = 120.0


# -- the wire: what the contenders' clients write ---------------------------------------


@dataclass
class Wire:
    """What the contenders' clients wrote (a tally, or its change over a run).

    A round trip is one write the client then waits on: a lone command, or a
    pipeline however many commands it carries. A connection's handshake (HELLO,
    CLIENT SETINFO) counts as the connection, not as round trips or commands.
    """

    round_trips: int = 0
    commands: int = 0
    connections: int = 0

    def since(self, before: Wire) -> Wire:
        return Wire(
            self.round_trips - before.round_trips,
            self.commands - before.commands,
            self.connections - before.connections,
        )


# Every client built by `_client` tallies here; the harness's own client does not.
WIRE = Wire()
# While a list, the arguments of every command those clients write are appended to it.
RECORDED: list[tuple[Any, ...]] | None = None


def _unpack(buffer: bytes) -> list[tuple[str, ...]]:
    """The commands of a buffer in the Redis protocol, each as its text arguments."""
    commands: list[tuple[str, ...]] = []
    at = 0
    while at < len(buffer):
        end = buffer.index(b"\r\n", at)
        count, at = int(buffer[at + 1 : end]), end + 2
        words: list[str] = []
        for _ in range(count):
            end = buffer.index(b"\r\n", at)
            size, at = int(buffer[at + 1 : end]), end + 2
            words.append(buffer[at : at + size].decode())
            at += size + 2
        commands.append(tuple(words))
    return commands


@functools.cache
def _counting_connection() -> type[Any]:
    """redis-py's asyncio `Connection`, tallying in `WIRE` what it writes.

    Built on first use, so that the module imports without redis-py (the bench
    then exits naming the package to install).
    """
    from redis.asyncio import Connection

    class CountingConnection(Connection):
        # True while the connection's handshake is written (counted as the connection).
        _handshaking = False

        async def on_connect_check_health(self, check_health: bool = True) -> None:
            WIRE.connections += 1
            self._handshaking = True
            try:
                await super().on_connect_check_health(check_health)
            finally:
                self._handshaking = False

        async def _send_packed_command(self, command: Any) -> None:
            # Every write of a connection reaches the wire here: redis-py's commands
            # (single, pipelined) through its public send_packed_command, and ratekit's
            # own packed buffers directly (see ratekit's `_exchange`).
            if not self._handshaking:
                data = b"".join(command)
                WIRE.round_trips += 1
                # Commands are flat arrays of bulk strings: one starts at each "\r\n*".
                WIRE.commands += data.count(b"\r\n*") + 1
                if RECORDED is not None:
                    RECORDED.extend(_unpack(data))
            await super()._send_packed_command(command)

    return CountingConnection


def _client(url: str) -> Any:
    """A redis-py asyncio client whose connections tally in `WIRE` (the pool's defaults)."""
    from redis.asyncio import Redis

    return Redis.from_url(url, connection_class=_counting_connection())


def _harness_client(url: str) -> Any:
    from redis.asyncio import Redis

    return Redis.from_url(url)


# -- the server -------------------------------------------------------------------------


def require_redis_server(tool: str = "bench.redis") -> str:
    """The redis-server binary, or exit (as `tool`) naming the package that provides it."""
    binary = redis_server_binary()
    if binary is None:
        raise SystemExit(
            f"{tool}: redis-server is not on PATH; install it ({SERVER_HINT}) and run again"
        )
    return binary


@dataclass(frozen=True)
class ServerStats:
    """redis-server's counters from one ``INFO stats cpu commandstats clients``, or
    their change between two such snapshots (`since`)."""

    # Calls per command, those made inside scripts included.
    commands: dict[str, int]
    # Microseconds spent in EVALSHA/EVAL (the scripts, their own commands included).
    script_us: float
    # Read events on client sockets (total_reads_processed): a pipeline that
    # arrives in one packet is one read.
    reads: int
    # redis-server's user + system CPU seconds.
    cpu_s: float
    # Client connections open (connected_clients), the harness's own included.
    clients: int

    @classmethod
    async def take(cls, harness: Any) -> ServerStats:
        info = await harness.info("stats", "cpu", "commandstats", "clients")
        commands = {
            key.removeprefix("cmdstat_"): int(value["calls"])
            for key, value in info.items()
            if key.startswith("cmdstat_")
        }
        script_us = sum(
            float(info.get(f"cmdstat_{name}", {}).get("usec", 0))
            for name in ("evalsha", "eval", "fcall")
        )
        return cls(
            commands,
            script_us,
            int(info["total_reads_processed"]),
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            int(info["connected_clients"]),
        )

    def since(self, before: ServerStats) -> ServerStats:
        """The change from `before`, without the harness's commands (and the one read
        of the INFO that took this snapshot)."""
        commands = {
            name: calls - before.commands.get(name, 0)
            for name, calls in self.commands.items()
            if name not in HARNESS_COMMANDS and calls > before.commands.get(name, 0)
        }
        return ServerStats(
            commands,
            self.script_us - before.script_us,
            self.reads - before.reads - 1,
            self.cpu_s - before.cpu_s,
            self.clients - before.clients,
        )


# -- the contenders ---------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """A library configuration to measure: `build(url)` makes a fresh `Subject` in the loop.

    `path` says what one call does; `raw` names the contender that sends the same
    commands as plain redis-py EVALSHAs, if there is one.
    """

    name: str
    path: str
    build: Callable[[str], Awaitable[Subject]]
    raw: str | None = None


def require_peers() -> None:
    """Exit with the install command when ratekit or a peer library cannot be imported."""
    require("bench.redis", PEERS, "ratekit.backends.redis", EXTRA_HINT)


def _check(name: str, admitted: bool) -> None:
    if not admitted:
        raise BenchError(f"{name} refused an admission under a huge limit")


def _one_dimension() -> Any:
    import ratekit

    return ratekit.Limits(rpm=HUGE)


def _four_dimensions() -> Any:
    import ratekit

    return ratekit.Limits(concurrency=10**6, rpm=HUGE, tpm=10**12, tpd=10**13)


def _slot_and_rate() -> Any:
    import ratekit

    return ratekit.Limits(concurrency=10**6, rpm=HUGE)


# What a ratekit contender's calls are: "rate" (rpm alone), "slot" (a concurrency slot
# and rpm) or "four" (concurrency, rpm, tpm, tpd, with tokens and a settle).
_LIMITS = {"rate": _one_dimension, "slot": _slot_and_rate, "four": _four_dimensions}


def _namespace() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


async def _raw_floor(url: str) -> Subject:
    client = _client(url)
    sha = await client.script_load("return 1")

    async def op() -> None:
        await client.evalsha(sha, 0)

    return Subject(op, client.aclose)


def _ratekit_op(limiter: Any, shape: str) -> Op:
    """acquire (+ settle on 4 dimensions) + release, the way an LLM call would use it."""
    if shape == "four":

        async def op() -> None:
            async with limiter.acquire(tokens=100) as admission:
                admission.settle(tokens=80)

        return op

    async def op_one() -> None:
        async with limiter.acquire():
            pass

    return op_one


def _ratekit_subject(url: str, shape: str, credits: bool = True) -> Subject:
    """ratekit's Limiter over a fresh RedisBackend account, on a counting client
    (`credits`: RedisBackend's option)."""
    import ratekit
    from ratekit.backends.redis import RedisBackend

    client = _client(url)
    backend = RedisBackend(client, namespace=_namespace(), credits=credits)
    limits = _LIMITS[shape]()
    limiter = ratekit.Limiter(limits, backend=backend)

    async def close() -> None:
        try:
            await backend.aclose()
        finally:
            await client.aclose()  # a client passed in is left open by the backend

    return Subject(_ratekit_op(limiter, shape), close, backend.drain)


def _ratekit(shape: str, credits: bool = True) -> Callable[[str], Awaitable[Subject]]:
    async def build(url: str) -> Subject:
        return _ratekit_subject(url, shape, credits)

    return build


def _with_lease(call: tuple[Any, ...], position: int, lease_id: str) -> tuple[Any, ...]:
    """`call` (sha, numkeys, *keys, *args) with args[position] replaced by `lease_id`."""
    at = 2 + int(call[1]) + position
    return (*call[:at], lease_id, *call[at + 1 :])


# What runs one of ratekit's scripts: EVALSHA <sha>, or FCALL <its function in the library>.
SCRIPT_VERBS = ("EVALSHA", "FCALL")


async def _run_script(client: Any, call: tuple[Any, ...]) -> Any:
    """`call` (sha or function, numkeys, *keys, *args) sent as ratekit sent it."""
    name = str(call[0])
    verb = "EVALSHA" if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else "FCALL"
    return await client.execute_command(verb, *call)


async def _record_ratekit(url: str, shape: str) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """The reserve and settle (None when none is sent) of one ratekit admission, each
    as EVALSHA's arguments (sha, numkeys, *keys, *args), recorded from what its client
    wrote: one that goes to Redis (no credit drawn or used)."""
    global RECORDED
    subject = _ratekit_subject(url, shape, credits=False)
    try:
        await subject.op()  # loads the scripts, starts the release listener
        await subject.drain()  # its settle is posted: out before the recording starts
        RECORDED = []
        try:
            await subject.op()
            await subject.drain()  # the settle of the admission recorded
            calls = [args[1:] for args in RECORDED if str(args[0]).upper() in SCRIPT_VERBS]
        finally:
            RECORDED = None
    finally:
        await close_subject("ratekit (recording)", subject)
    if len(calls) == 1 and shape == "rate":
        return calls[0], None  # requests only: no lease, nothing to settle
    if len(calls) != 2:
        raise BenchError(f"expected ratekit to send 2 scripts per admission, saw {len(calls)}")
    reserve, settle = calls
    reserve_lease = reserve[2 + int(reserve[1]) + RESERVE_LEASE_ARG]
    settle_lease = settle[2 + int(settle[1]) + SETTLE_LEASE_ARG]
    if reserve_lease != settle_lease:
        raise BenchError(
            f"the lease id is no longer reserve's ARGV[{RESERVE_LEASE_ARG + 1}] and settle's "
            f"ARGV[{SETTLE_LEASE_ARG + 1}] ({reserve_lease!r} != {settle_lease!r}): "
            "update RESERVE_LEASE_ARG and SETTLE_LEASE_ARG"
        )
    return reserve, settle


async def _ratekit_payload(url: str) -> Subject:
    """Two EVALSHA of `return 1` carrying the keys and arguments of ratekit's 4-dimension calls."""
    client = _client(url)
    sha = await client.script_load("return 1")
    recorded, last = await _record_ratekit(url, "four")
    assert last is not None
    reserve, settle = (sha, *recorded[1:]), (sha, *last[1:])

    async def op() -> None:
        await client.evalsha(*reserve)
        await client.evalsha(*settle)

    return Subject(op, client.aclose)


def _ratekit_scripts(shape: str) -> Callable[[str], Awaitable[Subject]]:
    """A builder replaying ratekit's reserve and settle as plain redis-py EVALSHAs.

    The calls are recorded from one real admission, then sent again with a fresh
    lease id each: what the Redis path costs without ratekit's Python layer.
    """

    async def build(url: str) -> Subject:
        reserve, settle = await _record_ratekit(url, shape)
        client = _client(url)
        lease_ids = itertools.count()

        if settle is None:

            async def replay_alone() -> None:
                await _run_script(client, reserve)  # no lease: the same call each time

            return Subject(replay_alone, client.aclose)
        ended = settle

        async def replay() -> None:
            lease_id = f"bench:{next(lease_ids)}"
            await _run_script(client, _with_lease(reserve, RESERVE_LEASE_ARG, lease_id))
            await _run_script(client, _with_lease(ended, SETTLE_LEASE_ARG, lease_id))

        return Subject(replay, client.aclose)

    return build


def _limits_strategy(
    strategy_name: str, per_minute: int = HUGE
) -> Callable[[str], Awaitable[Subject]]:
    """A builder for one `limits.aio` strategy over its redis-py `RedisStorage`."""

    async def build(url: str) -> Subject:
        from limits import RateLimitItemPerMinute
        from limits.aio import strategies
        from limits.aio.storage import RedisStorage
        from redis.asyncio import ConnectionPool

        # limits builds its client from the URL; the pool brings the counting connections.
        pool = ConnectionPool.from_url(url, connection_class=_counting_connection())
        storage = RedisStorage(
            url.replace("redis://", "async+redis://", 1),
            implementation="redispy",
            connection_pool=pool,  # type: ignore[arg-type]  # typed as scalar options
        )
        limiter = getattr(strategies, strategy_name)(storage)
        item = RateLimitItemPerMinute(per_minute)
        identifier = _namespace()

        async def op() -> None:
            _check(strategy_name, await limiter.hit(item, identifier))

        async def close() -> None:
            await pool.disconnect()  # a client given a pool leaves it open

        return Subject(op, close)

    return build


def _pyrate(per_minute: int = HUGE) -> Callable[[str], Awaitable[Subject]]:
    """A builder for pyrate-limiter's `RedisBucket` on an asyncio client, acquired async."""

    async def build(url: str) -> Subject:
        from pyrate_limiter import Duration, Limiter, Rate, RedisBucket

        client = _client(url)
        bucket = await RedisBucket.init([Rate(per_minute, Duration.MINUTE)], client, _namespace())
        limiter = Limiter(bucket)

        async def op() -> None:
            _check("pyrate-limiter", await limiter.try_acquire_async("bench"))

        async def close() -> None:
            limiter.close()  # stops its leaker
            await client.aclose()

        return Subject(op, close)

    return build


def contenders() -> list[Contender]:
    """Everything measured, the floor first."""
    replay = "evalsha(reserve) + evalsha(settle), recorded from ratekit, via redis-py"
    four_dims = "[concurrency, rpm, tpm, tpd]"
    return [
        Contender(FLOOR, "await client.evalsha(sha_of('return 1'), 0)", _raw_floor),
        Contender(
            "raw EVALSHA x2, ratekit's 4-dim payload",
            "2 x evalsha(sha_of('return 1'), keys + args of ratekit's reserve, then settle)",
            _ratekit_payload,
        ),
        Contender(
            RAW_ONE,
            "evalsha(reserve), recorded from ratekit, via redis-py  [rpm]",
            _ratekit_scripts("rate"),
        ),
        Contender(RAW_FOUR, f"{replay}  {four_dims}", _ratekit_scripts("four")),
        Contender(
            ONE,
            "async with limiter.acquire()  [rpm], RedisBackend (credits: most calls"
            " admitted locally)",
            _ratekit("rate"),
            raw=RAW_ONE,
        ),
        Contender(
            ONE_ROUND_TRIP,
            "async with limiter.acquire()  [rpm], RedisBackend(credits=False)",
            _ratekit("rate", credits=False),
            raw=RAW_ONE,
        ),
        Contender(
            GOAL,
            f"async with acquire(tokens=100) as a: a.settle(tokens=80)  {four_dims}",
            _ratekit("four"),
            raw=RAW_FOUR,
        ),
        Contender(SLOT, "async with limiter.acquire()  [concurrency, rpm]", _ratekit("slot")),
        Contender(
            "limits, fixed window",
            "await FixedWindowRateLimiter.hit(item)  [aio RedisStorage, redis-py]",
            _limits_strategy("FixedWindowRateLimiter"),
        ),
        Contender(
            "limits, sliding window counter",
            "await SlidingWindowCounterRateLimiter.hit(item)  [aio RedisStorage, redis-py]",
            _limits_strategy("SlidingWindowCounterRateLimiter"),
        ),
        Contender(
            "limits, moving window",
            "await MovingWindowRateLimiter.hit(item)  [aio RedisStorage, redis-py]",
            _limits_strategy("MovingWindowRateLimiter"),
        ),
        Contender(
            "pyrate-limiter",
            "await Limiter(RedisBucket).try_acquire_async(name)  [redis.asyncio client]",
            _pyrate(),
        ),
    ]


# -- measuring --------------------------------------------------------------------------


class Budget:
    """How long a run lasts, shared by its workers: a count of operations or a deadline."""

    def __init__(self, iterations: int | None, seconds: float) -> None:
        self._left = iterations
        self._deadline = time.perf_counter() + seconds

    def take(self) -> bool:
        """Whether a worker may start one more operation."""
        if self._left is None:
            return time.perf_counter() < self._deadline
        if self._left <= 0:
            return False
        self._left -= 1
        return True


async def close_subject(name: str, subject: Subject) -> None:
    """Close `subject`, bounded: a close that hangs is reported, not waited on."""
    try:
        await asyncio.wait_for(subject.close(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        print(
            f"bench.redis: closing {name} took over {CLOSE_TIMEOUT_S:g} s; moved on",
            file=sys.stderr,
        )


async def _drive(op: Op, budget: Budget, tasks: int) -> int:
    """Run `op` on `tasks` tasks, each looping until the budget is spent; how many ran."""

    async def worker() -> int:
        done = 0
        while budget.take():
            await op()
            done += 1
        return done

    return sum(await asyncio.gather(*(worker() for _ in range(tasks))))


async def _burst(op: Op, tasks: int) -> tuple[int, list[str]]:
    """`tasks` tasks gathered at once, one `op` each: how many succeeded, and the
    distinct errors of those that failed."""
    try:
        async with asyncio.timeout(BURST_TIMEOUT_S):
            outcomes = await asyncio.gather(*(op() for _ in range(tasks)), return_exceptions=True)
    except TimeoutError:
        return 0, [f"timed out after {BURST_TIMEOUT_S:g} s"]
    errors = [
        f"{type(outcome).__name__}: {outcome}"
        for outcome in outcomes
        if isinstance(outcome, BaseException)
    ]
    return tasks - len(errors), errors


@dataclass(frozen=True)
class Run:
    """One timed run of one contender with `tasks` tasks.

    A burst gathers `tasks` callers at once, one call each; otherwise each task
    calls in a loop until the budget is spent.
    """

    name: str
    tasks: int
    burst: bool
    # Calls that succeeded, and those that raised (with their distinct errors).
    operations: int
    failures: int
    errors: list[str]
    elapsed_s: float
    client_cpu_s: float
    # Changes over the timed part.
    server: ServerStats
    wire: Wire
    # Client connections open at the end, less those open before the subject was built.
    clients: int

    @property
    def ops_per_s(self) -> float:
        return self.operations / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def per_op(self, amount: float) -> float:
        return amount / self.operations if self.operations else float("nan")


async def measure(
    contender: Contender,
    url: str,
    harness: Any,
    tasks: int,
    args: argparse.Namespace,
    *,
    burst: bool = False,
) -> Run:
    """Build a fresh subject on an empty database, warm it up, and time it."""
    await harness.flushall()
    built = await ServerStats.take(harness)
    subject = await contender.build(url)
    try:
        if burst:
            await _drive(subject.op, Budget(BURST_WARMUP_OPS, 60.0), 1)
        else:
            warmup_s = min(0.25, args.seconds / 5)
            await _drive(subject.op, Budget(args.warmup, warmup_s), tasks)
        server_before = await ServerStats.take(harness)
        wire_before = dataclasses.replace(WIRE)
        client_before_s = time.process_time()
        start_s = time.perf_counter()
        if burst:
            done, errors = await _burst(subject.op, tasks)
        else:
            budget = Budget(args.iterations, args.seconds)
            done, errors = await _drive(subject.op, budget, tasks), []
        elapsed_s = time.perf_counter() - start_s
        client_cpu_s = time.process_time() - client_before_s
        wire = WIRE.since(wire_before)
        server_after = await ServerStats.take(harness)
    finally:
        await close_subject(contender.name, subject)
    return Run(
        contender.name,
        tasks,
        burst,
        done,
        len(errors),
        sorted(set(errors)),
        elapsed_s,
        client_cpu_s,
        server_after.since(server_before),
        wire,
        server_after.clients - built.clients,
    )


# -- memory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMemory:
    """One Redis key after the memory run: its type, entries (fields, members...) and bytes."""

    key: str
    type: str
    entries: int
    bytes: int


@dataclass(frozen=True)
class Memory:
    """What one contender keeps in Redis after `operations` admissions.

    `per_admission` marks structures that keep one entry per admission in the
    window, so their size is projected linearly to a full window at `MEMORY_RPM`.
    """

    name: str
    operations: int
    keys: list[KeyMemory]
    per_admission: bool
    # Server microseconds in EVALSHA/EVAL per admission during the run.
    script_us: float

    @property
    def bytes(self) -> int:
        return sum(key.bytes for key in self.keys)

    @property
    def projected_bytes(self) -> float:
        if self.per_admission:
            return self.bytes * MEMORY_RPM / self.operations
        return float(self.bytes)


async def _key_memory(harness: Any, key: bytes) -> KeyMemory:
    kind = (await harness.type(key)).decode()
    counters = {
        "hash": harness.hlen,
        "zset": harness.zcard,
        "list": harness.llen,
        "set": harness.scard,
    }
    entries = await counters[kind](key) if kind in counters else 1
    size = await harness.memory_usage(key, samples=0)
    return KeyMemory(key.decode(), kind, int(entries), int(size or 0))


async def _all_keys(harness: Any) -> list[KeyMemory]:
    return [await _key_memory(harness, key) async for key in harness.scan_iter(count=1000)]


async def _ratekit_account(url: str, operations: int) -> tuple[Subject, str]:
    """ratekit at 200k RPM on a fake clock that spreads `operations` over one minute."""
    import ratekit
    from ratekit.backends.redis import RedisBackend

    clock = ratekit.clock.FakeClock(time.monotonic(), wall_start_s=time.time())
    client = _client(url)
    # The limiter's instant instead of the server's TIME: the fake clock's minute.
    backend = RedisBackend(client, namespace=_namespace(), server_time=False)
    limits = ratekit.Limits(rpm=MEMORY_RPM, tpm=MEMORY_TPM)
    limiter = ratekit.Limiter(limits, backend=backend, clock=clock)
    step_s = 60.0 / operations

    async def op() -> None:
        clock.advance(step_s)
        async with limiter.acquire(tokens=500, timeout=0) as admission:
            admission.settle(tokens=400)

    async def close() -> None:
        try:
            await backend.aclose()
        finally:
            await client.aclose()

    return Subject(op, close), backend.key_prefix()


async def _fill(
    harness: Any, name: str, subject: Subject, operations: int, concurrency: int
) -> float:
    """Run `operations` admissions, then close; the server's script µs per admission."""
    before = await ServerStats.take(harness)
    try:
        await _drive(subject.op, Budget(operations, 3600.0), concurrency)
    finally:
        await close_subject(name, subject)
    return (await ServerStats.take(harness)).since(before).script_us / operations


async def measure_memory(url: str, harness: Any, operations: int, concurrency: int) -> list[Memory]:
    """What each library keeps in Redis for one account after `operations` admissions."""
    results = []
    await harness.flushall()
    subject, prefix = await _ratekit_account(url, operations)
    script_us = await _fill(harness, "ratekit memory account", subject, operations, concurrency)
    keys = [key for key in await _all_keys(harness) if key.key.startswith(prefix)]
    results.append(Memory("ratekit, rpm + tpm", operations, keys, False, script_us))
    peers = [
        ("limits, fixed window", _limits_strategy("FixedWindowRateLimiter", MEMORY_RPM), False),
        (
            "limits, sliding window counter",
            _limits_strategy("SlidingWindowCounterRateLimiter", MEMORY_RPM),
            False,
        ),
        ("limits, moving window", _limits_strategy("MovingWindowRateLimiter", MEMORY_RPM), True),
        ("pyrate-limiter", _pyrate(MEMORY_RPM), True),
    ]
    for name, build, per_admission in peers:
        await harness.flushall()
        script_us = await _fill(harness, name, await build(url), operations, concurrency)
        keys = await _all_keys(harness)
        results.append(Memory(name, operations, keys, per_admission, script_us))
    return results


# -- reporting --------------------------------------------------------------------------


def _versions(server_version: str) -> dict[str, str]:
    found = {"redis-server": server_version}
    for name in ["ratekit", *PEERS.values()]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "source tree" if name == "ratekit" else "?"
    return found


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _tasks(count: int) -> str:
    return "1 task" if count == 1 else f"{count:,} tasks"


@dataclass(frozen=True)
class Results:
    """Every run and memory row of one invocation, looked up by contender."""

    contenders: list[Contender]
    runs: list[Run]
    memory: list[Memory]
    levels: tuple[int, ...]
    bursts: tuple[int, ...]

    def run(self, name: str, tasks: int, *, burst: bool = False) -> Run:
        """The run of `name` with `tasks` tasks; of several rounds, the median one (by
        calls per second)."""
        runs = [r for r in self.runs if r.name == name and r.tasks == tasks and r.burst == burst]
        if not runs:
            raise KeyError((name, tasks, burst))
        return sorted(runs, key=lambda r: r.ops_per_s)[len(runs) // 2]

    def ratio(self, name: str, other: str, tasks: int) -> float:
        """Calls/s of `name` over calls/s of `other`, with `tasks` tasks."""
        return self.run(name, tasks).ops_per_s / self.run(other, tasks).ops_per_s


def throughput_table(results: Results) -> str:
    """Calls/s at each concurrency, over the floor and over the same commands sent raw."""
    headers = ["contender"]
    for level in results.levels:
        headers += [f"calls/s, {_tasks(level)}", "÷ floor", "÷ raw", "RT/call"]
    rows = []
    for contender in results.contenders:
        row = [contender.name]
        for level in results.levels:
            run = results.run(contender.name, level)
            raw = contender.raw
            row += [
                f"{run.ops_per_s:,.0f}",
                f"{results.ratio(contender.name, FLOOR, level):.2f}",
                "" if raw is None else f"{results.ratio(contender.name, raw, level):.2f}",
                f"{run.per_op(run.wire.round_trips):.2f}",
            ]
        rows.append(row)
    return _format_table(headers, rows)


def cost_table(results: Results) -> str:
    """Per call, one task: what the client wrote, what the server ran, CPU on each side."""
    headers = [
        "per call (1 task)",
        "round trips",
        "cmds sent",
        "server cmds",
        "in scripts",
        "server reads",
        "script µs",
        "server CPU µs",
        "client CPU µs",
    ]
    rows = []
    for contender in results.contenders:
        run = results.run(contender.name, 1)
        sent = run.per_op(run.wire.commands)
        served = run.per_op(sum(run.server.commands.values()))
        rows.append(
            [
                contender.name,
                f"{run.per_op(run.wire.round_trips):.2f}",
                f"{sent:.2f}",
                f"{served:.2f}",
                f"{served - sent:.2f}",
                f"{run.per_op(run.server.reads):.2f}",
                f"{run.per_op(run.server.script_us):.1f}",
                f"{run.per_op(run.server.cpu_s) * 1e6:.1f}",
                f"{run.per_op(run.client_cpu_s) * 1e6:.1f}",
            ]
        )
    return _format_table(headers, rows)


def command_lines(results: Results) -> list[str]:
    """Each contender's server commands per call, most frequent first (one task)."""
    lines = []
    for contender in results.contenders:
        run = results.run(contender.name, 1)
        parts = sorted(run.server.commands.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{command} {run.per_op(calls):.2f}" for command, calls in parts)
        lines.append(f"  {contender.name}: {shown}")
    return lines


def burst_table(results: Results) -> str:
    """Gathered callers, one call each: calls/s, round trips, connections, failures."""
    headers = ["gathered callers"]
    for size in results.bursts:
        headers += [f"calls/s, {_tasks(size)}", "RT/call", "connections", "failed"]
    rows = []
    for contender in results.contenders:
        row = [contender.name]
        for size in results.bursts:
            run = results.run(contender.name, size, burst=True)
            row += [
                f"{run.ops_per_s:,.0f}" if run.operations else "-",
                f"{run.per_op(run.wire.round_trips):.2f}" if run.operations else "-",
                f"{run.clients:,}",
                f"{run.failures:,}" if run.failures else "",
            ]
        rows.append(row)
    return _format_table(headers, rows)


def burst_errors(results: Results) -> list[str]:
    return [
        f"  {run.name}, {_tasks(run.tasks)}: {run.failures:,} failed: {'; '.join(run.errors)}"
        for run in results.runs
        if run.burst and run.failures
    ]


def memory_table(memories: Sequence[Memory]) -> str:
    """Bytes per key (ratekit) or per library, and the projection to a full 200k RPM minute."""
    rows = []
    for memory in memories:
        if memory.name.startswith("ratekit"):
            for key in memory.keys:
                short = key.key.split("}:", 1)[-1]
                cells = [f"ratekit  {short}", key.type, f"{key.entries:,}", f"{key.bytes:,}"]
                rows.append([*cells, "", ""])
        kinds = ",".join(sorted({key.type for key in memory.keys})) or "-"
        entries = sum(key.entries for key in memory.keys)
        label = f"{memory.name}, total ({len(memory.keys)} keys)"
        rows.append(
            [
                label,
                kinds,
                f"{entries:,}",
                f"{memory.bytes:,}",
                f"{memory.projected_bytes:,.0f}",
                f"{memory.script_us:.1f}",
            ]
        )
    operations = memories[0].operations if memories else 0
    headers = [
        f"after {operations:,} admissions",
        "type",
        "fields/entries",
        "bytes",
        f"bytes at {MEMORY_RPM:,} RPM",
        "script µs/adm",
    ]
    return _format_table(headers, rows)


def verdicts(results: Results) -> list[str]:
    """The lines the Redis path is judged by: time and rate per call against the floor's
    (medians of the rounds), server commands and round trips per call."""
    lines = []
    floor_one = results.run(FLOOR, 1)
    for name, goal in (
        (ONE, ONE_TIME_GOAL),
        (ONE_ROUND_TRIP, ONE_TIME_GOAL),
        (SLOT, FOUR_TIME_GOAL),
        (GOAL, FOUR_TIME_GOAL),
    ):
        times = floor_one.ops_per_s / results.run(name, 1).ops_per_s
        status = "MET" if times <= goal else "NOT MET"
        lines.append(
            f"{name}, 1 task: {times:.2f}x the floor's time per call; goal <= {goal}x: {status}"
        )
    for level in results.levels:
        if level == 1:
            continue
        rate = results.ratio(ONE, FLOOR, level)
        status = "MET" if rate >= ONE_RATE_GOAL else "NOT MET"
        lines.append(
            f"{ONE}, {_tasks(level)}: {rate:.2f}x the floor's calls/s;"
            f" goal >= {ONE_RATE_GOAL}x: {status}"
        )
    for name, trips_goal in ROUND_TRIPS.items():
        runs = [results.run(name, level) for level in results.levels]
        trips = max(run.per_op(run.wire.round_trips) for run in runs)
        one = results.run(name, 1)
        commands = one.per_op(sum(one.server.commands.values()))
        status = "MET" if trips <= trips_goal + 0.01 else "NOT MET"
        lines.append(
            f"{name}: {commands:.2f} server commands per call (1 task), at most"
            f" {trips:.2f} round trips; goal <= {trips_goal:.0f} round trips: {status}"
        )
    four = results.run(GOAL, 1)
    per_call = four.per_op(sum(four.server.commands.values()))
    status = "MET" if per_call <= SERVER_COMMANDS_GOAL else "NOT MET"
    lines.append(
        f"{GOAL}: server commands per admission + settle {per_call:.2f}; goal <= "
        f"{SERVER_COMMANDS_GOAL:.0f} per admission (here with its settle): {status}"
    )
    return lines


def _notes(results: Results, args: argparse.Namespace) -> list[str]:
    notes = [f"  {c.name}: {c.path}" for c in results.contenders]
    notes += [
        "÷ floor: calls/s over raw EVALSHA `return 1` calls/s with as many tasks; ÷ raw:"
        " over the same scripts sent as plain redis-py EVALSHAs.",
        "RT: round trips the client wrote (a lone command or a whole pipeline each); cmds"
        " sent: commands in them; server cmds: INFO commandstats deltas (calls made inside"
        " scripts included); server reads: read events (total_reads_processed).",
        "Handshakes of new connections are left out of both counts;"
        " background work (ratekit's lease renewals, pyrate's leaker) is in.",
        "script µs: server time in EVALSHA/EVAL/FCALL; server CPU: redis-server's user+sys time;"
        " client CPU: this process's. All per call.",
        "pyrate-limiter's async Limiter serialises acquisitions on one asyncio.Lock per loop,"
        " so more tasks do not add throughput.",
    ]
    return notes


def _machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} at the start (client and server share them)"


def report(
    results: Results, args: argparse.Namespace, server_version: str, machine: str
) -> dict[str, object]:
    """Print the tables and the verdicts; return the same results as JSON-ready data."""
    versions = _versions(server_version)
    print(
        f"Python {platform.python_version()} ({platform.machine()}), asyncio; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )
    budget = f"{args.iterations:,} calls" if args.iterations else f"{args.seconds:g} s"
    print(f"{machine}; {budget} per run after a warm-up; redis-server on loopback\n")
    print(throughput_table(results))
    print()
    print(cost_table(results))
    print()
    print("Server commands per call (INFO commandstats, 1 task):")
    print("\n".join(command_lines(results)))
    print()
    print("\n".join(_notes(results, args)))
    if results.bursts:
        print()
        print(burst_table(results))
        print(
            "One call per task, all gathered at once after a few sequential calls; connections:"
            " INFO clients connected_clients at the end, less those before the subject existed."
        )
        for line in burst_errors(results):
            print(line)
    if results.memory:
        print()
        print(memory_table(results.memory))
        print(
            "ratekit's windows are spread over one minute on a fake clock (every slice live);"
            " limits' and pyrate's per-admission structures are projected linearly;"
            " ratekit's leases are fields of its hash while their calls are in flight."
        )
    print()
    lines = verdicts(results)
    print("\n".join(lines))
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "host": machine,
        "versions": versions,
        "seconds": args.seconds,
        "iterations": args.iterations,
        "levels": list(results.levels),
        "bursts": list(results.bursts),
        "runs": [{**asdict(run), "ops_per_s": run.ops_per_s} for run in results.runs],
        "memory": [
            {**asdict(m), "bytes": m.bytes, "projected_bytes": m.projected_bytes}
            for m in results.memory
        ],
        "verdicts": lines,
    }


# -- the command ------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive ints; empty for none."""
    return tuple(positive_int(part) for part in text.split(",") if part.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis",
        description="Admissions through Redis: ratekit, raw EVALSHA, limits, pyrate-limiter.",
    )
    parser.add_argument(
        "--seconds", type=_positive_float, default=1.0, help="duration of each timed run"
    )
    parser.add_argument(
        "--iterations",
        type=positive_int,
        help="operations per timed run, instead of --seconds",
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=16, help="tasks of the concurrent runs"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="timed runs per contender and concurrency, the contenders taking turns in an "
        "order rotated every round; the tables show each one's median run (3)",
    )
    parser.add_argument(
        "--bursts",
        type=_sizes,
        default=(1_000, 10_000),
        help="gathered callers per burst, comma-separated ('' skips the bursts)",
    )
    parser.add_argument(
        "--memory-ops",
        type=int,
        default=30_000,
        help="admissions before measuring Redis memory (0 skips the memory table)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    args.warmup = None if args.iterations is None else max(100, args.iterations // 10)
    return args


async def run(url: str, args: argparse.Namespace) -> dict[str, object]:
    """Time at each concurrency, burst, measure memory, then report."""
    machine = _machine()
    harness = _harness_client(url)
    try:
        server_version = str((await harness.info("server"))["redis_version"])
        entries = contenders()
        levels = (1,) if args.concurrency == 1 else (1, args.concurrency)
        runs = []
        for level in levels:
            for round_number in range(args.rounds):
                turn = round_number % len(entries)
                for contender in entries[turn:] + entries[:turn]:
                    runs.append(await measure(contender, url, harness, level, args))
        for size in args.bursts:
            runs += [await measure(c, url, harness, size, args, burst=True) for c in entries]
        memory = (
            await measure_memory(url, harness, args.memory_ops, args.concurrency)
            if args.memory_ops > 0
            else []
        )
        results = Results(entries, runs, memory, levels, args.bursts)
        return report(results, args, server_version, machine)
    finally:
        await harness.aclose()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through RedisServer, which stops the server


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    require_peers()
    binary = require_redis_server()
    with RedisServer(binary) as server:
        results = asyncio.run(run(server.url, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
