"""Admissions through Redis: ratekit's RedisBackend beside raw EVALSHA, limits and pyrate-limiter.

Run from the repository root::

    python -m bench.redis [--seconds S | --iterations N] [--concurrency C]
                          [--memory-ops M] [--json FILE]

It starts its own redis-server on a free loopback port, then measures, in one run:

- admissions per second, one task (latency-bound) and `concurrency` tasks on one
  asyncio loop, for ratekit (1 and 4 dimensions, acquire + settle + release),
  ratekit's own Lua scripts called directly through redis-py (no ratekit Python
  layer), limits' Redis storage (three strategies), pyrate-limiter's
  `RedisBucket`, and the floor: a raw ``EVALSHA`` of ``return 1``;
- Redis commands per admission: client round trips and commands run inside
  scripts, traced with ``MONITOR``, and every command counted by
  ``INFO commandstats`` (reset with ``CONFIG RESETSTAT`` before each run), with
  the server's and this process's CPU time per admission;
- the Redis memory of one account after `memory-ops` admissions under
  ``Limits(rpm=200_000, tpm=100_000_000)``, spread over a whole window (ratekit
  runs on a fake clock, so the minute is compressed), and what limits and
  pyrate-limiter keep for the same traffic.

The project's goals: ratekit reaches >= 80% of the raw EVALSHA rate for the round
trips it makes, and makes one round trip per admission plus one per settle.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import importlib.metadata
import itertools
import json
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench._common import BenchError, Op, Subject, require

# A limit no benchmark run comes near: requests (or tokens) per period.
HUGE = 10**9
EXTRA_HINT = "pip install -e '.[bench,redis]'"
SERVER_HINT = "apt-get install redis-server"
# Import name -> distribution name of every library the bench needs.
PEERS = {"redis": "redis", "limits": "limits", "pyrate_limiter": "pyrate-limiter"}
FLOOR = "raw EVALSHA `return 1`"
GOAL = "ratekit, 4 dimensions"
GOAL_FRACTION = 0.8
GOAL_ROUND_TRIPS = 2.0  # one for the admission, one for the settle
# The account of the memory section: StepFun V5's 200,000 RPM.
MEMORY_RPM = 200_000
MEMORY_TPM = 100_000_000
# ARGV positions (0-based, after the keys) of the lease id in ratekit's scripts.
RESERVE_LEASE_ARG = 2
SETTLE_LEASE_ARG = 1
# Commands the harness itself sends, or a connection's handshake: not counted.
HARNESS_COMMANDS = frozenset(
    {"config|resetstat", "info", "flushall", "echo", "monitor", "hello", "client|setinfo"}
)
SENTINEL = "bench-redis-trace-end"
# Seconds a subject may take to close before the bench reports it and moves on.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Contender:
    """A library configuration to measure: `build(url)` makes a fresh `Subject` in the loop.

    `path` says what one operation does.
    """

    name: str
    path: str
    build: Callable[[str], Awaitable[Subject]]


@dataclass(frozen=True)
class Run:
    """One timed run of one contender at one concurrency."""

    name: str
    concurrency: int
    operations: int
    elapsed_s: float
    client_cpu_s: float
    server_cpu_s: float
    # Calls per command during the run, from INFO commandstats (script-internal included).
    commands: dict[str, int]
    # Microseconds the server spent in EVALSHA/EVAL (the scripts, their commands included).
    script_us: float

    @property
    def ops_per_s(self) -> float:
        return self.operations / self.elapsed_s

    def per_op(self, amount: float) -> float:
        return amount / self.operations


@dataclass(frozen=True)
class Trace:
    """Commands seen by MONITOR over `operations` sequential admissions."""

    name: str
    operations: int
    client: dict[str, int]
    scripted: dict[str, int]

    @property
    def round_trips(self) -> float:
        return sum(self.client.values()) / self.operations

    @property
    def in_scripts(self) -> float:
        return sum(self.scripted.values()) / self.operations


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


# -- the server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A throwaway redis-server on 127.0.0.1, no persistence; a context manager."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.directory = tempfile.mkdtemp(prefix="ratekit-bench-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisProcess:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", self.directory]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.__exit__(None, None, None)
        raise SystemExit(f"bench.redis: redis-server did not listen on port {self.port} in 10 s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


def require_redis_server() -> str:
    """The redis-server binary, or exit naming the package that provides it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            f"bench.redis: redis-server is not on PATH; install it ({SERVER_HINT}) and run again"
        )
    return binary


# -- the contenders ------------------------------------------------------------------


def require_peers() -> None:
    """Exit with the install command when ratekit or a peer library cannot be imported."""
    require("bench.redis", PEERS, "ratekit.backends.redis", EXTRA_HINT)


def _check(name: str, admitted: bool) -> None:
    if not admitted:
        raise BenchError(f"{name} refused an admission under a huge limit")


def _client(url: str) -> Any:
    from redis.asyncio import Redis

    return Redis.from_url(url)


async def _aclose(resource: Any) -> None:
    """Close a redis-py client (or anything with `aclose`), if there is one."""
    close = getattr(resource, "aclose", None)
    if close is not None:
        await close()


def _one_dimension() -> Any:
    import ratekit

    return ratekit.Limits(rpm=HUGE)


def _four_dimensions() -> Any:
    import ratekit

    return ratekit.Limits(concurrency=10**6, rpm=HUGE, tpm=10**12, tpd=10**13)


def _namespace() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


async def _raw_floor(url: str) -> Subject:
    client = _client(url)
    sha = await client.script_load("return 1")

    async def op() -> None:
        await client.evalsha(sha, 0)

    return Subject(op, lambda: _aclose(client))


def _ratekit_op(limiter: Any, four: bool) -> Op:
    """acquire (+ settle on 4 dimensions) + release, the way an LLM call would use it."""
    if four:

        async def op() -> None:
            async with limiter.acquire(tokens=100) as permit:
                permit.settle(tokens=80)

        return op

    async def op_one() -> None:
        async with limiter.acquire():
            pass

    return op_one


def _ratekit(four: bool) -> Callable[[str], Awaitable[Subject]]:
    """A builder for ratekit's Limiter over a fresh RedisBackend account."""

    async def build(url: str) -> Subject:
        import ratekit
        from ratekit.backends.redis import RedisBackend

        backend = RedisBackend(url, namespace=_namespace())
        limits = _four_dimensions() if four else _one_dimension()
        limiter = ratekit.Limiter(limits, backend=backend)
        return Subject(_ratekit_op(limiter, four), backend.aclose)

    return build


async def _capture_evalsha(client: Any, op: Op) -> list[tuple[Any, ...]]:
    """The EVALSHA calls `op` makes through `client`, recorded while it runs once."""
    calls: list[tuple[Any, ...]] = []
    original = client.evalsha

    async def recording(*args: Any) -> Any:
        calls.append(args)
        return await original(*args)

    client.evalsha = recording
    try:
        await op()
    finally:
        del client.evalsha  # back to the class's method
    return calls


def _with_lease(call: tuple[Any, ...], position: int, lease_id: str) -> tuple[Any, ...]:
    """`call` (sha, numkeys, *keys, *args) with ARGV[position + 1] replaced by `lease_id`."""
    at = 2 + int(call[1]) + position
    return (*call[:at], lease_id, *call[at + 1 :])


async def _record_ratekit(url: str, four: bool) -> list[tuple[Any, ...]]:
    """The reserve and settle EVALSHA calls (sha, numkeys, *keys, *args) of one admission."""
    import ratekit
    from ratekit.backends.redis import RedisBackend

    backend = RedisBackend(url, namespace=_namespace())
    limits = _four_dimensions() if four else _one_dimension()
    op = _ratekit_op(ratekit.Limiter(limits, backend=backend), four)
    await op()  # loads the scripts
    calls = await _capture_evalsha(backend.client, op)
    await close_subject("ratekit (recording)", Subject(op, backend.aclose))
    if len(calls) != 2:
        raise BenchError(f"expected ratekit to send 2 EVALSHA per admission, saw {len(calls)}")
    return calls


async def _ratekit_payload(url: str) -> Subject:
    """Two EVALSHA of `return 1` carrying the keys and arguments of ratekit's 4-dimension calls."""
    client = _client(url)
    sha = await client.script_load("return 1")
    reserve, settle = [(sha, *call[1:]) for call in await _record_ratekit(url, four=True)]

    async def op() -> None:
        await client.evalsha(*reserve)
        await client.evalsha(*settle)

    return Subject(op, lambda: _aclose(client))


def _ratekit_scripts(four: bool) -> Callable[[str], Awaitable[Subject]]:
    """A builder replaying ratekit's reserve and settle EVALSHAs straight through redis-py.

    The calls are recorded from one real admission, then sent again with a fresh
    lease id each: what the Redis path costs without ratekit's Python layer.
    """

    async def build(url: str) -> Subject:
        reserve, settle = await _record_ratekit(url, four)
        client = _client(url)
        lease_ids = itertools.count()

        async def replay() -> None:
            lease_id = f"bench:{next(lease_ids)}"
            await client.evalsha(*_with_lease(reserve, RESERVE_LEASE_ARG, lease_id))
            await client.evalsha(*_with_lease(settle, SETTLE_LEASE_ARG, lease_id))

        return Subject(replay, lambda: _aclose(client))

    return build


def _limits_storage(url: str) -> Any:
    from limits.aio.storage import RedisStorage

    return RedisStorage(url.replace("redis://", "async+redis://", 1), implementation="redispy")


def _limits_strategy(
    strategy_name: str, per_minute: int = HUGE
) -> Callable[[str], Awaitable[Subject]]:
    """A builder for one `limits.aio` strategy over its redis-py `RedisStorage`."""

    async def build(url: str) -> Subject:
        from limits import RateLimitItemPerMinute
        from limits.aio import strategies

        storage = _limits_storage(url)
        limiter = getattr(strategies, strategy_name)(storage)
        item = RateLimitItemPerMinute(per_minute)
        identifier = _namespace()

        async def op() -> None:
            _check(strategy_name, await limiter.hit(item, identifier))

        return Subject(op, lambda: _aclose(getattr(storage.bridge, "storage", None)))

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
            await _aclose(client)

        return Subject(op, close)

    return build


def contenders() -> list[Contender]:
    """Everything measured, the floor first."""
    reserve_settle = "EVALSHA reserve + EVALSHA settle, recorded from ratekit, via redis-py"
    return [
        Contender(FLOOR, "await client.evalsha(sha_of('return 1'), 0)", _raw_floor),
        Contender(
            "raw EVALSHA, ratekit 4-dim payload",
            "2 x evalsha(sha_of('return 1'), keys + args of ratekit's reserve, then settle)",
            _ratekit_payload,
        ),
        Contender(
            "ratekit scripts, 1 dimension", f"{reserve_settle}  [rpm]", _ratekit_scripts(False)
        ),
        Contender(
            "ratekit scripts, 4 dimensions",
            f"{reserve_settle}  [concurrency, rpm, tpm, tpd]",
            _ratekit_scripts(True),
        ),
        Contender("ratekit, 1 dimension", "async with acquire()  [rpm]", _ratekit(False)),
        Contender(
            GOAL,
            "async with acquire(tokens=100) + settle(tokens=80)  [concurrency, rpm, tpm, tpd]",
            _ratekit(True),
        ),
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


# -- measuring -----------------------------------------------------------------------


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
    """Close `subject` in its own task, bounded: a close that hangs is reported, not waited on.

    (ratekit's `RedisBackend.aclose`, awaited directly right after an admission,
    can wait forever on its cancelled pub/sub listener.)
    """
    try:
        await asyncio.wait_for(subject.close(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        print(
            f"bench.redis: closing {name} took over {CLOSE_TIMEOUT_S:g} s; moved on",
            file=sys.stderr,
        )


async def _drive(op: Op, budget: Budget, concurrency: int) -> int:
    """Run `op` on `concurrency` tasks until the budget is spent; how many ran."""

    async def worker() -> int:
        done = 0
        while budget.take():
            await op()
            done += 1
        return done

    return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))


def _command_calls(stats: dict[str, Any]) -> dict[str, int]:
    """Calls per command from INFO commandstats, without the harness's own commands."""
    calls = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name not in HARNESS_COMMANDS:
            calls[name] = int(value["calls"])
    return calls


def _script_us(stats: dict[str, Any]) -> float:
    return sum(
        float(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in ("evalsha", "eval")
    )


async def _server_cpu_s(harness: Any) -> float:
    cpu = await harness.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(
    contender: Contender,
    url: str,
    harness: Any,
    concurrency: int,
    args: argparse.Namespace,
) -> Run:
    """Build a fresh subject on an empty database, warm it up, and time it."""
    await harness.flushall()
    subject = await contender.build(url)
    try:
        warmup_s = min(0.25, args.seconds / 5)
        await _drive(subject.op, Budget(args.warmup, warmup_s), concurrency)
        await harness.config_resetstat()
        server_before_s = await _server_cpu_s(harness)
        client_before_s = time.process_time()
        start_s = time.perf_counter()
        done = await _drive(subject.op, Budget(args.iterations, args.seconds), concurrency)
        elapsed_s = time.perf_counter() - start_s
        client_cpu_s = time.process_time() - client_before_s
        server_cpu_s = await _server_cpu_s(harness) - server_before_s
        stats = await harness.info("commandstats")
    finally:
        await close_subject(contender.name, subject)
    return Run(
        contender.name,
        concurrency,
        done,
        elapsed_s,
        client_cpu_s,
        server_cpu_s,
        _command_calls(stats),
        _script_us(stats),
    )


async def _read_monitor(
    monitor: Any, trace_client: collections.Counter[str], scripted: collections.Counter[str]
) -> None:
    """Count MONITOR lines by who sent them until the harness's sentinel ECHO."""
    async for line in monitor.listen():
        words = str(line["command"]).split()
        name = words[0].lower() if words else ""
        if name == "echo" and SENTINEL in line["command"]:
            return
        if name in HARNESS_COMMANDS or name == "client":
            continue
        (scripted if line.get("client_type") == "lua" else trace_client)[name] += 1


async def trace(contender: Contender, url: str, harness: Any, operations: int) -> Trace:
    """Run `operations` admissions, one at a time, under MONITOR: who sends which command."""
    await harness.flushall()
    subject = await contender.build(url)
    client_counts: collections.Counter[str] = collections.Counter()
    scripted: collections.Counter[str] = collections.Counter()
    watcher = _client(url)
    try:
        await _drive(subject.op, Budget(max(10, operations // 10), 60.0), 1)
        async with watcher.monitor() as monitor:
            reader = asyncio.create_task(_read_monitor(monitor, client_counts, scripted))
            await asyncio.sleep(0.05)  # MONITOR is on before the first admission
            await _drive(subject.op, Budget(operations, 60.0), 1)
            await harness.echo(SENTINEL)
            await asyncio.wait_for(reader, timeout=30)
    finally:
        await close_subject(contender.name, subject)
        await _aclose(watcher)
    return Trace(contender.name, operations, dict(client_counts), dict(scripted))


# -- memory --------------------------------------------------------------------------


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

    clock = ratekit.FakeClock(time.time())
    backend = RedisBackend(url, namespace=_namespace(), clock=clock)
    limiter = ratekit.Limiter(
        ratekit.Limits(rpm=MEMORY_RPM, tpm=MEMORY_TPM), backend=backend, clock=clock
    )
    step_s = 60.0 / operations

    async def op() -> None:
        clock.advance(step_s)
        async with limiter.acquire(tokens=500, timeout=0) as permit:
            permit.settle(tokens=400)

    return Subject(op, backend.aclose), backend.key_prefix()


async def _fill(
    harness: Any, name: str, subject: Subject, operations: int, concurrency: int
) -> float:
    """Run `operations` admissions, then close; the server's script µs per admission."""
    await harness.config_resetstat()
    try:
        await _drive(subject.op, Budget(operations, 3600.0), concurrency)
    finally:
        await close_subject(name, subject)
    return _script_us(await harness.info("commandstats")) / operations


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


# -- reporting -----------------------------------------------------------------------


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


@dataclass(frozen=True)
class Results:
    """Every run, trace and memory row of one invocation, looked up by contender."""

    runs: list[Run]
    traces: dict[str, Trace]
    memory: list[Memory]
    concurrency_levels: tuple[int, ...]
    names: list[str] = field(default_factory=list)

    def run(self, name: str, concurrency: int) -> Run:
        return next(r for r in self.runs if r.name == name and r.concurrency == concurrency)

    def floor_fraction(self, name: str, concurrency: int) -> float:
        """Admissions/s x round trips per admission, over the floor's round trips/s."""
        floor = self.run(FLOOR, concurrency).ops_per_s
        return self.run(name, concurrency).ops_per_s * self.traces[name].round_trips / floor

    def plain_fraction(self, name: str, concurrency: int) -> float:
        """Admissions/s over the floor's EVALSHA/s."""
        return self.run(name, concurrency).ops_per_s / self.run(FLOOR, concurrency).ops_per_s


def throughput_table(results: Results) -> str:
    """Admissions/s at each concurrency, against the floor per call and per round trip."""
    headers = ["contender", "round trips"]
    for level in results.concurrency_levels:
        tasks = "1 task" if level == 1 else f"{level} tasks"
        headers += [f"adm/s, {tasks}", "÷ floor", "÷ floor per RT"]
    rows = []
    for name in results.names:
        row = [name, f"{results.traces[name].round_trips:.2f}"]
        for level in results.concurrency_levels:
            row += [
                f"{results.run(name, level).ops_per_s:,.0f}",
                f"{results.plain_fraction(name, level):.0%}",
                f"{results.floor_fraction(name, level):.0%}",
            ]
        rows.append(row)
    return _format_table(headers, rows)


def cost_table(results: Results) -> str:
    """Per admission, one task: commands by origin, and CPU on each side of the socket."""
    headers = [
        "per admission (1 task)",
        "round trips",
        "in scripts",
        "commands (commandstats)",
        "script µs",
        "server CPU µs",
        "client CPU µs",
    ]
    rows = []
    for name in results.names:
        run, traced = results.run(name, 1), results.traces[name]
        rows.append(
            [
                name,
                f"{traced.round_trips:.2f}",
                f"{traced.in_scripts:.2f}",
                f"{run.per_op(sum(run.commands.values())):.2f}",
                f"{run.per_op(run.script_us):.1f}",
                f"{run.per_op(run.server_cpu_s) * 1e6:.1f}",
                f"{run.per_op(run.client_cpu_s) * 1e6:.1f}",
            ]
        )
    return _format_table(headers, rows)


def command_lines(results: Results) -> list[str]:
    """Each contender's commands per admission, most frequent first (one task)."""
    lines = []
    for name in results.names:
        run = results.run(name, 1)
        parts = sorted(run.commands.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{command} {run.per_op(calls):.2f}" for command, calls in parts)
        lines.append(f"  {name}: {shown}")
    return lines


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
    """The lines the Redis path is judged by: rate against the floor, and round trips."""
    lines = []
    for level in results.concurrency_levels:
        fraction = results.floor_fraction(GOAL, level)
        status = "MET" if fraction >= GOAL_FRACTION else "NOT MET"
        lines.append(
            f"{GOAL}, {level} task(s): {results.run(GOAL, level).ops_per_s:,.0f} adm/s = "
            f"{fraction:.0%} of the raw EVALSHA rate for its round trips "
            f"({results.plain_fraction(GOAL, level):.0%} per call); "
            f"goal >= {GOAL_FRACTION:.0%}: {status}"
        )
    trips = results.traces[GOAL].round_trips
    status = "MET" if trips <= GOAL_ROUND_TRIPS + 0.01 else "NOT MET"
    lines.append(
        f"{GOAL}: {trips:.2f} round trips per admission+settle; "
        f"goal {GOAL_ROUND_TRIPS:.0f} (1 + 1 per settle): {status}"
    )
    return lines


def _notes(results: Results, args: argparse.Namespace) -> list[str]:
    notes = [f"  {c.name}: {c.path}" for c in contenders()]
    notes += [
        "÷ floor: admissions/s over raw EVALSHA calls/s at the same concurrency;"
        " ÷ floor per RT: the same, times the round trips one admission needs.",
        "round trips and in scripts: MONITOR over"
        f" {args.trace_ops} sequential admissions (background work included);"
        " commands: INFO commandstats over the timed run, script-internal calls included.",
        "script µs: server time in EVALSHA/EVAL; server CPU: redis-server's user+sys time;"
        " client CPU: this process's. All per admission.",
        "pyrate-limiter's async Limiter serialises acquisitions on one asyncio.Lock per loop,"
        " so more tasks do not add throughput.",
    ]
    return notes


def report(results: Results, args: argparse.Namespace, server_version: str) -> dict[str, object]:
    """Print the tables and the verdicts; return the same results as JSON-ready data."""
    versions = _versions(server_version)
    print(
        f"Python {platform.python_version()} ({platform.machine()}), asyncio; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )
    budget = f"{args.iterations:,} operations" if args.iterations else f"{args.seconds:g} s"
    print(f"{budget} per run, after a warm-up; redis-server on loopback, started by the bench\n")
    print(throughput_table(results))
    print()
    print(cost_table(results))
    print()
    print("Commands per admission (commandstats, 1 task):")
    print("\n".join(command_lines(results)))
    print()
    print("\n".join(_notes(results, args)))
    if results.memory:
        print()
        print(memory_table(results.memory))
        print(
            "ratekit's windows are spread over one minute on a fake clock (every slice live);"
            " limits' and pyrate's per-admission structures are projected linearly;"
            " ratekit's leases set exists only while calls are in flight."
        )
    print()
    lines = verdicts(results)
    print("\n".join(lines))
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": versions,
        "seconds": args.seconds,
        "iterations": args.iterations,
        "concurrency_levels": list(results.concurrency_levels),
        "runs": [{**asdict(run), "ops_per_s": run.ops_per_s} for run in results.runs],
        "traces": [
            {**asdict(t), "round_trips": t.round_trips, "in_scripts": t.in_scripts}
            for t in results.traces.values()
        ],
        "memory": [
            {**asdict(m), "bytes": m.bytes, "projected_bytes": m.projected_bytes}
            for m in results.memory
        ],
        "goal_fractions": {
            str(level): results.floor_fraction(GOAL, level) for level in results.concurrency_levels
        },
        "verdicts": lines,
    }


# -- the command ---------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


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
        type=_positive_int,
        help="operations per timed run, instead of --seconds",
    )
    parser.add_argument(
        "--concurrency", type=_positive_int, default=32, help="tasks of the concurrent runs"
    )
    parser.add_argument(
        "--trace-ops", type=_positive_int, default=200, help="admissions traced with MONITOR"
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
    """Trace, time at each concurrency, measure memory, then report."""
    harness = _client(url)
    try:
        server_version = str((await harness.info("server"))["redis_version"])
        entries = contenders()
        traces = {c.name: await trace(c, url, harness, args.trace_ops) for c in entries}
        levels = (1,) if args.concurrency == 1 else (1, args.concurrency)
        runs = [await measure(c, url, harness, level, args) for level in levels for c in entries]
        memory = (
            await measure_memory(url, harness, args.memory_ops, args.concurrency)
            if args.memory_ops > 0
            else []
        )
        results = Results(runs, traces, memory, levels, [c.name for c in entries])
        return report(results, args, server_version)
    finally:
        await _aclose(harness)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through RedisProcess, which stops the server


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    require_peers()
    binary = require_redis_server()
    with RedisProcess(binary) as server:
        results = asyncio.run(run(server.url, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
