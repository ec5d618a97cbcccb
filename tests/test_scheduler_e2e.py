"""The scheduler end to end: the real `openai` client over HTTP to the strict mock provider.

Time is compressed 60 times on both sides (a minute lasts 1 s). The binding limit
is Moonshot Tier1's 200 RPM (50 in flight, 2,000,000 TPM never come near).

Utilisation, exactly: with arrivals on the provider's clock sorted, t(k) the k-th
and ``m = (n - 1) // limit`` for n arrivals, no client can get the call that opens
window m + 1 (k = m x limit + 1) in earlier than ``t(1) + m x period``: every
half-open period holds at most `limit` arrivals. So

    utilisation = m x period / (t(m x limit + 1) - t(1))

is at most 1, is 1 only for a client that fills every window the instant it
opens, and counts the initial burst as the provider does. Ratekit's own ceiling
is about ``period / (period + slice rounding + margin_s)``: an admission counts on
the client until its slice's end plus the period plus `margin_s`.

Why pacing: `margin_s` must cover the time from an admission to the request's
arrival at the provider, and under 60x compression every millisecond of it is
0.1 % of a period. Unpaced, a window's burst of 200 admissions takes one Python
process long enough to send that the last arrive up to hundreds of ms late: with
margin_s = 0.02 one process measured 96.7-96.9 % but 0-3 429s a run, with 0.1
no 429 at 86.7-89.8 %; four processes on Redis saw 1-11 429s in most runs at any
margin from 0.05 to 0.2. Paced (one request every period / limit, shared through
Redis by the fleet) with margin_s = 0.03, four processes measured 96.1-97.0 %
with no 429 in a dozen runs on a quiet machine. Inside a full CI run (one long
pytest process on 2 cores) smaller margins still let the odd 429 through, so
the tests run paced at margin_s = 0.1 and assert 85 %: zero 429s is the point
they keep strict. The clients run in processes of their own, as they would, so
that the provider's arrival stamps do not wait for the clients' loop.

Every run starts with its tasks queued behind a short pause of the account, as
they are after a cooldown: started cold, hundreds of tasks entering `submit` keep
the loop busy for ~50 ms, so the first admissions reach the provider that much
later than they were counted (measured 55-130 ms); the client's first chat call
is made on a throwaway provider for the same reason (see `warm_up`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

import ratekit
from ratekit.mock_provider import MockProvider

from .redis_server import RedisServer
from .scheduler_worker import (
    SPEED,
    Outcome,
    chat_call,
    drive,
    make_account,
    provider_limits,
    warm_up,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PERIOD_S = 60 / SPEED
RPM = 200
START_PAUSE_S = 0.1
# Four processes, Redis and the provider on 2 cores: the arrival jitter is wider.
FLEET_MARGIN_S = 0.1
# Paced, admissions never queue up behind the client's own sending: a small margin.
PACED_MARGIN_S = 0.05
# One client process: a minute in 2 s, so the SDK's own CPU is not what binds.
ONE_PROCESS_SPEED = 30


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # the mock provider and redis-py run on asyncio


@pytest.fixture
async def provider() -> AsyncIterator[MockProvider]:
    """The strict provider at Moonshot Tier1, time compressed like the accounts."""
    async with MockProvider(provider_limits(), speed=SPEED) as server:
        yield server


def utilisation(arrivals: list[float], limit: int, period_s: float) -> float:
    """Arrivals (provider clock) against the fastest any client could get them in."""
    ordered = sorted(arrivals)
    windows = (len(ordered) - 1) // limit
    assert windows >= 1, f"{len(ordered)} arrivals do not reach a second window of {limit}"
    return windows * period_s / (ordered[windows * limit] - ordered[0])


def _client(server: MockProvider) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def _start_member(config: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.scheduler_worker", json.dumps(config)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _readline(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    with anyio.fail_after(20):
        return await anyio.to_thread.run_sync(process.stdout.readline)


async def _run_members(provider: MockProvider, config: dict[str, Any], members: int) -> list[Any]:
    """Start `members` worker processes on `config`, release them together, collect reports."""
    processes = [_start_member(config) for _ in range(members)]
    reports = []
    try:
        for process in processes:
            line = await _readline(process)
            assert line.strip() == "ready", line + process.stderr.read()  # type: ignore[union-attr]
        start_at = time.time() + START_PAUSE_S
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{start_at!r}\n")
            process.stdin.flush()
        for process in processes:
            stdout, stderr = await anyio.to_thread.run_sync(
                lambda p=process: p.communicate(timeout=40)
            )
            assert process.returncode == 0, stderr
            reports.append(json.loads(stdout.splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return reports


async def test_one_process_fills_the_binding_rate_without_a_429() -> None:
    """1,000 calls from 300 tasks of one client process, paced: all complete, no 429, and
    at least 85 % of the RPM is used (the provider runs in another process, as it would).

    A minute lasts 2 s here (100 calls/s), not 1 s: one process of the openai SDK sends
    about 130-200 calls/s on a 2-core machine, so at 200 calls/s the test would measure
    the SDK's CPU, not ratekit (65 % then, on the old code and the new alike)."""
    calls = 1000
    async with MockProvider(provider_limits(), speed=ONE_PROCESS_SPEED) as provider:
        config = {
            "url": None,
            "base_url": provider.base_url,
            "calls": calls,
            "tasks": 300,
            "connections": 60,
            "timeout_s": 30,
            "margin_s": PACED_MARGIN_S,
            "pacing": True,
            "speed": ONE_PROCESS_SPEED,
        }
        reports = await _run_members(provider, config, 1)
    arrivals = [call.arrived_s for call in provider.calls]
    used = utilisation(arrivals, RPM, 60 / ONE_PROCESS_SPEED)
    rate_limited = reports[0]["events"].get("RateLimited", 0)
    print(f"\none process: {reports[0]['results']} calls, {used:.1%} of {RPM} RPM")
    assert reports[0]["errors"] == []
    assert reports[0]["results"] == calls
    assert provider.statistics().rejected == {}
    assert rate_limited == 0
    assert len(arrivals) == calls
    assert used >= 0.85


@pytest.mark.redis
async def test_four_processes_share_the_rate_through_redis_without_a_429(
    provider: MockProvider, redis_server: RedisServer
) -> None:
    """Four paced processes on one Redis account, 1,000 calls against one provider: all
    complete, no 429, and together at least 85 % of the RPM at margin_s 0.1 (86.6-90.2 %
    measured; 96.1-97.0 % at margin_s 0.03 on a quiet machine, see the module docstring)."""
    members, calls = 4, 1000
    config = {
        "url": redis_server.url,
        "namespace": f"e2e-{uuid.uuid4().hex[:12]}",
        "base_url": provider.base_url,
        "calls": calls // members,
        "tasks": 75,
        "connections": 15,
        "timeout_s": 30,
        "margin_s": FLEET_MARGIN_S,
        # Paced through Redis, the fleet sends one request every period / limit instead
        # of a burst that six busy processes on two cores take too long to deliver.
        "pacing": True,
    }
    reports = await _run_members(provider, config, members)

    arrivals = [call.arrived_s for call in provider.calls]
    used = utilisation(arrivals, RPM, PERIOD_S)
    rate_limited = sum(report["events"].get("RateLimited", 0) for report in reports)
    print(
        f"\nfour processes: {[r['results'] for r in reports]} calls, {used:.1%} of {RPM} RPM, "
        f"{rate_limited} RateLimited, rejected {provider.statistics().rejected}"
    )
    assert [report["errors"] for report in reports] == [[]] * members
    assert sum(report["results"] for report in reports) == calls
    assert provider.statistics().rejected == {}
    assert rate_limited == 0
    assert len(arrivals) == calls
    assert used >= 0.85


async def test_a_provider_that_halves_its_rpm_mid_run_loses_no_call(
    provider: MockProvider,
) -> None:
    """The provider drops to 100 RPM after 1 s: ratekit is answered 429, cools down and
    adapts, and every one of 400 submitted calls returns its result."""
    calls = 400
    outcome = Outcome()
    scheduler = ratekit.Scheduler(make_account(), hooks=[outcome.record])
    client = _client(provider)

    async def tighten() -> None:
        await anyio.sleep(1.0)
        provider.set_limits(provider_limits().replace(rpm=RPM // 2))

    try:
        await warm_up(client, 60)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(tighten)
                await drive(scheduler, chat_call(client), outcome, calls=calls, tasks=200)
    finally:
        await client.close()
    stats = await scheduler.statistics()
    print(
        f"\ntightened: {outcome.results} results, {outcome.events}, rejected "
        f"{provider.statistics().rejected}, factor now {stats.factors}"
    )
    assert outcome.errors == []
    assert outcome.results == calls
    assert provider.statistics().served == calls
    assert provider.statistics().rejected.get("rpm", 0) > 0
    for kind in ("RateLimited", "Cooldown", "LimitsAdapted"):
        assert outcome.events[kind] > 0, kind


async def test_one_burst_of_429s_adapts_the_limits_once(provider: MockProvider) -> None:
    """Ten calls in flight together all answered 429 are one signal, not ten: the limits
    step down once (to 80 %), not once per answer (0.8 ** 9 = 13 %).

    Fails on 6b8b64f: `Scheduler.rate_limited` treats every 429 within a period of
    the previous one as "repeated", including answers to calls admitted before the
    first 429 was seen, so one burst of 429s scales the limits by 0.8 per answer.
    """
    scheduler = ratekit.Scheduler(make_account())
    client = _client(provider)
    try:
        await warm_up(client, 10)
        provider.inject_429s(10, retry_after_s=0.05)
        outcome = Outcome()
        with anyio.fail_after(10):
            await drive(scheduler, chat_call(client), outcome, calls=10, tasks=10)
    finally:
        await client.close()
    assert outcome.results == 10
    assert provider.statistics().rejected == {"injected": 10}
    assert (await scheduler.statistics()).factors["account"] >= 0.8
