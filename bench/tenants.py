"""Tenants: what a tenant's admission costs, the shares they get, and their memory.

Run from the repository root::

    python -m bench.tenants [--iterations N] [--rounds R] [--tenants T] [--concurrency C]

Four tables, from one run:

- the cost of one uncontended acquire+release (every limit huge): without a tenant,
  as a tenant with a weight only, and as a tenant with limits of its own (rpm and
  tpm, checked in the same step as the account's), side by side with aiolimiter's
  acquire as the reference, as ratios;
- the shares of admissions three tenants of weights 1, 1 and 2 get while all wait
  for an account that admits one call at a time (a fake clock: exact, not timed);
- the memory that `--tenants` distinct tenants with limits of their own hold after
  one admission each, per tenant, and what is left once their windows have emptied
  and the idle ones were dropped;
- the same tenants on Redis (a redis-server of the bench's own on a free loopback
  port): the server's ``used_memory`` (``INFO memory``) before and after one
  admission each, per idle tenant (its calls ended, its windows not yet expired) and
  in all, against the goals (<= 512 B a tenant, <= 50 MB for 100,000), with one
  tenant's key as the server reports it (``MEMORY USAGE``, ``PTTL``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass

import anyio

from bench._common import Op, microseconds_per_call, positive_int, require

HUGE = 10**9
# The goals of tenants kept on Redis: bytes per idle tenant, and MB for 100,000 of them.
REDIS_BYTES_GOAL = 512
REDIS_MB_GOAL_PER_100K = 50.0


async def costs(iterations: int, rounds: int) -> dict[str, float]:
    """Median microseconds per acquire+release of each contender."""
    import aiolimiter

    import ratekit

    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        account = ratekit.Limits(rpm=HUGE, tpm=HUGE)
        own = ratekit.Tenant(ratekit.Limits(rpm=HUGE, tpm=HUGE))
        plain = ratekit.Limiter(account)
        weighted = ratekit.Limiter(account, tenants=ratekit.Tenants())
        limited = ratekit.Limiter(account, tenants=ratekit.Tenants(default=own))
        reference = aiolimiter.AsyncLimiter(HUGE, 60)

        async def no_tenant(limiter: ratekit.Limiter = plain) -> None:
            async with limiter.acquire(tokens=100):
                pass

        async def weight_only(limiter: ratekit.Limiter = weighted) -> None:
            async with limiter.acquire(tokens=100, tenant="acme"):
                pass

        async def own_limits(limiter: ratekit.Limiter = limited) -> None:
            async with limiter.acquire(tokens=100, tenant="acme"):
                pass

        async def aiolimiter_acquire(limiter: aiolimiter.AsyncLimiter = reference) -> None:
            async with limiter:
                pass

        contenders: dict[str, Op] = {
            "ratekit, no tenant": no_tenant,
            "ratekit, tenant (weight only)": weight_only,
            "ratekit, tenant with rpm + tpm": own_limits,
            "aiolimiter": aiolimiter_acquire,
        }
        for name, op in contenders.items():
            results.setdefault(name, []).append(await microseconds_per_call(op, iterations))
    return {name: statistics.median(times) for name, times in results.items()}


async def shares(per_tenant: int) -> Counter[str]:
    """Admissions of tenants a, b (weight 1) and c (weight 2) among the first 4 x
    `per_tenant` of a queue where each has 2 x `per_tenant` callers waiting."""
    import ratekit
    from ratekit.testing import FakeClock

    tenants = ratekit.Tenants(named={"c": ratekit.Tenant(weight=2)})
    limiter = ratekit.Limiter(ratekit.Limits(concurrency=1), clock=FakeClock(), tenants=tenants)
    order: list[str] = []
    blocker = await limiter.acquire()

    async def call(tenant: str) -> None:
        async with limiter.acquire(tenant=tenant):
            order.append(tenant)

    async with anyio.create_task_group() as group:
        for tenant in "abc":
            for _ in range(2 * per_tenant):
                group.start_soon(call, tenant)
        await anyio.wait_all_tasks_blocked()
        await blocker.release()
    return Counter(order[: 4 * per_tenant])


async def memory(count: int) -> tuple[float, float]:
    """Bytes per tenant held after one admission each of `count` tenants with limits of
    their own, and the bytes left once their windows emptied and idle ones were dropped."""
    import ratekit
    from ratekit.testing import FakeClock

    clock = FakeClock()
    tenants = ratekit.Tenants(default=ratekit.Tenant(ratekit.Limits(rpm=60, tpm=100_000)))
    limiter = ratekit.Limiter(ratekit.Limits(rpm=HUGE, tpm=HUGE), clock=clock, tenants=tenants)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        async with limiter.acquire(tokens=100, tenant=f"tenant-{i}"):
            pass
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    active = tenants.active()
    clock.advance(120)  # every window has emptied
    async with limiter.acquire(tenant="one-more"):  # a new tenant: the idle ones go
        pass
    gc.collect()
    left = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / max(active, 1), left


@dataclass(frozen=True)
class RedisMemory:
    """What `count` idle tenants hold in a redis-server."""

    count: int
    used_before: int
    used_after: int
    keys: int
    # One tenant's state as the server reports it: MEMORY USAGE (bytes), PTTL (ms).
    sample_bytes: int
    sample_ttl_ms: int
    seconds: float

    @property
    def per_tenant(self) -> float:
        return (self.used_after - self.used_before) / self.count


async def redis_memory(url: str, count: int, concurrency: int) -> RedisMemory:
    """`count` distinct tenants with limits of their own (rpm + tpm, as in `memory`), one
    admission each (`concurrency` callers at once) through a RedisBackend; the server's
    used_memory before and after, once every call ended."""
    from redis.asyncio import Redis

    import ratekit

    client = Redis.from_url(url)
    backend = ratekit.RedisBackend(client, namespace="bench-tenants")
    tenants = ratekit.Tenants(default=ratekit.Tenant(ratekit.Limits(rpm=60, tpm=100_000)))
    limiter = ratekit.Limiter(ratekit.Limits(rpm=HUGE, tpm=HUGE), backend=backend, tenants=tenants)
    try:
        # The account's own keys and the scripts exist before the first reading.
        async with limiter.acquire(tokens=100):
            pass
        async with limiter.acquire(tokens=100, tenant="warm-up"):
            pass
        await client.delete(f"{backend.key_prefix()}:ts:warm-up")
        before = int((await client.info("memory"))["used_memory"])
        numbers = iter(range(count))
        started = time.perf_counter()

        async def caller() -> None:
            for i in numbers:
                async with limiter.acquire(tokens=100, tenant=f"tenant-{i}"):
                    pass

        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(caller)
        seconds = time.perf_counter() - started
        after = int((await client.info("memory"))["used_memory"])
        sample = f"{backend.key_prefix()}:ts:tenant-{count // 2}"
        return RedisMemory(
            count,
            before,
            after,
            int(await client.dbsize()),
            int(await client.memory_usage(sample) or 0),
            int(await client.pttl(sample)),
            seconds,
        )
    finally:
        await backend.aclose()
        await client.aclose()


def print_redis_memory(found: RedisMemory) -> None:
    per_tenant = found.per_tenant
    total_mb = (found.used_after - found.used_before) / 1e6
    per_100k_mb = per_tenant * 100_000 / 1e6
    print(
        f"\nRedis, {found.count:,} tenants with rpm + tpm of their own, one call each "
        f"({found.count / found.seconds:,.0f} calls/s), once their calls ended:"
    )
    print(f"  used_memory {found.used_before:,} B -> {found.used_after:,} B ({found.keys:,} keys)")
    print(f"  {per_tenant:,.0f} B per idle tenant; {total_mb:,.1f} MB for {found.count:,}")
    print(
        f"  one tenant's state: MEMORY USAGE {found.sample_bytes:,} B, "
        f"expires in {found.sample_ttl_ms / 1000:,.1f} s"
    )
    for what, value, goal, unit in (
        ("bytes per idle tenant", per_tenant, REDIS_BYTES_GOAL, "B"),
        ("MB per 100,000 tenants", per_100k_mb, REDIS_MB_GOAL_PER_100K, "MB"),
    ):
        verdict = "MET" if value <= goal else "NOT MET"
        print(f"  {what}: {value:,.1f} {unit}; goal <= {goal:,} {unit}: {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tenants", description=__doc__)
    parser.add_argument("--iterations", type=positive_int, default=20_000)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--tenants", type=positive_int, default=100_000)
    parser.add_argument(
        "--concurrency", type=positive_int, default=64, help="callers at once on Redis"
    )
    args = parser.parse_args(argv)
    require("bench.tenants", {"aiolimiter": "aiolimiter"}, "ratekit", "pip install -e '.[bench]'")

    cost = asyncio.run(costs(args.iterations, args.rounds))
    reference = cost["aiolimiter"]
    print(f"acquire+release, median of {args.rounds} rounds of {args.iterations:,}")
    print(f"{'contender':34} {'us/op':>7} {'vs aiolimiter':>14}")
    for name, us in cost.items():
        print(f"{name:34} {us:7.2f} {us / reference:13.2f}x")

    got = asyncio.run(shares(200))
    total = sum(got.values())
    print(f"\nshares of the first {total} admissions, weights a=1 b=1 c=2 (want 25/25/50%)")
    for tenant in "abc":
        print(f"  {tenant}: {got[tenant]:4d} = {100 * got[tenant] / total:5.1f}%")

    per_tenant, left = asyncio.run(memory(args.tenants))
    print(f"\nmemory, {args.tenants:,} tenants with rpm + tpm of their own, one call each:")
    print(f"  {per_tenant:,.0f} B per active tenant; {left / 1024:,.0f} KiB left once idle")

    from ratekit.testing import SERVER_HINT, RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        print(f"\nRedis: skipped, redis-server is not installed ({SERVER_HINT})")
        return
    with RedisServer(binary) as server:
        found = asyncio.run(redis_memory(server.url, args.tenants, args.concurrency))
    print_redis_memory(found)


if __name__ == "__main__":
    main()
