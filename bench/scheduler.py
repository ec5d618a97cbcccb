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
the account through a throwaway redis-server (75 tasks each), once per `margin_s`.
Utilisation is ``m x period / (t(m x limit + 1) - t(1))`` over the provider's
arrival times, ``m = (n - 1) // limit``: 1.0 is the fastest any client could go.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import openai

import ratekit
from ratekit.backends.memory import MemoryBackend
from ratekit.testing.mock_provider import MockProvider

ROOT = Path(__file__).resolve().parent.parent
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
    path: str, waiters: int, admit: Callable[[], Awaitable[None]], limiter: ratekit.Limiter
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


def utilisation(arrivals: list[float], limit: int, period_s: float) -> float:
    """Arrivals (provider clock) against the fastest any client could get them in."""
    ordered = sorted(arrivals)
    windows = (len(ordered) - 1) // limit
    if windows < 1:
        return float("nan")
    return windows * period_s / (ordered[windows * limit] - ordered[0])


async def single_process(calls: int, margin_s: float) -> EndToEndRow:
    from ratekit.testing._fleet import (
        Outcome,
        chat_call,
        drive,
        make_account,
        provider_limits,
        warm_up,
    )

    outcome = Outcome()
    scheduler = ratekit.Scheduler(make_account(margin_s=margin_s), hooks=[outcome.record])
    async with MockProvider(provider_limits(), speed=SPEED) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        try:
            await warm_up(client, 60)
            await scheduler.limiter().pause(0.1)
            started = time.perf_counter()
            await drive(scheduler, chat_call(client), outcome, calls=calls, tasks=300)
            seconds = time.perf_counter() - started
        finally:
            await client.close()
        return EndToEndRow(
            "1 process",
            margin_s,
            calls,
            outcome.results,
            sum(server.statistics().rejected.values()),
            outcome.events["RateLimited"],
            utilisation([c.arrived_s for c in server.calls], RPM, PERIOD_S),
            seconds,
        )


def _start_member(config: dict[str, Any]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "ratekit.testing._fleet", json.dumps(config)]
    return subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


async def fleet(calls: int, margin_s: float, url: str, members: int = 4) -> EndToEndRow:
    from ratekit.testing._fleet import provider_limits

    async with MockProvider(provider_limits(), speed=SPEED) as server:
        config = {
            "url": url,
            "namespace": f"bench-{uuid.uuid4().hex[:12]}",
            "base_url": server.base_url,
            "calls": calls // members,
            "tasks": 75,
            "connections": 15,
            "timeout_s": 60,
            "margin_s": margin_s,
        }
        processes = [_start_member(config) for _ in range(members)]
        reports = []
        try:
            for process in processes:
                assert process.stdout is not None
                line = await anyio.to_thread.run_sync(process.stdout.readline)
                if line.strip() != "ready":
                    raise SystemExit(f"bench.scheduler: a fleet member said {line!r}")
            start_at = time.time() + 0.1
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(f"{start_at!r}\n")
                process.stdin.flush()
            for process in processes:
                stdout, _ = await anyio.to_thread.run_sync(lambda p=process: p.communicate())
                reports.append(json.loads(stdout.splitlines()[-1]))
            seconds = time.time() - start_at
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return EndToEndRow(
            f"{members} processes, Redis",
            margin_s,
            calls,
            sum(report["results"] for report in reports),
            sum(server.statistics().rejected.values()),
            sum(report["events"].get("RateLimited", 0) for report in reports),
            utilisation([c.arrived_s for c in server.calls], RPM, PERIOD_S),
            seconds,
        )


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
    binary = shutil.which("redis-server")
    if not with_fleet:
        return rows
    if binary is None:
        print("bench.scheduler: redis-server is not on PATH; the fleet rows are skipped\n")
        return rows
    from bench.redis import RedisProcess

    with RedisProcess(binary) as redis:
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
