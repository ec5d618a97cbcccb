"""The herd: 10 to 10,000 gathered callers waiting on one concurrency cap.

Run from the repository root::

    python -m bench.herd [--sizes N,N...] [--quick] [--rounds R] [--processes P]
                         [--lower-share S] [--timeout S] [--json FILE]

It starts its own redis-server on a free loopback port (like bench.redis), then,
for each number N of callers (default 10, 1,000 and 10,000; ``--quick``: 10, 100
and 1,000), measures three rows under ``Limits(concurrency=64, rpm=10**9)`` (the
concurrency cap binds):

- "memory, 1 process": a `ratekit.Limiter` on its default in-process backend;
- "redis, 1 process": a `Limiter` on a `ratekit.RedisBackend`;
- "redis, 4 processes": 4 worker processes (``python -m bench.herd --worker``),
  each with N/4 callers on the same Redis account (one namespace).

Each herd: the whole cap (64 admissions) is held first (by the row's own
limiter, or for the fleet by this process on the same account), then N callers
are gathered (``async with limiter.acquire(priority=p): pass``, p = 1 for odd
indexes, 0 for even; ``--timeout S`` passes ``timeout=S`` too, for what a deadline
costs a waiting caller), each recording ``time.perf_counter()`` at its grant. Once
the limiters' statistics show every caller waiting (each worker says so), the 64
held admissions are released and the time to the last grant is taken. Measured:
errors, admissions/s and the time per admission (release to last grant), the time
to the first grant and per admission after it (the start left out), the gaps
between consecutive grants, FIFO violations (within one priority and process, a
grant after that of a caller submitted later), priority violations (within one
process, priority-0 grants before the last priority-1 grant), backend reserve
calls per admission (a herd retries many times for each admission; a batch
admits several in one call), and for Redis the client connections held at the
end (``INFO clients``, less the harness's own). Each cell is run `rounds` times
(default 3, interleaved), after one discarded warm-up herd of each kind. The
limiters run with ``lower_share=0`` (strict priority: the check above holds only
then); ``--lower-share 0.1`` is ratekit's default, under which priority 0 takes
about one admission in eleven while priority 1 waits.

The project's goals (its "10,000 callers" issue): no errors, admissions in FIFO
and priority order, a bounded number of connections, no thundering herd on
release, and a time per admission flat from 10 to 10,000 waiters: at the largest
size at most 1.5x that at the smallest.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import ratekit
from bench._common import positive_int, require
from bench.redis import (
    _exit_on_sigterm,
    _format_table,
    _harness_client,
    require_redis_server,
)
from ratekit.testing import RedisServer

if TYPE_CHECKING:
    from ratekit.backends._base import Grant, Refusal
    from ratekit.backends.memory import MemoryGrant
    from ratekit.backends.redis import RedisBackend

TOOL = "bench.herd"
EXTRA_HINT = "pip install -e '.[redis]'"
# The workload: a concurrency cap that binds, and a rate no run comes near.
CAP = 64
HUGE = 10**9
DEFAULT_SIZES = (10, 1_000, 10_000)
QUICK_SIZES = (10, 100, 1_000)
PROCESSES = 4
ROUNDS = 3
# Callers of the warm-up herds, run once before the measured ones.
WARMUP_CALLERS = 100
# Strict priority by default: the Limiter's own default (0.1) lets priority 0 take
# one admission in eleven while priority 1 waits, which the count would show.
LOWER_SHARE = 0.0
# The goal: time per admission at the largest size over that at the smallest.
FLAT_GOAL = 1.5
MEMORY = "memory, 1 process"
REDIS = "redis, 1 process"
# How often the herd's limiter is asked whether every caller waits, and for how long.
QUEUE_POLL_S = 0.01
QUEUE_TIMEOUT_S = 30.0
# How long a worker may take to start and queue its callers, the callers to be
# admitted after the release, and a worker to close.
STARTUP_TIMEOUT_S = 60.0
HERD_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0
# A worker's results are one JSON line (up to 10,000 grants): room for it.
LINE_LIMIT = 1 << 24
ROOT = Path(__file__).resolve().parent.parent


def _limits() -> ratekit.Limits:
    return ratekit.Limits(concurrency=CAP, rpm=HUGE)


def _namespace() -> str:
    return f"herd-{uuid.uuid4().hex[:8]}"


# -- counting the backend's reserve calls -----------------------------------------------


@dataclass
class Tally:
    """Backend reserve calls (a `reserve_many` counts once, however many it admits)."""

    tries: int = 0


def _counting_memory(tally: Tally) -> ratekit.MemoryBackend:
    """The default in-process backend, counting its reserve calls in `tally`."""

    class CountingMemory(ratekit.MemoryBackend):
        def reserve_now(
            self,
            limits: ratekit.Limits,
            demand: ratekit.backends.Demand,
            now: float,
            wall: float = math.nan,
        ) -> MemoryGrant | Refusal:
            tally.tries += 1
            return super().reserve_now(limits, demand, now, wall)

    return CountingMemory()


def _counting_redis(url: str, namespace: str, tally: Tally) -> RedisBackend:
    """A RedisBackend on `url` (its own client), counting its reserve calls in `tally`."""
    from ratekit.backends.redis import RedisBackend

    class CountingRedis(RedisBackend):
        async def reserve(
            self,
            limits: ratekit.Limits,
            demand: ratekit.backends.Demand,
            now: ratekit.clock.Instant,
        ) -> Grant | Refusal:
            tally.tries += 1
            return await super().reserve(limits, demand, now)

        async def reserve_many(
            self,
            limits: ratekit.Limits,
            demands: Sequence[ratekit.backends.Demand],
            now: ratekit.clock.Instant,
        ) -> tuple[list[Grant], Refusal | None]:
            tally.tries += 1
            return await super().reserve_many(limits, demands, now)

    return CountingRedis(url, namespace=namespace)


# -- one herd in one process ------------------------------------------------------------


@dataclass
class Herd:
    """What one process's gathered callers saw (JSON-ready: a worker prints it)."""

    callers: int
    # Caller indexes in grant order (index = submission order; priority = index % 2),
    # and time.perf_counter() at each grant, in the same order.
    order: list[int]
    grants_s: list[float]
    # Callers that raised (or were never admitted), and the first such error.
    errors: int
    first_error: str | None
    # Backend reserve calls from the release to the last caller's end.
    tries: int
    # What went wrong around the callers (not all queued in time...).
    problems: list[str] = field(default_factory=list)

    @classmethod
    def failed(cls, callers: int, problem: str) -> Herd:
        """A process that reported nothing: all its callers count as errors."""
        return cls(callers, [], [], callers, problem, 0, [problem])


async def _until_queued(limiter: ratekit.Limiter, tasks: Sequence[asyncio.Task[None]]) -> bool:
    """Wait until every caller waits in `limiter`'s queue (or has ended); False if they
    did not within QUEUE_TIMEOUT_S."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        waiting = (await limiter.statistics()).waiting
        if waiting + sum(task.done() for task in tasks) >= len(tasks):
            return True
        await asyncio.sleep(QUEUE_POLL_S)
    return False


async def gather_herd(
    limiter: ratekit.Limiter,
    callers: int,
    tally: Tally,
    on_queued: Callable[[], Awaitable[None]],
    timeout_s: float | None = None,
) -> Herd:
    """Gather `callers` callers on `limiter` (whose cap someone holds), wait until they
    all wait, call `on_queued` (which frees the cap, or tells who will), and record
    every grant until the last caller is done."""
    order: list[int] = []
    grants_s: list[float] = []
    errors: list[str] = []
    problems: list[str] = []

    async def caller(index: int) -> None:
        try:
            async with limiter.acquire(priority=index % 2, timeout=timeout_s):
                grants_s.append(time.perf_counter())
                order.append(index)
        except Exception as exc:
            errors.append(repr(exc))

    tasks = [asyncio.create_task(caller(index)) for index in range(callers)]
    try:
        if not await _until_queued(limiter, tasks):
            waiting = (await limiter.statistics()).waiting
            problems.append(
                f"only {waiting:,} of {callers:,} callers waited after {QUEUE_TIMEOUT_S:g} s"
            )
        tally.tries = 0
        await on_queued()
        _, pending = await asyncio.wait(tasks, timeout=HERD_TIMEOUT_S)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            problems.append(f"{len(pending):,} callers not admitted within {HERD_TIMEOUT_S:g} s")
            errors += [f"not admitted within {HERD_TIMEOUT_S:g} s"] * len(pending)
    finally:
        for task in tasks:
            task.cancel()
    return Herd(
        callers, order, grants_s, len(errors), errors[0] if errors else None, tally.tries, problems
    )


async def _hold_cap(limiter: ratekit.Limiter) -> list[ratekit.Admission]:
    """The whole concurrency cap, held: nobody else is admitted until it is released."""
    return [await limiter.acquire() for _ in range(CAP)]


async def _release(held: Sequence[ratekit.Admission]) -> float:
    """Release every held admission at once; time.perf_counter() when it started."""
    start_s = time.perf_counter()
    await asyncio.gather(*(admission.release() for admission in held))
    return start_s


async def _local_herd(
    limiter: ratekit.Limiter, callers: int, tally: Tally, timeout_s: float | None
) -> tuple[Herd, float]:
    """A herd whose cap is held and released by its own limiter: it and the release instant."""
    held = await _hold_cap(limiter)
    released: list[float] = []

    async def release() -> None:
        released.append(await _release(held))

    try:
        herd = await gather_herd(limiter, callers, tally, release, timeout_s)
    finally:
        if not released:
            await _release(held)
    return herd, released[0]


# -- a sample: one row, one size, one round ---------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (NaN when there are none)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def fifo_violations(order: Sequence[int]) -> int:
    """Grants after that of a caller of the same priority submitted later."""
    latest: dict[int, int] = {}
    count = 0
    for index in order:
        priority = index % 2
        if index < latest.get(priority, -1):
            count += 1
        else:
            latest[priority] = index
    return count


def priority_violations(order: Sequence[int]) -> int:
    """Priority-0 grants before the last priority-1 grant."""
    last_high = max((at for at, index in enumerate(order) if index % 2 == 1), default=-1)
    return sum(1 for index in order[:last_high] if index % 2 == 0)


@dataclass(frozen=True)
class Sample:
    """One herd of one row: `callers` gathered, over one or more processes."""

    row: str
    callers: int
    processes: int
    admitted: int
    errors: int
    first_error: str | None
    # From the release to the first and to the last grant.
    first_s: float
    elapsed_s: float
    gap_p50_us: float
    gap_p99_us: float
    fifo: int
    priority: int
    tries: int
    # Client connections at the end, less the harness's own (None: no Redis).
    connections: int | None
    problems: list[str]

    @property
    def per_s(self) -> float:
        return self.admitted / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def cost_us(self) -> float:
        return self.elapsed_s / self.admitted * 1e6 if self.admitted else math.nan

    @property
    def steady_us(self) -> float:
        """Time per admission from the first grant to the last (the start left out)."""
        if self.admitted < 2:
            return math.nan
        return (self.elapsed_s - self.first_s) / (self.admitted - 1) * 1e6

    @property
    def tries_per_admission(self) -> float:
        return self.tries / self.admitted if self.admitted else math.nan


def sample(row: str, herds: Sequence[Herd], released_s: float, connections: int | None) -> Sample:
    """Merge the herds of one row's processes (perf_counter is one system-wide
    monotonic clock on Linux, so their grant times compare)."""
    grants = sorted(instant for herd in herds for instant in herd.grants_s)
    gaps = sorted((b - a) * 1e6 for a, b in itertools.pairwise(grants))
    first_error = next((herd.first_error for herd in herds if herd.first_error), None)
    return Sample(
        row,
        sum(herd.callers for herd in herds),
        len(herds),
        len(grants),
        sum(herd.errors for herd in herds),
        first_error,
        grants[0] - released_s if grants else math.nan,
        grants[-1] - released_s if grants else math.nan,
        _percentile(gaps, 0.50),
        _percentile(gaps, 0.99),
        sum(fifo_violations(herd.order) for herd in herds),
        sum(priority_violations(herd.order) for herd in herds),
        sum(herd.tries for herd in herds),
        connections,
        [problem for herd in herds for problem in herd.problems],
    )


# -- the rows ---------------------------------------------------------------------------


async def _clients(harness: Any) -> int:
    return int((await harness.info("clients"))["connected_clients"])


async def memory_herd(callers: int, lower_share: float, timeout_s: float | None) -> Sample:
    tally = Tally()
    limiter = ratekit.Limiter(_limits(), backend=_counting_memory(tally), lower_share=lower_share)
    herd, released_s = await _local_herd(limiter, callers, tally, timeout_s)
    return sample(MEMORY, [herd], released_s, None)


async def redis_herd(
    url: str, harness: Any, callers: int, lower_share: float, timeout_s: float | None
) -> Sample:
    await harness.flushall()
    before = await _clients(harness)
    tally = Tally()
    backend = _counting_redis(url, _namespace(), tally)
    try:
        limiter = ratekit.Limiter(_limits(), backend=backend, lower_share=lower_share)
        herd, released_s = await _local_herd(limiter, callers, tally, timeout_s)
        connections = await _clients(harness) - before
    finally:
        await backend.aclose()
    return sample(REDIS, [herd], released_s, connections)


def fleet_row(processes: int) -> str:
    return f"redis, {processes} processes"


def _shares(callers: int, processes: int) -> list[int]:
    """`callers` split over `processes` as evenly as can be (none empty where avoidable)."""
    shares = [callers // processes + (i < callers % processes) for i in range(processes)]
    return [share for share in shares if share > 0]


class Worker:
    """One worker process of the fleet: `python -m bench.herd --worker SPEC`.

    It prints ``queued`` once its callers all wait, then its `Herd` as one JSON line
    once they are done, and closes its backend when told (a line on its stdin), so
    that its connections are still open when the harness counts them.
    """

    def __init__(self, process: asyncio.subprocess.Process, stderr: IO[bytes], callers: int):
        self.process = process
        self.stderr = stderr
        self.callers = callers
        self.failure: str | None = None

    @classmethod
    async def start(cls, spec: dict[str, Any]) -> Worker:
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by `close`)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            TOOL,
            "--worker",
            json.dumps(spec),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            limit=LINE_LIMIT,
        )
        return cls(process, stderr, int(spec["callers"]))

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    async def line(self, timeout_s: float) -> str | None:
        """Its next line on stdout; None (and `failure` set) if there is none in time."""
        if self.failure is not None:
            return None
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        except TimeoutError:
            self.failure = f"worker {self.process.pid}: no answer within {timeout_s:g} s"
            return None
        if not raw:
            await asyncio.wait_for(self.process.wait(), CLOSE_TIMEOUT_S)
            self.failure = (
                f"worker {self.process.pid} exited {self.process.returncode}: "
                + self._stderr_tail()
            )
            return None
        return raw.decode().strip()

    async def queued(self) -> None:
        line = await self.line(STARTUP_TIMEOUT_S)
        if line is not None and line != "queued":
            self.failure = f"worker {self.process.pid}: expected 'queued', got {line[:80]!r}"

    async def herd(self) -> Herd:
        line = await self.line(HERD_TIMEOUT_S + CLOSE_TIMEOUT_S)
        if line is None:
            return Herd.failed(self.callers, self.failure or "no results")
        return Herd(**json.loads(line))

    async def close(self) -> None:
        """Tell it to close its backend and exit; kill it if it does not in time."""
        process = self.process
        try:
            if process.returncode is None and process.stdin is not None:
                process.stdin.write(b"close\n")
                await process.stdin.drain()
                process.stdin.close()
            await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            if process.returncode is None:
                process.kill()
                await process.wait()
        finally:
            self.stderr.close()


async def fleet_herd(
    url: str,
    harness: Any,
    callers: int,
    processes: int,
    lower_share: float,
    timeout_s: float | None,
) -> Sample:
    """`callers` spread over `processes` workers on one account; this process holds the
    cap on the same account, releases it once every worker's callers wait, then
    closes its own backend, so that the connections counted are the workers'."""
    await harness.flushall()
    before = await _clients(harness)
    namespace = _namespace()
    holder_backend = _counting_redis(url, namespace, Tally())
    holder_open = True
    workers: list[Worker] = []
    try:
        holder = ratekit.Limiter(_limits(), backend=holder_backend)
        held = await _hold_cap(holder)
        for share in _shares(callers, processes):
            spec = {"url": url, "namespace": namespace, "callers": share}
            workers.append(
                await Worker.start({**spec, "lower_share": lower_share, "timeout": timeout_s})
            )
        await asyncio.gather(*(worker.queued() for worker in workers))
        released_s = await _release(held)
        await holder_backend.aclose()
        holder_open = False
        herds = list(await asyncio.gather(*(worker.herd() for worker in workers)))
        connections = await _clients(harness) - before
    finally:
        await asyncio.gather(*(worker.close() for worker in workers))
        if holder_open:
            await holder_backend.aclose()
    return sample(fleet_row(processes), herds, released_s, connections)


async def _worker(spec: dict[str, Any]) -> None:
    """The worker's side of `Worker`: one herd on the account `spec` names."""
    tally = Tally()
    backend = _counting_redis(str(spec["url"]), str(spec["namespace"]), tally)
    try:
        limiter = ratekit.Limiter(
            _limits(), backend=backend, lower_share=float(spec["lower_share"])
        )

        async def queued() -> None:
            sys.stdout.write("queued\n")
            sys.stdout.flush()

        timeout_s = None if spec["timeout"] is None else float(spec["timeout"])
        herd = await gather_herd(limiter, int(spec["callers"]), tally, queued, timeout_s)
        sys.stdout.write(json.dumps(asdict(herd)) + "\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.readline)  # the harness counts connections first
    finally:
        await backend.aclose()


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """Every round of one row at one size: timings from the median round (by time per
    admission); errors totalled, violations and connections the worst round's."""

    row: str
    callers: int
    rounds: list[Sample]

    @property
    def median(self) -> Sample:
        def cost(s: Sample) -> float:
            return s.cost_us if not math.isnan(s.cost_us) else math.inf

        ranked = sorted(self.rounds, key=cost)
        return ranked[(len(ranked) - 1) // 2]

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.rounds)

    @property
    def first_error(self) -> str | None:
        return next((s.first_error for s in self.rounds if s.first_error), None)

    @property
    def fifo(self) -> int:
        return max(s.fifo for s in self.rounds)

    @property
    def priority(self) -> int:
        return max(s.priority for s in self.rounds)

    @property
    def connections(self) -> int | None:
        found = [s.connections for s in self.rounds if s.connections is not None]
        return max(found) if found else None

    def summary(self) -> dict[str, object]:
        median = self.median
        return {
            "row": self.row,
            "callers": self.callers,
            "errors": self.errors,
            "first_error": self.first_error,
            "admissions_per_s": median.per_s,
            "us_per_admission": median.cost_us,
            "first_grant_ms": median.first_s * 1e3,
            "steady_us_per_admission": median.steady_us,
            "gap_p50_us": median.gap_p50_us,
            "gap_p99_us": median.gap_p99_us,
            "fifo_violations": self.fifo,
            "priority_violations": self.priority,
            "tries_per_admission": median.tries_per_admission,
            "connections": self.connections,
            "rounds": [
                {**asdict(s), "per_s": s.per_s, "cost_us": s.cost_us, "steady_us": s.steady_us}
                for s in self.rounds
            ],
        }


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table(results: Sequence[Result]) -> str:
    headers = [
        "row",
        "callers",
        "errors",
        "adm/s",
        "µs/adm",
        "1st ms",
        "steady µs",
        "gap p50 µs",
        "gap p99 µs",
        "FIFO viol.",
        "prio viol.",
        "tries/adm",
        "conns",
    ]
    rows = []
    for result in results:
        median = result.median
        connections = result.connections
        rows.append(
            [
                result.row,
                f"{result.callers:,}",
                f"{result.errors:,}",
                _number(median.per_s, ",.0f"),
                _number(median.cost_us, ".1f"),
                _number(median.first_s * 1e3, ".1f"),
                _number(median.steady_us, ".1f"),
                _number(median.gap_p50_us, ".1f"),
                _number(median.gap_p99_us, ".0f"),
                f"{result.fifo:,}",
                f"{result.priority:,}",
                _number(median.tries_per_admission, ".2f"),
                "-" if connections is None else f"{connections:,}",
            ]
        )
    return _format_table(headers, rows)


def problem_lines(results: Sequence[Result]) -> list[str]:
    lines = []
    for result in results:
        where = f"{result.row}, {result.callers:,} callers"
        if result.errors:
            lines.append(f"{where}: {result.errors:,} errors; first: {result.first_error}")
        for problem in sorted({p for s in result.rounds for p in s.problems}):
            lines.append(f"{where}: {problem}")
    return lines


def verdicts(results: Sequence[Result], rows: Sequence[str]) -> list[str]:
    """Per row: the steady time per admission (first grant to last) at the largest size
    over that at the smallest, and FIFO and priority order. The time to the first grant
    is left out of the ratio: fixed, it would make ten callers look dear."""
    lines = []
    for row in rows:
        mine = sorted((r for r in results if r.row == row), key=lambda r: r.callers)
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        ratio = large.median.cost_us / small.median.cost_us
        steady = large.median.steady_us / small.median.steady_us
        status = "MET" if steady <= FLAT_GOAL else "NOT MET"
        lines.append(
            f"{row}: {large.median.steady_us:.1f} µs per admission (steady) at"
            f" {large.callers:,} callers, {small.median.steady_us:.1f} µs at"
            f" {small.callers:,}: {steady:.2f}x (from the release: {ratio:.2f}x);"
            f" goal <= {FLAT_GOAL}x: {status}"
        )
    return lines


def _versions(server_version: str) -> dict[str, str]:
    found = {"ratekit": ratekit.__version__}
    try:
        found["redis-py"] = importlib.metadata.version("redis")
    except importlib.metadata.PackageNotFoundError:
        found["redis-py"] = "?"
    found["redis-server"] = server_version
    return found


def _machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} at the start (client and server share them)"


def report(
    results: Sequence[Result],
    rows: Sequence[str],
    args: argparse.Namespace,
    server_version: str,
    machine: str,
    elapsed_s: float,
) -> dict[str, object]:
    """Print the table and the verdicts; return the same results as JSON-ready data."""
    versions = _versions(server_version)
    print(
        f"Python {platform.python_version()} ({platform.machine()}), asyncio; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )
    print(
        f"{machine}; Limits(concurrency={CAP}, rpm=10**9), lower_share={args.lower_share:g},"
        f" acquire timeout {'none' if args.timeout is None else f'{args.timeout:g} s'};"
        f" {args.rounds} round(s) per cell; redis-server on loopback\n"
    )
    print(table(results))
    print(
        "adm/s, µs/adm: admissions over the time from the release of the held cap to the last"
        " grant; 1st ms: from the release to the first grant; steady µs: per admission from"
        " the first grant to the last; gaps: between consecutive grants (all processes"
        " merged); timings are the median round's (by µs/adm)."
    )
    print(
        "FIFO viol.: grants after that of a later caller of the same priority and process;"
        " prio viol.: priority-0 grants before the last priority-1 grant of the same process"
        " (worst round)."
    )
    print(
        "tries/adm: backend reserve calls (a batch counts once) from the release on, per"
        " admission; conns: INFO clients connected_clients at the end less the harness's own"
        " (worst round; the fleet's holder has closed by then)."
    )
    lines = problem_lines(results)
    if lines:
        print()
        print("\n".join(lines))
    print()
    verdict = verdicts(results, rows)
    print("\n".join(verdict))
    print(f"\nran in {elapsed_s:.1f} s", file=sys.stderr)
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "host": machine,
        "versions": versions,
        "cap": CAP,
        "sizes": list(args.sizes),
        "rounds": args.rounds,
        "processes": args.processes,
        "lower_share": args.lower_share,
        "timeout": args.timeout,
        "results": [result.summary() for result in results],
        "verdicts": verdict,
        "elapsed_s": elapsed_s,
    }


# -- the command ------------------------------------------------------------------------


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(positive_int(part.replace("_", "")) for part in text.split(",") if part.strip())
    if not sizes:
        raise argparse.ArgumentTypeError("at least one size is needed")
    return sizes


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {TOOL}",
        description="Many gathered callers on one concurrency cap: memory, Redis, a fleet.",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help="gathered callers per herd, comma-separated (default 10,1000,10000)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="sizes 10,100,1000 (overrides --sizes)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=ROUNDS, help="herds per row and size"
    )
    parser.add_argument(
        "--processes", type=positive_int, default=PROCESSES, help="workers of the fleet row"
    )
    parser.add_argument(
        "--lower-share",
        type=_share,
        default=LOWER_SHARE,
        help="the limiters' lower_share (default 0: strict priority; ratekit's own is 0.1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="each caller's acquire(timeout=S) (default: none); long enough that none "
        "times out, it measures what a deadline costs a waiting caller",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = QUICK_SIZES
    return args


async def run(url: str, args: argparse.Namespace) -> dict[str, object]:
    """Every row at every size, `rounds` times (interleaved), then the report."""
    started_s = time.perf_counter()
    machine = _machine()
    rows = [MEMORY, REDIS, fleet_row(args.processes)]
    found: dict[tuple[str, int], list[Sample]] = {(row, n): [] for n in args.sizes for row in rows}
    harness = _harness_client(url)
    try:
        server_version = str((await harness.info("server"))["redis_version"])
        # A warm-up herd of each kind (discarded): imports done, scripts on the server.
        await memory_herd(WARMUP_CALLERS, args.lower_share, args.timeout)
        await redis_herd(url, harness, WARMUP_CALLERS, args.lower_share, args.timeout)
        for _ in range(args.rounds):
            for callers in args.sizes:
                found[MEMORY, callers].append(
                    await memory_herd(callers, args.lower_share, args.timeout)
                )
                found[REDIS, callers].append(
                    await redis_herd(url, harness, callers, args.lower_share, args.timeout)
                )
                found[rows[2], callers].append(
                    await fleet_herd(
                        url, harness, callers, args.processes, args.lower_share, args.timeout
                    )
                )
        results = [Result(row, n, found[row, n]) for row in rows for n in args.sizes]
        return report(results, rows, args, server_version, machine, time.perf_counter() - started_s)
    finally:
        await harness.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        asyncio.run(_worker(json.loads(args.worker)))
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    require(TOOL, {"redis": "redis"}, "ratekit.backends.redis", EXTRA_HINT)
    binary = require_redis_server(TOOL)
    with RedisServer(binary) as server:
        results = asyncio.run(run(server.url, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
