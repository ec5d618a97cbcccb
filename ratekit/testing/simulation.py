"""A strict in-process provider, and ratekit's main job against it, offline.

`StrictProvider` enforces limits the way a provider that counts rolling windows
does, exactly (a log of every arrival, no slices, no slack: `StrictWindows`) and
answers "429" on any excess. `simulate` drives a batch of calls from many tasks
(`workload.drive`) through a `Limiter` into it and reports 429s and how much of
each limit was used (`workload.binding_utilisation`). No network, no Redis, no
API key.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from .._limiter import Limiter
from .._limits import Limits, TokenCounting
from ._strict import StrictRefusal, StrictWindows
from .workload import binding_utilisation, drive


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
    # The rate the run used most of in its steady state ("none" for a run too short to
    # have one), and that share of it (`binding_utilisation`).
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
        if math.isnan(self.binding_utilisation):
            out.append("steady-state utilisation: the run is too short to have a steady state")
        else:
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
    so that a minute's traffic runs in a second; a steady state needs a run of at
    least 1.5 periods of the binding rate.
    """
    rng = random.Random(seed)
    provider = StrictProvider(limits)
    limiter = Limiter(limits)
    jobs = [(rng.randint(*tokens), rng.uniform(*duration_s)) for _ in range(calls)]

    async def call(index: int) -> float:
        job_tokens, job_s = jobs[index]
        async with limiter.acquire(tokens=job_tokens) as permit:
            try:
                used = await provider.call(job_tokens, job_s)
            except ProviderRefusedError as refusal:  # counted by the provider
                refused = refusal
            else:
                permit.settle(tokens=used)
                return used
        raise refused

    started = time.monotonic()
    await drive(call, calls=calls, tasks=workers, failures=(ProviderRefusedError,))
    elapsed_s = time.monotonic() - started
    binding, utilisation = binding_utilisation(
        limits, [stamp for stamp, _ in provider.arrivals], provider.arrivals
    )
    return SimulationReport(
        calls=calls,
        served=provider.served,
        rate_limited=dict(provider.rejected),
        elapsed_s=elapsed_s,
        peak_use=provider.peak_use(),
        binding=binding,
        binding_utilisation=utilisation,
    )
