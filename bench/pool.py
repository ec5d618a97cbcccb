"""Pools: what the pool layer costs per call, and how it spreads a backlog.

Run from the repository root::

    python -m bench.pool [--iterations N] [--rounds R] [--callers C]

Two tables, from one run:

- the cost of one uncontended call (every limit huge, nothing ever waits): a
  scheduler's ``slot`` alone, a pool of 1 account's ``slot``, a pool of 3 whose
  first account admits, and a pool of 3 whose first two accounts are paused (each
  call asks three accounts), side by side with aiolimiter's acquire as the
  reference, as ratios (medians of the rounds);
- `--callers` gathered callers on a fake clock through a pool of three accounts of
  60, 120 and 180 rpm: how many each account admitted in every minute, the most
  any minute held against its rpm, and the admissions per second of real time
  the pool's queue sustained (exact counts, timed only in the last column).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from typing import TYPE_CHECKING

import anyio

from bench._common import Op, microseconds_per_call, positive_int, require

if TYPE_CHECKING:
    import ratekit

HUGE = 10**9


def _scheduler(**limits: int | None) -> ratekit.Scheduler:
    import ratekit

    numbers = {"rpm": HUGE, "tpm": HUGE, "tpd": None, "concurrency": None, **limits}
    return ratekit.Scheduler(ratekit.Account("moonshot", tier="tier1", **numbers))


async def costs(iterations: int, rounds: int) -> dict[str, float]:
    """Median microseconds per admitted and released call of each contender."""
    import aiolimiter

    import ratekit

    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        alone = _scheduler()
        one = ratekit.Pool({"a": _scheduler()})
        three = ratekit.Pool({"a": _scheduler(), "b": _scheduler(), "c": _scheduler()})
        paused = ratekit.Pool({"a": _scheduler(), "b": _scheduler(), "c": _scheduler()})
        for name in ("a", "b"):
            await paused.members[name].scheduler.limiter().pause(10 * 365 * 86_400.0)
        reference = aiolimiter.AsyncLimiter(HUGE, 60)

        async def scheduler_slot(scheduler: ratekit.Scheduler = alone) -> None:
            async with scheduler.slot(tokens=100):
                pass

        def through(pool: ratekit.Pool) -> Op:
            async def one_call() -> None:
                async with pool.slot(tokens=100):
                    pass

            return one_call

        async def aiolimiter_acquire(limiter: aiolimiter.AsyncLimiter = reference) -> None:
            async with limiter:
                pass

        contenders: dict[str, Op] = {
            "scheduler.slot, no pool": scheduler_slot,
            "pool of 1, slot": through(one),
            "pool of 3, the first admits": through(three),
            "pool of 3, the third admits": through(paused),
            "aiolimiter": aiolimiter_acquire,
        }
        for name, op in contenders.items():
            results.setdefault(name, []).append(await microseconds_per_call(op, iterations))
    return {name: statistics.median(times) for name, times in results.items()}


async def spread(callers: int) -> tuple[dict[str, Counter[int]], float, float]:
    """Admissions per account per minute of `callers` gathered callers through a pool of
    accounts of 60, 120 and 180 rpm on a fake clock, admissions per real second, and the
    accounts asked per admitted call (each ask a round trip on Redis)."""
    import ratekit
    from ratekit.testing import FakeClock

    clock = FakeClock()
    rpms = {"small": 60, "medium": 120, "large": 180}
    members = {
        name: ratekit.Scheduler(
            ratekit.Account(
                "moonshot", tier="tier1", rpm=rpm, tpm=None, tpd=None, concurrency=None
            ),
            clock=clock,
        )
        for name, rpm in rpms.items()
    }
    pool = ratekit.Pool(members)
    start = clock.now()
    minutes: dict[str, Counter[int]] = {name: Counter() for name in rpms}

    async def call() -> None:
        async with pool.slot() as served:
            minutes[served.account][int((clock.now() - start) // 60)] += 1

    began = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(callers):
            group.start_soon(call)
        while sum(sum(c.values()) for c in minutes.values()) < callers:
            await anyio.wait_all_tasks_blocked()
            clock.advance(1)
    elapsed = time.perf_counter() - began
    accounts = pool.statistics().accounts.values()
    asks = sum(a.admitted + a.refused for a in accounts) / sum(a.admitted for a in accounts)
    return minutes, callers / elapsed, asks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__)
    parser.add_argument("--iterations", type=positive_int, default=20_000)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--callers", type=positive_int, default=3_600)
    args = parser.parse_args()
    require("bench.pool", {"aiolimiter": "aiolimiter"}, "ratekit", "pip install -e '.[bench]'")

    results = asyncio.run(costs(args.iterations, args.rounds))
    reference = results["aiolimiter"]
    alone = results["scheduler.slot, no pool"]
    print(f"one uncontended call (median of {args.rounds} rounds of {args.iterations:,})")
    print(f"{'contender':<32} {'us/call':>8} {'x aiolimiter':>13} {'x no pool':>10}")
    for name, us in results.items():
        print(f"{name:<32} {us:>8.2f} {us / reference:>12.2f}x {us / alone:>9.2f}x")

    minutes, rate, asks = asyncio.run(spread(args.callers))
    rpms = {"small": 60, "medium": 120, "large": 180}
    print(f"\n{args.callers:,} gathered callers through accounts of 60, 120 and 180 rpm")
    print(f"{'account':<8} {'rpm':>5} {'admitted':>9} {'most in a minute':>17}")
    for name, counts in minutes.items():
        most = max(counts.values(), default=0)
        print(f"{name:<8} {rpms[name]:>5} {sum(counts.values()):>9,} {most:>17}")
    print(f"the pool's queue admitted {rate:,.0f} calls per real second (fake clock)")
    print(f"accounts asked per admitted call: {asks:.3f} (each ask one round trip on Redis)")


if __name__ == "__main__":
    main()
