"""Uncontended acquire+release: ratekit side by side with aiolimiter, limits and pyrate-limiter.

Run from the repository root::

    python -m bench.acquire [--iterations N] [--rounds R] [--memory-ops M] [--json FILE]

Every limit is huge, so nothing ever waits: this measures the bookkeeping cost of
one admission (and, where the library has one, its release), on one asyncio
loop, one task. Each round builds every contender afresh, warms it up, then
times `iterations` back-to-back operations; contenders are interleaved within a
round (in a rotating order) so they share the machine's noise, and the median
of the rounds is reported. A second pass counts, with `tracemalloc`, the memory
a fresh limiter holds after `memory-ops` acquisitions and the peak on the way.

The project's goals, against aiolimiter's one-dimension acquire: ratekit's
four-dimension acquire (concurrency, rpm, tpm, tpd, with tokens and settle) costs
at most 1.5x (beyond that, 1.0x), and its one-dimension acquire at most 1.0x.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.metadata
import json
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._common import BenchError, Op, Subject, nothing, positive_int, require

# A limit no benchmark run comes near: requests (or tokens) per period.
HUGE = 10**9
# Seconds of every peer's window: a minute, like an rpm.
PERIOD_S = 60
REFERENCE = "aiolimiter"
# The contenders judged, each with the most it may cost as a ratio to the reference.
GOALS = {"ratekit, 4 dimensions": 1.5, "ratekit, 1 dimension": 1.0}
EXTRA_HINT = "pip install -e '.[bench]'"
# Import name -> distribution name of every peer the bench compares against.
PEERS = {"aiolimiter": "aiolimiter", "limits": "limits", "pyrate_limiter": "pyrate-limiter"}


@dataclass(frozen=True)
class Contender:
    """A library configuration to time: `build` makes a fresh `Subject` inside the loop.

    `path` says what one operation does; `baseline` marks the harness's own cost,
    reported apart from the table.
    """

    name: str
    path: str
    build: Callable[[], Subject]
    baseline: bool = False


@dataclass(frozen=True)
class Timing:
    """The per-operation times of one contender, one per round, in microseconds."""

    name: str
    path: str
    rounds_us: tuple[float, ...]

    @property
    def median_us(self) -> float:
        return statistics.median(self.rounds_us)

    @property
    def ops_per_s(self) -> float:
        return 1e6 / self.median_us


@dataclass(frozen=True)
class Memory:
    """What a fresh limiter holds after `operations` acquisitions, and the peak, in bytes."""

    name: str
    operations: int
    retained_bytes: int
    peak_bytes: int


# -- the contenders ------------------------------------------------------------------


def require_peers() -> None:
    """Exit with the install command when ratekit or a peer library cannot be imported."""
    require("bench.acquire", PEERS, "ratekit", EXTRA_HINT)


def _check(name: str, admitted: bool) -> None:
    if not admitted:
        raise BenchError(f"{name} refused an admission under a limit of {HUGE}")


def _empty() -> Subject:
    return Subject(nothing)


def _ratekit_one() -> Subject:
    import ratekit

    limiter = ratekit.Limiter(ratekit.Limits(rpm=HUGE))

    async def op() -> None:
        async with limiter.acquire():
            pass

    return Subject(op)


def _ratekit_four() -> Subject:
    import ratekit

    limits = ratekit.Limits(concurrency=10**6, rpm=HUGE, tpm=10**12, tpd=10**13)
    limiter = ratekit.Limiter(limits)

    async def op() -> None:
        async with limiter.acquire(tokens=100) as permit:
            permit.settle(tokens=80)

    return Subject(op)


def _aiolimiter() -> Subject:
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(HUGE, PERIOD_S)

    async def op() -> None:
        async with limiter:
            pass

    return Subject(op)


def _limits_strategy(strategy_name: str) -> Callable[[], Subject]:
    """A builder for one `limits.aio` strategy over its own `MemoryStorage`."""

    def build() -> Subject:
        from limits import RateLimitItemPerMinute
        from limits.aio import strategies
        from limits.aio.storage import MemoryStorage

        storage = MemoryStorage()
        limiter = getattr(strategies, strategy_name)(storage)
        item = RateLimitItemPerMinute(HUGE)

        async def op() -> None:
            _check(strategy_name, await limiter.hit(item, "bench"))

        async def close() -> None:
            # The storage's expiry sweep is a task of this loop; stop it with the subject.
            timer = getattr(storage, "timer", None)
            if timer is not None and not timer.done():
                timer.cancel()

        return Subject(op, close)

    return build


def _pyrate(use_async: bool) -> Callable[[], Subject]:
    """A builder for pyrate-limiter's default in-memory bucket, async or sync acquire."""

    def build() -> Subject:
        from pyrate_limiter import Duration, Limiter, Rate

        limiter = Limiter(Rate(HUGE, Duration.MINUTE))

        async def op_async() -> None:
            _check("pyrate-limiter", await limiter.try_acquire_async("bench"))

        async def op_sync() -> None:
            _check("pyrate-limiter", bool(limiter.try_acquire("bench")))

        async def close() -> None:
            limiter.close()  # stops its background leaker thread

        return Subject(op_async if use_async else op_sync, close)

    return build


def contenders() -> list[Contender]:
    """Everything timed, the reference and the goal included, plus the harness baseline."""
    return [
        Contender("ratekit, 1 dimension", "async with acquire()  [rpm]", _ratekit_one),
        Contender(
            "ratekit, 4 dimensions",
            "async with acquire(tokens=100) + settle(tokens=80)  [concurrency, rpm, tpm, tpd]",
            _ratekit_four,
        ),
        Contender(REFERENCE, "async with AsyncLimiter(huge, 60)", _aiolimiter),
        Contender(
            "limits, fixed window",
            "await FixedWindowRateLimiter.hit(item)  [aio MemoryStorage]",
            _limits_strategy("FixedWindowRateLimiter"),
        ),
        Contender(
            "limits, sliding window counter",
            "await SlidingWindowCounterRateLimiter.hit(item)  [aio MemoryStorage]",
            _limits_strategy("SlidingWindowCounterRateLimiter"),
        ),
        Contender(
            "limits, moving window",
            "await MovingWindowRateLimiter.hit(item)  [aio MemoryStorage]",
            _limits_strategy("MovingWindowRateLimiter"),
        ),
        Contender(
            "pyrate-limiter, async",
            "await Limiter.try_acquire_async(name)  [InMemoryBucket]",
            _pyrate(use_async=True),
        ),
        Contender(
            "pyrate-limiter, sync",
            "Limiter.try_acquire(name), sync, called in a coroutine  [InMemoryBucket]",
            _pyrate(use_async=False),
        ),
        Contender("(empty op)", "await a coroutine that does nothing", _empty, baseline=True),
    ]


# -- measuring -----------------------------------------------------------------------


async def _time_op(op: Op, iterations: int) -> float:
    """Mean microseconds of one `op` over `iterations` back-to-back awaits."""
    start_ns = time.perf_counter_ns()
    for _ in range(iterations):
        await op()
    return (time.perf_counter_ns() - start_ns) / iterations / 1000


async def _one_round(contender: Contender, iterations: int, warmup: int) -> float:
    """Build a fresh subject, warm it up, and time it: microseconds per operation."""
    subject = contender.build()
    try:
        for _ in range(warmup):
            await subject.op()
        gc.collect()
        return await _time_op(subject.op, iterations)
    finally:
        await subject.close()


async def time_all(
    entries: Sequence[Contender], iterations: int, rounds: int, warmup: int
) -> list[Timing]:
    """Every contender once per round, the order rotated each round to spread drift."""
    per_round: dict[str, list[float]] = {entry.name: [] for entry in entries}
    for round_index in range(rounds):
        shift = round_index % len(entries)
        for entry in [*entries[shift:], *entries[:shift]]:
            per_round[entry.name].append(await _one_round(entry, iterations, warmup))
    return [Timing(entry.name, entry.path, tuple(per_round[entry.name])) for entry in entries]


async def _measure_memory(contender: Contender, operations: int) -> Memory:
    """Bytes traced from before building a subject to after `operations` acquisitions."""
    gc.collect()
    tracemalloc.start()
    try:
        before_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        subject = contender.build()
        try:
            for _ in range(operations):
                await subject.op()
            gc.collect()
            current_bytes, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            await subject.close()
    finally:
        tracemalloc.stop()
    return Memory(
        contender.name, operations, current_bytes - before_bytes, peak_bytes - before_bytes
    )


async def measure_memory(entries: Sequence[Contender], operations: int) -> list[Memory]:
    """The memory row of every contender but the baseline."""
    return [await _measure_memory(entry, operations) for entry in entries if not entry.baseline]


# -- reporting -----------------------------------------------------------------------


def _versions() -> dict[str, str]:
    names = ["ratekit", *PEERS.values()]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "source tree" if name == "ratekit" else "?"
    return found


def _ratio(timing: Timing, reference: Timing) -> float:
    return timing.median_us / reference.median_us


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def timing_table(timings: Sequence[Timing], reference: Timing) -> str:
    """Name, median µs/op, ops/s, ratio vs the reference, and the rounds' spread."""
    rows = [
        [
            t.name,
            f"{t.median_us:.2f}",
            f"{t.ops_per_s:,.0f}",
            f"{_ratio(t, reference):.2f}x {REFERENCE}",
            f"{min(t.rounds_us):.2f}-{max(t.rounds_us):.2f}",
        ]
        for t in timings
    ]
    headers = ["contender", "µs/op (median)", "ops/s", "ratio", "rounds min-max µs"]
    return _format_table(headers, rows)


def memory_table(memories: Sequence[Memory]) -> str:
    """Retained KiB after the acquisitions, bytes per acquisition, and the peak KiB."""
    rows = [
        [
            m.name,
            f"{m.retained_bytes / 1024:,.1f}",
            f"{m.retained_bytes / m.operations:,.1f}",
            f"{m.peak_bytes / 1024:,.1f}",
        ]
        for m in memories
    ]
    operations = memories[0].operations
    headers = [
        f"after {operations:,} acquisitions",
        "retained KiB",
        "retained B/op",
        "peak KiB",
    ]
    return _format_table(headers, rows)


def verdict(judged: Timing, reference: Timing, most: float) -> str:
    """A line the project is judged by: a ratekit contender against aiolimiter's acquire."""
    ratio = _ratio(judged, reference)
    status = "MET" if ratio <= most else f"NOT MET ({ratio / most:.1f}x too slow)"
    return (
        f"{judged.name} ({judged.path}) costs {judged.median_us:.2f} µs, "
        f"{ratio:.2f}x aiolimiter's one-dimension acquire ({reference.median_us:.2f} µs); "
        f"goal <= {most:.1f}x: {status}"
    )


def _notes(timings: Sequence[Timing], baseline: Timing | None, warmup: int, n: int) -> list[str]:
    notes = [f"  {t.name}: {t.path}" for t in timings]
    notes.append(
        "pyrate-limiter is timed on its async path (try_acquire_async) and, for"
        " comparison, its sync try_acquire."
    )
    notes.append(
        "limits' moving window keeps one entry per hit and prepends each new one: its cost"
        f" grows with the hits in the window (here up to {warmup + n:,} per round)."
    )
    if baseline is not None:
        notes.append(
            f"Harness overhead (an empty awaited coroutine): {baseline.median_us:.3f} µs/op,"
            " included in every row."
        )
    return notes


def report(
    timings: Sequence[Timing], memories: Sequence[Memory], args: argparse.Namespace, warmup: int
) -> dict[str, object]:
    """Print the tables and the verdict; return the same results as JSON-ready data."""
    by_name = {t.name: t for t in timings}
    reference = by_name[REFERENCE]
    baseline = next((t for t in timings if t.name == "(empty op)"), None)
    shown = [t for t in timings if t is not baseline]
    versions = _versions()
    print(
        f"Python {platform.python_version()} ({platform.machine()}), asyncio; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )
    print(
        f"{args.rounds} rounds x {args.iterations:,} iterations (+{warmup:,} warm-up), "
        "uncontended, every limit huge\n"
    )
    print(timing_table(shown, reference))
    print()
    print("\n".join(_notes(shown, baseline, warmup, args.iterations)))
    if memories:
        print()
        print(memory_table(memories))
    print()
    lines = [verdict(by_name[name], reference, most) for name, most in GOALS.items()]
    print("\n".join(lines))
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": versions,
        "iterations": args.iterations,
        "rounds": args.rounds,
        "warmup": warmup,
        "timings": [
            {
                "name": t.name,
                "path": t.path,
                "median_us": t.median_us,
                "ops_per_s": t.ops_per_s,
                "ratio_vs_reference": _ratio(t, reference),
                "rounds_us": list(t.rounds_us),
            }
            for t in timings
        ],
        "reference": REFERENCE,
        "memory": [
            {
                "name": m.name,
                "operations": m.operations,
                "retained_bytes": m.retained_bytes,
                "peak_bytes": m.peak_bytes,
            }
            for m in memories
        ],
        "goals": {
            name: {"most": most, "ratio": _ratio(by_name[name], reference)}
            for name, most in GOALS.items()
        },
        "verdicts": lines,
    }


# -- the command ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.acquire",
        description="Time an uncontended acquire+release of ratekit and its peers.",
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=20_000, help="timed operations per round"
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds (median taken)")
    parser.add_argument(
        "--memory-ops",
        type=int,
        default=100_000,
        help="acquisitions before measuring memory (0 skips the memory table)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Time, then measure memory, then report."""
    entries = contenders()
    warmup = max(1_000, args.iterations // 10)
    timings = await time_all(entries, args.iterations, args.rounds, warmup)
    memories = await measure_memory(entries, args.memory_ops) if args.memory_ops > 0 else []
    return report(timings, memories, args, warmup)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_peers()
    results = asyncio.run(run(args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
