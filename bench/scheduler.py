"""The scheduler under load: queue drain cost per admission, and end-to-end throughput.

Run from the repository root::

    python -m bench.scheduler [--waiters 10,1000,10000] [--calls 1000] [--margins 0.02,0.1]
                              [--skip-fleet]

Part 1, the queue: a limiter with one concurrency slot and a huge rate; a held
permit keeps the slot while `n` tasks queue, then it is released and the queue
drains, every admission going through the queue (each holder releases at once,
waking the next head). Wall time per admission should stay flat from 10 to
10,000 waiters, and the backend should be asked about once per admission (no
thundering herd: only the head asks).

Part 2, end to end: `--calls` chat completions through the scheduler and the real
`openai` client against `MockProvider` at Moonshot Tier1 (200 RPM binds), time
compressed 60 times, from one process (300 tasks) and from four processes sharing
the account through a throwaway redis-server (75 tasks each), once per `margin_s`:
the workload driver (`ratekit.testing.workload`), a `Driver` and a `Fleet`.
Utilisation is the binding rate's steady-state share as the provider saw it
(`binding_utilisation`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio

import ratekit
from ratekit.backends.memory import MemoryBackend
from ratekit.testing import RedisServer, redis_server_binary
from ratekit.testing.mock_provider import MockProvider
from ratekit.testing.workload import (
    START_PAUSE_S,
    Driver,
    Fleet,
    Outcome,
    Workload,
    binding_utilisation,
)

HUGE = 10**9
SPEED = 60
RPM = 200
PERIOD_S = 60 / SPEED


# -- part 1: the queue ------------------------------------------------------------------


class CountingBackend(MemoryBackend):
    """A memory backend that counts how often it is asked to admit."""

    __slots__ = ("reserves",)

    def __init__(self) -> None:
        super().__init__()
        self.reserves = 0

    def reserve_now(
        self, limits: ratekit.Limits, demand: Any, now: float, wall: float = math.nan
    ) -> Any:
        self.reserves += 1
        return super().reserve_now(limits, demand, now, wall)


@dataclass(frozen=True)
class DrainRow:
    """One drain: `waiters` admissions through the queue, their wall time and backend asks."""

    path: str
    waiters: int
    seconds: float
    reserves: int

    @property
    def us_per_admission(self) -> float:
        return self.seconds / self.waiters * 1e6

    @property
    def reserves_per_admission(self) -> float:
        return self.reserves / self.waiters


async def _drain(
    path: str,
    waiters: int,
    admit: Callable[[], Coroutine[Any, Any, None]],
    limiter: ratekit.Limiter,
) -> DrainRow:
    backend = limiter.backend
    assert isinstance(backend, CountingBackend)
    held = await limiter.acquire()
    async with anyio.create_task_group() as group:
        for _ in range(waiters):
            group.start_soon(admit)
        await anyio.wait_all_tasks_blocked()
        assert (await limiter.statistics()).waiting == waiters
        backend.reserves = 0
        started = time.perf_counter()
        await held.release()
    seconds = time.perf_counter() - started
    return DrainRow(path, waiters, seconds, backend.reserves)


async def drain_limiter(waiters: int) -> DrainRow:
    """`waiters` tasks queued on ``limiter.acquire()`` behind one slot, then drained."""
    limiter = ratekit.Limiter(
        ratekit.Limits(concurrency=1, rpm=HUGE), backend=CountingBackend(), max_queue=None
    )

    async def admit() -> None:
        async with limiter.acquire():
            pass

    return await _drain("Limiter.acquire", waiters, admit, limiter)


async def drain_scheduler(waiters: int) -> DrainRow:
    """The same through ``Scheduler.submit`` (retry wrapper, events, wait samples)."""
    account = ratekit.Account("moonshot", tier="tier5", concurrency=1, rpm=HUGE, tpm=HUGE)
    scheduler = ratekit.Scheduler(account, backend=CountingBackend())

    async def nothing() -> None:
        return None

    async def admit() -> None:
        await scheduler.submit(nothing)

    return await _drain("Scheduler.submit", waiters, admit, scheduler.limiter())


async def run_drains(sizes: list[int], rounds: int = 3) -> list[DrainRow]:
    """Each drain `rounds` times; the row of median time is kept."""
    rows = []
    for drain in (drain_limiter, drain_scheduler):
        for size in sizes:
            runs = sorted([await drain(size) for _ in range(rounds)], key=lambda r: r.seconds)
            rows.append(runs[len(runs) // 2])
    return rows


def print_drains(rows: list[DrainRow]) -> None:
    print("Queue drain: one slot, a huge rate; every admission goes through the queue\n")
    print(f"| {'path':<16} | {'waiters':>7} | {'µs/admission':>12} | {'vs 10':>6} | reserves/adm |")
    print(f"|{'-' * 18}|{'-' * 9}|{'-' * 14}|{'-' * 8}|{'-' * 14}|")
    base: dict[str, float] = {}
    for row in rows:
        first = base.setdefault(row.path, row.us_per_admission)
        print(
            f"| {row.path:<16} | {row.waiters:>7,} | {row.us_per_admission:>12.1f} | "
            f"{row.us_per_admission / first:>5.2f}x | {row.reserves_per_admission:>12.2f} |"
        )
    print()


# -- part 2: end to end -------------------------------------------------------------------


@dataclass(frozen=True)
class EndToEndRow:
    """One run against the mock provider."""

    setup: str
    margin_s: float
    calls: int
    results: int
    rejected: int
    rate_limited: int
    utilisation: float
    seconds: float


# Chat completions through `Scheduler.submit` at Moonshot Tier1 from 300 tasks (60
# connections opened first), time compressed; `_workload` sets the rest.
TIER1 = Workload(through="submit", calls=1, tasks=300, connections=60, speed=SPEED)


def _workload(calls: int, margin_s: float, base_url: str, **fields: Any) -> Workload:
    return dataclasses.replace(
        TIER1, calls=calls, account={"margin_s": margin_s}, base_url=base_url, **fields
    )


def _row(setup: str, workload: Workload, outcome: Outcome, server: MockProvider) -> EndToEndRow:
    limits = workload.provider_limits().compressed(SPEED)
    calls = server.calls
    _, share = binding_utilisation(
        limits,
        [call.arrived_s for call in calls],
        [(call.arrived_s, float(call.reserved_tokens)) for call in calls],
    )
    return EndToEndRow(
        setup,
        workload.account["margin_s"],
        workload.calls or 0,
        outcome.results,
        sum(server.statistics().rejected.values()),
        outcome.rate_limited,
        share,
        outcome.elapsed_s,
    )


async def single_process(calls: int, margin_s: float) -> EndToEndRow:
    """One process: a `Driver`, its account paused for `START_PAUSE_S` at the start."""
    async with MockProvider(TIER1.provider_limits(), speed=SPEED) as server:
        workload = _workload(calls, margin_s, server.base_url)
        async with Driver(workload) as driver:
            outcome = await driver.run(time.time() + START_PAUSE_S)
        return _row("1 process", workload, outcome, server)


async def fleet(calls: int, margin_s: float, url: str, members: int = 4) -> EndToEndRow:
    """`members` processes sharing the account through Redis (a `Fleet`)."""
    async with MockProvider(TIER1.provider_limits(), speed=SPEED) as server:
        workload = _workload(
            calls,
            margin_s,
            server.base_url,
            redis_url=url,
            namespace=f"bench-{uuid.uuid4().hex[:12]}",
        )
        outcome = Outcome.merged(await Fleet(workload, members).run())
        return _row(f"{members} processes, Redis", workload, outcome, server)


def print_end_to_end(rows: list[EndToEndRow]) -> None:
    print(
        f"End to end: Moonshot Tier1 ({RPM} RPM binds), time x{SPEED}, the openai client "
        "over HTTP to MockProvider\n"
    )
    ceiling = "~ceiling, period / (period + slice/2 + margin)"
    print(
        f"| {'setup':<20} | margin_s | calls | returned | 429s | RateLimited | "
        f"utilisation | {ceiling} |   wall |"
    )
    rule = [22, 10, 7, 10, 6, 13, 13, len(ceiling) + 2, 8]
    print("|" + "|".join("-" * width for width in rule) + "|")
    for row in rows:
        bound = PERIOD_S / (PERIOD_S + PERIOD_S / 120 + row.margin_s)
        print(
            f"| {row.setup:<20} | {row.margin_s:>8.3f} | {row.calls:>5} | {row.results:>8} | "
            f"{row.rejected:>4} | {row.rate_limited:>11} | {row.utilisation:>11.1%} | "
            f"{bound:>{len(ceiling)}.1%} | {row.seconds:>5.1f} s |"
        )
    print()


async def run_end_to_end(calls: int, margins: list[float], with_fleet: bool) -> list[EndToEndRow]:
    rows = [await single_process(calls, margin) for margin in margins]
    binary = redis_server_binary()
    if not with_fleet:
        return rows
    if binary is None:
        print("bench.scheduler: redis-server is not on PATH; the fleet rows are skipped\n")
        return rows
    with RedisServer(binary) as redis:
        for margin in margins:
            rows.append(await fleet(calls, margin, redis.url))
    return rows


def _numbers(text: str, kind: type[int] | type[float]) -> list[Any]:
    return [kind(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__)
    parser.add_argument("--waiters", default="10,1000,10000", help="queue sizes to drain")
    parser.add_argument("--calls", type=int, default=1000, help="calls per end-to-end run")
    parser.add_argument("--margins", default="0.02,0.1,0.2", help="margin_s values, seconds")
    parser.add_argument("--skip-fleet", action="store_true", help="no 4-process Redis rows")
    args = parser.parse_args(argv)
    drains = asyncio.run(run_drains(_numbers(args.waiters, int)))
    print_drains(drains)
    rows = asyncio.run(
        run_end_to_end(args.calls, _numbers(args.margins, float), not args.skip_fleet)
    )
    print_end_to_end(rows)


if __name__ == "__main__":
    main()
