"""What every benchmark checks before it runs: that it can import what it compares."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

Op = Callable[[], Awaitable[None]]


class BenchError(RuntimeError):
    """A contender misbehaved (refused an admission under a huge limit)."""


async def nothing() -> None:
    """An awaitable that does nothing: a subject's default close, and the harness baseline."""
    return None


@dataclass(frozen=True)
class Subject:
    """One live limiter under test: `op` does one admission (and its release, where the
    library has one); `close` frees it."""

    op: Op
    close: Callable[[], Awaitable[None]] = nothing
    # Waits for what the library sends in the background (ratekit's posted settles).
    drain: Callable[[], Awaitable[None]] = nothing


def importable(module: str) -> bool:
    """Whether `module` imports here."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(tool: str, peers: Mapping[str, str], ratekit_module: str, hint: str) -> None:
    """Exit naming the install command when a peer (import name -> distribution) or
    ratekit's `ratekit_module` cannot be imported."""
    missing = [dist for module, dist in peers.items() if not importable(module)]
    if missing:
        raise SystemExit(f"{tool}: missing package(s): {', '.join(missing)}. Install: {hint}")
    if not importable(ratekit_module):
        raise SystemExit(
            f"{tool}: cannot import {ratekit_module}; run from the repository root "
            f"(python -m {tool}) or {hint}"
        )


def positive_int(text: str) -> int:
    """An argparse type: a positive integer, or the usage error that says so."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


async def microseconds_per_call(op: Op, iterations: int) -> float:
    """Microseconds per call of `op`, after a warm-up of a tenth of `iterations` (at
    least 1,000 calls)."""
    import time

    for _ in range(max(iterations // 10, 1_000)):
        await op()
    start = time.perf_counter_ns()
    for _ in range(iterations):
        await op()
    return (time.perf_counter_ns() - start) / iterations / 1_000
