"""A strict in-process provider and a workload driver: ratekit's main job, offline.

`StrictProvider` enforces limits the way a provider that counts rolling windows
does, exactly (a log of every arrival, no slices, no slack: `StrictWindows`) and
answers "429" on any excess. `simulate` drives a batch of calls from many tasks
through a `Limiter` into it and reports 429s and how much of each limit was
used. No network, no Redis, no API key.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from .._limiter import Limiter
from .._limits import Limits, TokenCounting
from ._strict import StrictRefusal, StrictWindows


class ProviderRefusedError(Exception):
    """The strict provider's 429: `dimension` was over its limit at arrival."""

    def __init__(self, dimension: str) -> None:
        self.dimension = dimension
        super().__init__(f"429: {dimension} exceeded")


class StrictProvider:
    """Answers calls within `limits` and raises `ProviderRefusedError` for any call beyond them.

    Requests and tokens (prompt + max output) count at arrival in rolling windows
    of exactly each rate's period; concurrency counts calls in flight. `clock`
    returns seconds (the limiter's clock by default). Refused calls count nothing.
    The window math is `StrictWindows`, shared with the HTTP mock provider.
    """

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._now = clock
        self._windows = StrictWindows(limits, TokenCounting.RESERVE)
        self.served = 0
        # (arrival instant, tokens) of every admitted call.
        self.arrivals: list[tuple[float, float]] = []

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet answered."""
        return self._windows.in_flight

    @property
    def peak_in_flight(self) -> int:
        """Most calls ever in flight at once."""
        return self._windows.peak_in_flight

    @property
    def rejected(self) -> dict[str, int]:
        """429s by the dimension over its limit (a rate's name or "concurrency")."""
        return self._windows.rejected

    async def call(self, tokens: float, duration_s: float) -> float:
        """One call reserving `tokens`; takes `duration_s`; returns the tokens used."""
        now = self._now()
        admitted = self._windows.try_admit(now, tokens=tokens, until_s=now + duration_s)
        if isinstance(admitted, StrictRefusal):
            raise ProviderRefusedError(admitted.dimension)
        self.arrivals.append((now, tokens))
        try:
            await anyio.sleep(duration_s)
        finally:
            self._windows.finish(admitted, self._now(), used_tokens=tokens)
        self.served += 1
        return tokens

    def peak_use(self) -> dict[str, tuple[float, float]]:
        """Per dimension: (largest amount seen in any window, limit)."""
        return self._windows.peak_use()


@dataclass(frozen=True)
class SimulationReport:
    """What a simulation did: calls served, 429s, time, and the limits' use."""

    calls: int
    served: int
    rate_limited: dict[str, int]
    elapsed_s: float
    peak_use: dict[str, tuple[float, float]]
    binding: str
    binding_utilisation: float

    def lines(self) -> list[str]:
        """A human-readable summary."""
        out = [
            f"calls: {self.calls}, served: {self.served}, "
            f"429s: {sum(self.rate_limited.values())}, elapsed: {self.elapsed_s:.2f} s",
        ]
        for name, (peak, limit) in self.peak_use.items():
            out.append(f"  {name:<12} peak in any window {peak:>12,.0f} of {limit:>12,.0f}")
        out.append(
            f"binding limit: {self.binding}, steady-state utilisation "
            f"{self.binding_utilisation:.1%} of it"
        )
        return out


async def simulate(
    limits: Limits,
    *,
    calls: int = 400,
    workers: int = 50,
    tokens: tuple[int, int] = (200, 2_000),
    duration_s: tuple[float, float] = (0.01, 0.05),
    seed: int = 0,
) -> SimulationReport:
    """Drive `calls` calls from `workers` tasks through a limiter into a strict provider.

    Each call reserves a random token count within `tokens` and lasts a random
    time within `duration_s`. Use compressed limits (``limits.compressed(60)``)
    so that a minute's traffic runs in a second.
    """
    rng = random.Random(seed)
    provider = StrictProvider(limits)
    limiter = Limiter(limits)
    jobs = deque((rng.randint(*tokens), rng.uniform(*duration_s)) for _ in range(calls))
    totals = {"requests": float(calls), "tokens": float(sum(job[0] for job in jobs))}
    started = time.monotonic()

    async def worker() -> None:
        while jobs:
            job_tokens, job_s = jobs.popleft()
            async with limiter.acquire(tokens=job_tokens) as permit:
                with contextlib.suppress(ProviderRefusedError):  # counted by the provider
                    permit.settle(tokens=await provider.call(job_tokens, job_s))

    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)
    elapsed_s = time.monotonic() - started
    binding, utilisation = _binding(limits, totals, elapsed_s)
    steady = _steady(limits, provider.arrivals, binding)
    if not math.isnan(steady):
        utilisation = steady
    return SimulationReport(
        calls=calls,
        served=provider.served,
        rate_limited=dict(provider.rejected),
        elapsed_s=elapsed_s,
        peak_use=provider.peak_use(),
        binding=binding,
        binding_utilisation=utilisation,
    )


def _steady(limits: Limits, arrivals: list[tuple[float, float]], binding: str) -> float:
    """The steady-state utilisation of rate `binding` (see `steady_utilisation`); NaN for a
    run of less than two periods, too short for a steady state to be told from its start."""
    stamps = [stamp for stamp, _ in arrivals]
    for rate in limits.all_rates:
        if rate.name == binding and rate.unit in ("requests", "tokens"):
            if not stamps or max(stamps) - min(stamps) < 2 * rate.period_s:
                return math.nan
            stamps = [stamp for stamp, _ in arrivals]
            amounts = [1.0 if rate.unit == "requests" else tokens for _, tokens in arrivals]
            return steady_utilisation(stamps, amounts, rate.limit, rate.period_s)
    return math.nan


def _binding(limits: Limits, totals: dict[str, float], elapsed_s: float) -> tuple[str, float]:
    """The rate that bounds the run's length, and the share of it the run achieved.

    A rate of N per P seconds admits at most N at once and N more every P after,
    so a total of T cannot all be admitted before ``ceil(T / N - 1) * P`` seconds;
    the binding rate is the one needing longest, and utilisation is that floor
    over the elapsed time.
    """
    best_name, best_floor = "none", 0.0
    for rate in limits.all_rates:
        if rate.unit not in totals:
            continue
        floor_s = max(math.ceil(totals[rate.unit] / rate.limit - 1), 0) * rate.period_s
        if floor_s > best_floor:
            best_name, best_floor = rate.name, floor_s
    if best_floor == 0 or elapsed_s <= 0:
        return best_name, math.nan
    return best_name, min(best_floor / elapsed_s, 1.0)


def steady_utilisation(
    stamps: list[float], amounts: list[float], limit: float, period_s: float
) -> float:
    """How much of a rate a run used in its steady state, as the provider saw it.

    `stamps` are the provider's arrival instants (any order) and `amounts` what
    each counted. The mean amount in a window of `period_s`, over the windows that
    start after the first half period of the run and end before its last arrival
    (sampled at 200 starts), divided by `limit`. NaN for a run shorter than 1.5
    periods, which has no steady state.
    """
    if len(stamps) != len(amounts):
        raise ValueError("steady_utilisation: one amount per stamp")
    if not stamps:
        return math.nan
    order = sorted(range(len(stamps)), key=stamps.__getitem__)
    times = [stamps[i] for i in order]
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + amounts[i])
    first = times[0] + period_s / 2
    last = times[-1] - period_s  # the last window ends at the last arrival
    if last < first:
        return math.nan
    samples = 200
    total = 0.0
    for k in range(samples):
        start = first + (last - first) * k / (samples - 1)
        low = bisect.bisect_left(times, start)
        high = bisect.bisect_left(times, start + period_s)
        total += prefix[high] - prefix[low]
    return total / samples / limit
