"""A fleet of processes sharing accounts through a real redis-server.

Time is compressed 60 times (a "minute" lasts 1 s, 60 slices of 1/60 s). Every
test starts its own servers or uses the session's, a fresh namespace, and is
bounded in time. The processes are a `Fleet` of the workload driver
(`ratekit.testing.workload`) admitting through a `Limiter`.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import math
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

import ratekit
from ratekit.backends import Demand
from ratekit.backends.redis import RedisBackend
from ratekit.clock import Instant
from ratekit.testing.workload import Fleet, Workload

from .redis_server import RedisCluster, RedisServer, require_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
SPEED = 60  # a minute of the limits lasts one second
PERIOD_S = 60 / SPEED
SLICES = 60
# How late a client may record an admission after the server made it (the reply's
# trip back, a busy core). A window of the client's records that is this much
# shorter than the period holds only admissions the server made within one period.
JITTER_S = 0.05


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio only


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports as unhandled (a background task that crashed)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


def _namespace(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def _max_in_window(times: list[float], width_s: float) -> int:
    """The largest number of `times` inside any half-open window of `width_s`."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width_s) - i for i, t in enumerate(ordered)), default=0
    )


def _max_overlap(holds: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals open at one instant."""
    # At a tie a release comes first: the recorded holds lie inside the server's.
    events = sorted([(end, -1) for _, end in holds] + [(start, 1) for start, _ in holds])
    open_now = worst = 0
    for _, step in events:
        open_now += step
        worst = max(worst, open_now)
    return worst


def _max_in_slices(indexes: list[float], slices: int) -> int:
    """The largest amount admitted in any `slices` + 1 consecutive slices.

    An admission in slice k counts until k's end plus the period, that is through
    slice k + `slices`: whatever was admitted in slices k .. k + `slices` was
    counted together at the last of those admissions.
    """
    per_slice = Counter(int(index) for index in indexes)
    return max(
        (sum(per_slice.get(k, 0) for k in range(first, first + slices + 1)) for first in per_slice),
        default=0,
    )


def _limiter_workload(url: str, label: str, **fields: Any) -> Workload:
    """Tasks acquiring from a `Limiter` on a Redis namespace of their own, time compressed."""
    return Workload(
        through="limiter", redis_url=url, namespace=_namespace(label), speed=SPEED, **fields
    )


def _exception_text(exc: BaseException) -> str:
    """The message, the repr and the whole traceback with every chained exception."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


@pytest.mark.parametrize(
    ("engine", "capped"),
    [
        ("redis_server", True),
        ("redis_server", False),
        ("valkey_server", True),
        ("redis_cluster", True),
    ],
)
async def test_fleet_of_processes_stays_within_the_rate_and_uses_it(
    engine: str, capped: bool, request: pytest.FixtureRequest
) -> None:
    """Four processes sharing one account never exceed its rate or its concurrency, and
    together use at least 95 % of the rate: on redis-server, Valkey's server and a
    Redis Cluster of three masters. Without a concurrency cap (`capped` False) most
    admissions come from credits, admitted in the process without a round trip."""
    server = request.getfixturevalue(engine)
    jitter_s = JITTER_S
    if isinstance(server, RedisServer):
        url, cluster = server.url, False
    else:
        url, cluster = server.url, True
        # A cluster client sends each command on its own (no pipelines): replies come
        # back later under load (records seen up to 59 ms late). The server-side
        # check below is exact either way.
        jitter_s = 2 * JITTER_S
    rpm, concurrency, workers, run_s = 400, 8, 4, 3.0
    # From the start, 6 tasks per process acquire as fast as the limits allow (each
    # permit held 5 ms) until run_s has passed.
    workload = _limiter_workload(
        url,
        "fleet",
        cluster=cluster,
        lease_ttl_s=2.0,
        limits={"rpm": rpm, "concurrency": concurrency} if capped else {"rpm": rpm},
        calls=None,
        run_s=run_s,
        tasks=6 * workers,
        call_s=0.005,
        timeout_s=run_s + 10,
    )
    outcomes = await Fleet(workload, workers).run()
    start_at = outcomes[0].started_at

    assert [outcome.errors for outcome in outcomes] == [[]] * workers
    admissions = [a for outcome in outcomes for a in outcome.admissions]
    granted = [a[0] for a in admissions]
    assert min(granted) >= start_at
    assert all(len(outcome.admissions) > 0 for outcome in outcomes), "a worker got nothing"

    # The server's own clock: the slice index of each admission, exact, no slack.
    assert _max_in_slices([a[2] for a in admissions], SLICES) <= rpm
    # The client's clock: a window jitter_s shorter than the period (see JITTER_S).
    most_per_window = _max_in_window(granted, PERIOD_S - jitter_s)
    assert most_per_window <= rpm
    # Each recorded hold (grant received .. release sent) lies inside its lease.
    most_in_flight = _max_overlap([(a[0], a[1]) for a in admissions])
    assert most_in_flight <= concurrency or not capped

    # No schedule can admit more than rpm in each of the run's full periods. A cold
    # start admits a burst of rpm, then a burst each period plus a slice (an
    # admission counts until its slice's end plus the period): three bursts fit in
    # 3 s (at 0, 1.017 and 2.033 s), so the whole of 3 x rpm is reachable.
    full_periods = math.floor(run_s / PERIOD_S)
    in_run = sum(start_at <= t < start_at + run_s for t in granted)
    utilisation = in_run / (rpm * full_periods)
    # At least how late the latest record came after its slice ended on the server.
    late_s = max(a[0] - (a[2] + 1) * PERIOD_S / SLICES for a in admissions)
    print(
        f"\nfleet: {in_run} admitted in {run_s} s by {workers} processes "
        f"{[len(outcome.admissions) for outcome in outcomes]}, recorded up to "
        f"{late_s * 1000:.0f}+ ms late; "
        f"({utilisation:.1%} of {rpm * full_periods}); most per {PERIOD_S - jitter_s:g} s "
        f"window {most_per_window}, most in {SLICES + 1} slices "
        f"{_max_in_slices([a[2] for a in admissions], SLICES)}, most in flight {most_in_flight}"
    )
    assert utilisation >= 0.95


async def test_slots_of_a_killed_process_come_back_when_its_leases_lapse(
    redis_server: RedisServer,
) -> None:
    """Slots held by a SIGKILLed process stay taken while it renews them and come back
    when their leases lapse, not before."""
    lease_ttl_s, slots = 1.0, 4
    # Each of `slots` tasks acquires a permit and holds it (its lease renewed) for ever.
    workload = _limiter_workload(
        redis_server.url,
        "killed",
        lease_ttl_s=lease_ttl_s,
        limits={"rpm": 100_000, "concurrency": slots},
        calls=slots,
        tasks=slots,
        call_s=3600,
        timeout_s=3600,
    )
    limits = ratekit.Limits(concurrency=slots, rpm=100_000).compressed(SPEED)
    backend = RedisBackend(redis_server.url, namespace=workload.namespace, lease_ttl_s=lease_ttl_s)
    limiter = ratekit.Limiter(limits, backend=backend)
    try:
        async with Fleet(workload, 1) as holder:
            await holder.start(0)
            with anyio.fail_after(15):
                while True:  # until the holder has every slot
                    if (await limiter.statistics()).dimension("concurrency").used == slots:
                        break
                    await anyio.sleep(0.01)
            held_at = time.time()
            (process,) = holder.processes

            # Alive for two lease lengths: its renewals keep every slot taken.
            while time.time() < held_at + 2 * lease_ttl_s:
                assert await limiter.try_acquire() is None, "a live holder's slot was taken"
                await anyio.sleep(0.05)
            assert (await limiter.statistics()).dimension("concurrency").used == slots

            process.kill()
            with anyio.fail_after(10):
                await process.wait()
            killed_at = time.time()
        state = await backend.client.hgetall(f"{backend.key_prefix()}:state")
        expiries = [float(value) for name, value in state.items() if name.startswith(b"l|")]
        assert len(expiries) == slots
        # Renewed up to the kill (every third of the ttl), never beyond kill + ttl.
        assert max(expiries) <= killed_at + lease_ttl_s + 0.001
        assert min(expiries) >= killed_at + lease_ttl_s * 2 / 3 - 0.25

        regained: list[float] = []

        async def take() -> None:
            await limiter.acquire(timeout=lease_ttl_s + 2)
            regained.append(time.time())  # the permit is left held: the slot stays ours

        with anyio.fail_after(lease_ttl_s + 5):
            async with anyio.create_task_group() as group:
                for _ in range(slots):
                    group.start_soon(take)
    finally:
        await backend.aclose()

    print(
        f"\nkilled holder: leases lapsed {min(expiries) - killed_at:.3f}..."
        f"{max(expiries) - killed_at:.3f} s after the kill; slots back after "
        f"{min(regained) - killed_at:.3f}..{max(regained) - killed_at:.3f} s"
    )
    assert len(regained) == slots
    # Not before the leases lapsed on the server's clock (the same machine's)...
    assert min(regained) >= min(expiries) - 0.001
    # ...and at once after: the refusal's hint is the oldest lease's expiry.
    assert max(regained) <= killed_at + lease_ttl_s + 0.5


async def _admit_through_redis(limiter: ratekit.Limiter, count: int) -> None:
    for _ in range(count):
        async with limiter.acquire(timeout=2):
            pass


async def _wait_until_redis_admits(limiter: ratekit.Limiter, deadline_s: float) -> float:
    """Seconds until an admission is counted in Redis again (the client reconnected)."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        try:
            async with limiter.acquire(timeout=1):
                pass
            if (await limiter.statistics()).dimension("rpm").used >= 1:
                return time.monotonic() - started
        except ratekit.BackendUnavailableError:
            pass
        await anyio.sleep(0.05)
    raise AssertionError(f"Redis did not admit again within {deadline_s} s of its restart")


async def test_fail_closed_raises_while_redis_is_down_and_recovers(
    fresh_server: RedisServer, loop_errors: list[dict[str, Any]]
) -> None:
    """With fail_closed and no outage to wait out (`outage_wait_s=0`), acquires raise
    BackendUnavailableError at once while Redis is down, and go through Redis again
    once it is back."""
    limits = ratekit.Limits(concurrency=8, rpm=400).compressed(SPEED)
    backend = RedisBackend(
        fresh_server.url, namespace=_namespace("closed"), lease_ttl_s=1.0, outage_wait_s=0
    )
    limiter = ratekit.Limiter(limits, backend=backend)
    try:
        await _admit_through_redis(limiter, 10)
        assert (await limiter.statistics()).dimension("rpm").used == 10
        across = await limiter.acquire(timeout=1)  # held across the outage

        fresh_server.stop()
        slowest_s = 0.0
        for _ in range(20):
            started = time.monotonic()
            with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError):
                await limiter.acquire(timeout=1)
            slowest_s = max(slowest_s, time.monotonic() - started)
            await anyio.sleep(0.05)
        with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError):
            await limiter.statistics()
        with anyio.fail_after(5):
            await across.release()  # its settle waits for Redis; the release does not fail

        fresh_server.start()
        back_after_s = await _wait_until_redis_admits(limiter, deadline_s=6)
        used = (await limiter.statistics()).dimension("rpm").used
        await _admit_through_redis(limiter, 5)
        assert (await limiter.statistics()).dimension("rpm").used == used + 5
    finally:
        await backend.aclose()
    print(
        f"\nfail_closed: slowest refusal while down {slowest_s * 1000:.0f} ms; "
        f"admitting through Redis {back_after_s:.2f} s after the restart"
    )
    assert slowest_s < 2.0
    gc.collect()
    assert loop_errors == []


async def test_a_restart_is_waited_out_by_every_caller(
    fresh_server: RedisServer, loop_errors: list[dict[str, Any]]
) -> None:
    """By default (fail_closed, `outage_wait_s` 30 s) a Redis restart under load ends in
    no error: the callers that come while it is down wait, and are admitted through the
    restarted server, each counted there once."""
    limits = ratekit.Limits(concurrency=50, rpm=100_000)
    backend = RedisBackend(fresh_server.url, namespace=_namespace("restart"), lease_ttl_s=1.0)
    limiter = ratekit.Limiter(limits, backend=backend)
    callers, outcomes = 300, Counter[str]()

    async def call() -> None:
        try:
            async with limiter.acquire():
                await anyio.sleep(0.01)
            outcomes["admitted"] += 1
        except Exception as error:
            outcomes[type(error).__name__] += 1

    try:
        await _admit_through_redis(limiter, 1)
        fresh_server.stop()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for _ in range(callers):
                    group.start_soon(call)
                await anyio.sleep(0.5)
                fresh_server.start()
        used = (await limiter.statistics()).dimension("rpm").used
    finally:
        await backend.aclose()
    print(f"\nrestart under {callers} callers: {dict(outcomes)}; rpm used after {used:g}")
    assert outcomes == Counter(admitted=callers)
    assert used == callers  # the restarted server forgot the one before
    gc.collect()
    assert loop_errors == []


async def test_local_policy_admits_within_its_share_while_redis_is_down(
    fresh_server: RedisServer, loop_errors: list[dict[str, Any]]
) -> None:
    """With the local policy, calls keep being admitted, within local_share of the limits,
    while Redis is down, and go through Redis again once it is back."""
    rpm, concurrency, share = 400, 8, 0.25
    local_rpm, local_slots = rpm * share, math.floor(concurrency * share)
    limits = ratekit.Limits(concurrency=concurrency, rpm=rpm).compressed(SPEED)
    backend = RedisBackend(
        fresh_server.url,
        namespace=_namespace("local"),
        lease_ttl_s=1.0,
        on_unavailable="local",
        local_share=share,
    )
    limiter = ratekit.Limiter(limits, backend=backend)
    down_s = 1.5
    holds: list[tuple[float, float]] = []
    try:
        await _admit_through_redis(limiter, 10)
        assert (await limiter.statistics()).dimension("rpm").used == 10
        fresh_server.stop()
        down_at = time.time()
        end_at = down_at + down_s

        async def work() -> None:
            while (left_s := end_at - time.time()) > 0:
                try:
                    async with limiter.acquire(timeout=left_s):
                        granted_at = time.time()
                        await anyio.sleep(0.01)
                        holds.append((granted_at, time.time()))
                except ratekit.AcquireTimeout:
                    return

        with anyio.fail_after(down_s + 5):
            async with anyio.create_task_group() as group:
                for _ in range(concurrency):
                    group.start_soon(work)

        fresh_server.start()
        back_after_s = await _wait_until_redis_admits(limiter, deadline_s=6)
        used = (await limiter.statistics()).dimension("rpm").used
        await _admit_through_redis(limiter, 5)
        assert (await limiter.statistics()).dimension("rpm").used == used + 5
    finally:
        await backend.aclose()

    granted = [start for start, _ in holds]
    most_per_window = _max_in_window(granted, PERIOD_S - JITTER_S)
    most_in_flight = _max_overlap(holds)
    print(
        f"\nlocal: {len(holds)} admitted in {down_s} s down; most per window "
        f"{most_per_window} (share {local_rpm:g}); most in flight {most_in_flight} "
        f"(share {local_slots}); through Redis {back_after_s:.2f} s after the restart"
    )
    # The share is used whole in the outage's first period (two slots of 10 ms calls
    # take 0.5 s for it), then again as its slices expire, from 1.017 s on.
    assert sum(t < down_at + PERIOD_S for t in granted) >= local_rpm
    assert len(holds) >= 1.5 * local_rpm
    assert most_per_window <= local_rpm
    assert most_in_flight <= local_slots
    gc.collect()
    assert loop_errors == []


async def test_fail_open_admits_everything_while_redis_is_down(
    fresh_server: RedisServer, loop_errors: list[dict[str, Any]]
) -> None:
    """With fail_open, every call is admitted at once while Redis is down, beyond the
    limits, and counted in Redis again once it is back."""
    rpm, concurrency = 400, 8
    limits = ratekit.Limits(concurrency=concurrency, rpm=rpm).compressed(SPEED)
    backend = RedisBackend(
        fresh_server.url,
        namespace=_namespace("open"),
        lease_ttl_s=1.0,
        on_unavailable="fail_open",
    )
    limiter = ratekit.Limiter(limits, backend=backend)
    try:
        await _admit_through_redis(limiter, 10)
        fresh_server.stop()
        started = time.monotonic()
        with anyio.fail_after(5):
            held = [await limiter.acquire(timeout=0.5) for _ in range(3 * concurrency)]
            for _ in range(2 * rpm):
                async with limiter.acquire(timeout=0.5):
                    pass
            for permit in held:
                await permit.release()
        open_s = time.monotonic() - started

        fresh_server.start()
        back_after_s = await _wait_until_redis_admits(limiter, deadline_s=6)
        used = (await limiter.statistics()).dimension("rpm").used
        await _admit_through_redis(limiter, 5)
        assert (await limiter.statistics()).dimension("rpm").used == used + 5
    finally:
        await backend.aclose()
    print(
        f"\nfail_open: {3 * concurrency} held and {2 * rpm} admitted in {open_s:.2f} s "
        f"while down; through Redis {back_after_s:.2f} s after the restart"
    )
    assert open_s < PERIOD_S  # 2 x rpm within one period: nothing was limited
    gc.collect()
    assert loop_errors == []


async def test_namespaces_never_share_counts(redis_server: RedisServer) -> None:
    """Two namespaces on one server keep separate counts: filling one leaves the other free."""
    limits = ratekit.Limits(concurrency=3, rpm=20).compressed(SPEED)
    name = _namespace("acct")
    # One name a prefix of the other: the hash tags still differ.
    first = RedisBackend(redis_server.url, namespace=name, lease_ttl_s=2.0)
    second = RedisBackend(redis_server.url, namespace=name + "2", lease_ttl_s=2.0)
    full = ratekit.Limiter(limits, backend=first)
    other = ratekit.Limiter(limits, backend=second)
    try:
        held = [await full.acquire(timeout=1) for _ in range(3)]
        assert await full.try_acquire() is None  # concurrency full
        for permit in held:
            await permit.release()
        await _admit_through_redis(full, 17)
        assert await full.try_acquire() is None  # rpm full

        taken = [await other.acquire(timeout=0.5) for _ in range(3)]
        stats_full, stats_other = await full.statistics(), await other.statistics()
        for permit in taken:
            await permit.release()
        spare = await other.try_acquire()
        assert spare is not None  # still room (20 - 3 used)
        await spare.release()
        assert (await full.statistics()).dimension("rpm").used == 20

        keys = [key.decode() async for key in redis_server_keys(first, second)]
    finally:
        await first.aclose()
        await second.aclose()
    assert stats_full.dimension("rpm").used == 20
    assert stats_full.dimension("concurrency").used == 0
    assert stats_other.dimension("rpm").used == 3
    assert stats_other.dimension("concurrency").used == 3
    assert keys, "no keys written"
    for key in keys:
        assert key.startswith(first.key_prefix() + ":") != key.startswith(
            second.key_prefix() + ":"
        ), key


async def redis_server_keys(*backends: RedisBackend) -> AsyncIterator[bytes]:
    """Every key of the accounts of `backends`."""
    for backend in backends:
        async for key in backend.client.scan_iter(match=f"{backend.key_prefix()}:*"):
            yield key


async def test_password_never_shows(loop_errors: list[dict[str, Any]]) -> None:
    """A password in the URL authenticates and never appears in a repr or in any error text."""
    password, wrong = "s3cr3t-pw", "wr0ng-pw"
    server = RedisServer(require_redis_server(), password=password)
    server.start()
    limits = ratekit.Limits(concurrency=4, rpm=100).compressed(SPEED)
    good = RedisBackend(server.url, namespace=_namespace("pw"), lease_ttl_s=1.0)
    bad = RedisBackend(
        server.url.replace(password, wrong), namespace=_namespace("pw"), lease_ttl_s=1.0
    )
    anonymous = RedisBackend(
        server.url.replace(f":{password}@", ""), namespace=_namespace("pw"), lease_ttl_s=1.0
    )
    texts: list[str] = []
    try:
        limiter = ratekit.Limiter(limits, backend=good)
        async with limiter.acquire(timeout=1):
            pass
        assert (await limiter.statistics()).dimension("rpm").used == 1
        texts += [repr(good), str(good), repr(good.client), repr(limiter)]

        for backend in (bad, anonymous):
            refused = ratekit.Limiter(limits, backend=backend)
            # Credentials refused: a setting to fix, not an outage to wait out.
            with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError) as info:
                await refused.acquire()
            texts.append(_exception_text(info.value))
            with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError) as info:
                await refused.statistics()
            texts.append(_exception_text(info.value))
            texts += [repr(backend), repr(backend.client)]

        server.stop()
        with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError) as info:
            await limiter.acquire(timeout=1)
        texts.append(_exception_text(info.value))
        with anyio.fail_after(5), pytest.raises(ratekit.BackendUnavailableError) as info:
            await limiter.statistics()
        texts.append(_exception_text(info.value))
    finally:
        server.stop()
        for backend in (good, bad, anonymous):
            await backend.aclose()
    print(f"\npassword: down: {texts[-2].splitlines()[0]}")
    for text in texts:
        assert password not in text, text
        assert wrong not in text, text
    assert f"127.0.0.1:{server.port}" in texts[-1]  # the error still says where
    gc.collect()
    assert loop_errors == []


async def test_memory_stays_bounded_at_200k_rpm(redis_server: RedisServer) -> None:
    """At 200,000 RPM the account is one hash (no leases: requests alone need none) of at
    most slices + 2 slice fields and a dozen of its own, always with a ttl, gone once the
    account is idle."""
    rpm, admissions, tasks, lease_ttl_s = 200_000, 20_000, 16, 0.1
    limits = ratekit.Limits(rpm=rpm).compressed(SPEED)
    backend = RedisBackend(redis_server.url, namespace=_namespace("v5"), lease_ttl_s=lease_ttl_s)
    limiter = ratekit.Limiter(limits, backend=backend)
    client = backend.client
    prefix = backend.key_prefix()
    pattern = f"{prefix}:*"
    # key, fields, pttl (ms), bytes, lease fields
    samples: list[tuple[str, int, int, int, int]] = []
    made = 0
    done = anyio.Event()

    async def admit() -> None:
        nonlocal made
        # At least `admissions`, and for more than a period: the slices must roll over,
        # however fast the admissions go.
        while made < admissions or time.monotonic() - started < 1.5 * PERIOD_S:
            made += 1
            async with limiter.acquire(timeout=1):
                pass

    async def sample() -> None:
        while not done.is_set():
            async for raw in client.scan_iter(match=pattern):
                key = raw.decode()
                # One snapshot (MULTI) of the key, which may have expired meanwhile.
                async with client.pipeline(transaction=True) as pipe:
                    pipe.exists(key).hkeys(key).pttl(key).memory_usage(key)
                    exists, names, pttl_ms, usage = await pipe.execute()
                if exists:
                    leases = len([name for name in names if name.startswith(b"l|")])
                    samples.append((key, len(names), pttl_ms, usage or 0, leases))
            await anyio.sleep(0.05)

    try:
        started = time.monotonic()
        with anyio.fail_after(40):
            async with anyio.create_task_group() as group:
                group.start_soon(sample)
                async with anyio.create_task_group() as workers:
                    for _ in range(tasks):
                        workers.start_soon(admit)
                done.set()
        pushed_s = time.monotonic() - started
        used = (await limiter.statistics()).dimension("rpm").used
        keys = sorted([key.decode() async for key in client.scan_iter(match=pattern)])
        ttls = [await client.pttl(key) for key in keys]

        idle_from = time.monotonic()
        gone_after_s = math.inf
        with anyio.move_on_after(10):
            while math.isinf(gone_after_s):
                if [key async for key in client.scan_iter(match=pattern)]:
                    await anyio.sleep(0.05)
                else:
                    gone_after_s = time.monotonic() - idle_from
    finally:
        await backend.aclose()

    windows = [s for s in samples if s[0].endswith(":state")]
    most_fields = max(s[1] for s in windows)
    most_leases = max(s[4] for s in samples)
    print(
        f"\n200k rpm: {made} admissions in {pushed_s:.1f} s; {len(samples)} samples; "
        f"most fields per window key {most_fields}, most leases {most_leases}, most bytes "
        f"{max(s[3] for s in samples)}; keys {keys} ttl {ttls} ms; "
        f"gone {gone_after_s:.2f} s after the last admission"
    )
    assert pushed_s > PERIOD_S, "too fast to roll the window's slices over"
    assert 0 < used <= made
    assert len(windows) > 10
    # The slices (at most slices + 2 live), the window's total, oldest and newest slice
    # and its amount, and the clock, ttl and lease count.
    assert most_fields <= SLICES + 2 + 4 + 3
    assert max(s[3] for s in samples) <= 16_384
    assert most_leases == 0
    assert all(s[2] > 0 for s in samples), "a key without a ttl"
    assert keys == [f"{prefix}:state"]
    # Live counts are never forgotten: the window outlives a period and a slice.
    assert min(ttls) >= PERIOD_S * (1 + 1 / SLICES) * 1000 - 100
    key_ttl_s = PERIOD_S * (1 + 1 / SLICES) + 2 * lease_ttl_s
    assert gone_after_s <= key_ttl_s + 1.0


async def test_a_herd_of_scheduler_callers_on_a_cluster_is_served(
    redis_cluster: RedisCluster,
) -> None:
    """300 callers gathered at once on a Scheduler over a Redis Cluster (the fleet's
    tier is read first, then each waits for one of 100 slots): every one is served,
    on far fewer connections than a node's pool holds (100). A cluster client sends
    each command on its own, each taking a connection of its node while it runs."""
    backend = RedisBackend(redis_cluster.url, namespace=_namespace("herd"), cluster=True)
    scheduler = ratekit.Scheduler(ratekit.Account("moonshot", tier="tier2"), backend=backend)
    served = 0

    async def caller() -> None:
        nonlocal served
        async with scheduler.slot(tokens=39, model="kimi-k2"):
            await asyncio.sleep(0.05)
        served += 1

    try:
        with anyio.fail_after(30):
            await asyncio.gather(*(caller() for _ in range(300)))
        # The connections the herd opened stay in the nodes' pools: the most on one node.
        most = 0
        for node in redis_cluster.nodes:
            observer = Redis.from_url(node.url)
            most = max(most, int((await observer.info("clients"))["connected_clients"]) - 1)
            await observer.aclose()
    finally:
        await backend.aclose()
    assert served == 300
    print(f"\n300 scheduler callers on a cluster: at most {most} connections on one node")
    assert most <= 80


async def test_a_cluster_pool_busy_with_the_users_calls_is_waited_for(
    redis_cluster: RedisCluster,
) -> None:
    """Every connection of a small cluster pool is held by the user's own blocking calls
    for longer than the command timeout: two reserves sent in one batch wait for the
    pool (they were not sent) and are admitted once it frees, not given up as an
    outage."""
    host, port = redis_cluster.host_port
    client = ClusterClient(host=host, port=port, max_connections=2)
    await client.initialize()
    root = RedisBackend(client, namespace=_namespace("busy"), command_timeout_s=0.5)
    first, second = root.child("a"), root.child("b")
    limits = ratekit.Limits(concurrency=100)

    def now() -> Instant:
        return Instant(time.monotonic(), time.time())

    try:
        await first.reserve(limits, Demand(1, 0, 0), now())
        # Two blocking pops per node: every connection of every node's pool taken.
        taken: dict[str, list[str]] = {}
        for i in range(10_000):
            key = f"busy-{uuid.uuid4().hex[:6]}-{i}"
            node = client.nodes_manager.get_node_from_slot(client.keyslot(key)).name
            if len(taken.setdefault(node, [])) < 2:
                taken[node].append(key)
            if len(taken) == 3 and all(len(keys) == 2 for keys in taken.values()):
                break
        pops = [
            asyncio.ensure_future(client.execute_command("BLPOP", key, 1))
            for keys in taken.values()
            for key in keys
        ]
        await asyncio.sleep(0.1)
        with anyio.fail_after(20):
            grants = await asyncio.gather(
                first.reserve(limits, Demand(1, 0, 0), now()),
                second.reserve(limits, Demand(1, 0, 0), now()),
            )
        await asyncio.gather(*pops)
    finally:
        await root.aclose()
        await client.aclose()
    assert all(type(grant).__name__ == "RedisGrant" for grant in grants), grants
