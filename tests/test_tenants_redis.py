"""Tenant limits on Redis: the memory backend's tenant semantics are the reference.

The same tenant scenarios run on the memory backend, on fakeredis (the Lua scripts,
fast) and on a real redis-server, through a limiter on a fake clock (the Redis backends
take its instant: ``server_time=False``), and must give the same admissions. A
differential state machine plays random sequences of acquires, settles, refunds and
sends on the three at once and compares every outcome and every tenant's usage. The
queue path (a head held back by its tenant's own limits steps aside), lapsed leases,
the keys a tenant leaves behind, and four processes sharing tenants run on a real
redis-server.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import fakeredis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

import ratekit
from ratekit import Admission, Limiter, Limits, Rate, Tenant, Tenants, TokenCounting
from ratekit.backends import Refusal
from ratekit.backends.redis import RedisBackend
from ratekit.clock import FakeClock

from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

T = TypeVar("T")

KINDS = ("memory", "fakeredis", "redis")
# No lease lapses within a test: the memory backend has none, so a lapse would be a
# difference by design. A wait only a release can end is bounded by the oldest lease on
# Redis (infinite on memory): a hint this long stands for "until a release".
LEASE_TTL_S = 1e6
UNTIL_RELEASE_S = LEASE_TTL_S / 2
# Bounded for CI (about 20 s); more locally: RATEKIT_TENANT_DIFF_EXAMPLES=1000.
EXAMPLES = int(os.environ.get("RATEKIT_TENANT_DIFF_EXAMPLES", "40"))
STEPS = int(os.environ.get("RATEKIT_TENANT_DIFF_STEPS", "30"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Bench:
    """Limiters of one kind of backend on one fake clock; closes what it built."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.clock = FakeClock()
        self.namespace = f"tenants-{uuid.uuid4().hex}"
        self._server = fakeredis.FakeServer()
        self._backends: list[RedisBackend] = []
        self._clients: list[Any] = []

    def backend(self) -> RedisBackend | None:
        """A new connection to this bench's account (None on memory)."""
        if self.kind == "memory":
            return None
        client: Any
        if self.kind == "fakeredis":
            client = fakeredis.FakeAsyncRedis(server=self._server)
        else:
            assert self.redis_url is not None
            client = Redis.from_url(self.redis_url)
        backend = RedisBackend(
            client, namespace=self.namespace, server_time=False, lease_ttl_s=LEASE_TTL_S
        )
        self._clients.append(client)
        self._backends.append(backend)
        return backend

    def limiter(self, limits: Limits, tenants: Tenants) -> Limiter:
        return Limiter(limits, backend=self.backend(), clock=self.clock, tenants=tenants)

    async def aclose(self) -> None:
        for backend in self._backends:
            await backend.aclose()
        if self.kind == "redis" and self._clients:
            client = self._clients[-1]
            async for key in client.scan_iter(match=f"ratekit:{{{self.namespace}}}:*"):
                await client.delete(key)
        for client in self._clients:
            await client.aclose()


@pytest.fixture(params=KINDS)
async def bench(request: pytest.FixtureRequest) -> AsyncIterator[Bench]:
    """Limiters on the memory backend, fakeredis or a real redis-server, one per test."""
    kind = request.param
    url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    made = Bench(kind, url)
    yield made
    await made.aclose()


async def attempt(
    limiter: Limiter, tenant: str | None, requests: int = 1, tokens: int = 0
) -> Admission | Refusal:
    """An admission now, or the refusal (its wait and dimension) of a caller that does
    not wait."""
    try:
        return await limiter.acquire(requests, tokens=tokens, tenant=tenant, timeout=0)
    except ratekit.AcquireTimeout as refused:
        return Refusal(refused.retry_after_s, refused.dimension)


async def admitted(limiter: Limiter, tenant: str | None, **demand: int) -> Admission:
    outcome = await attempt(limiter, tenant, **demand)
    assert isinstance(outcome, Admission), outcome
    return outcome


async def used(limiter: Limiter, tenant: str, dimension: str) -> float:
    for stats in await limiter.tenant_statistics(tenant):
        if stats.name == dimension:
            return stats.used
    raise KeyError(dimension)


# -- the same scenarios on every backend --------------------------------------------------


async def test_a_tenant_never_exceeds_its_own_rate(bench: Bench) -> None:
    """A tenant at its own rpm is refused by it, with the exact wait, while another
    tenant goes on; it is admitted again exactly when its window frees."""
    limiter = bench.limiter(Limits(rpm=100), Tenants(named={"capped": Tenant(Limits(rpm=2))}))
    for _ in range(2):
        await (await admitted(limiter, "capped")).release()
    assert await attempt(limiter, "capped") == Refusal(pytest.approx(61.0), "tenant rpm")
    await (await admitted(limiter, "free")).release()
    bench.clock.advance(60.999)
    assert await attempt(limiter, "capped") == Refusal(pytest.approx(0.001), "tenant rpm")
    bench.clock.advance(0.001)
    await (await admitted(limiter, "capped")).release()
    assert await used(limiter, "capped", "rpm") == 1
    assert (await limiter.statistics()).dimension("rpm").used == 1  # the rest expired


async def test_a_tenant_concurrency_cap_holds_its_own_calls_only(bench: Bench) -> None:
    """A tenant with a cap of 1 is refused while its call is in flight; another tenant's
    calls go; its slot comes back when its call ends."""
    limiter = bench.limiter(Limits(concurrency=10), Tenants(Tenant(Limits(concurrency=1))))
    first = await admitted(limiter, "a")
    refusal = await attempt(limiter, "a")
    assert isinstance(refusal, Refusal)
    assert refusal.dimension == "tenant concurrency"
    assert refusal.wait_s >= UNTIL_RELEASE_S
    held = await admitted(limiter, "b")
    assert [s.used for s in await limiter.tenant_statistics("a")] == [1]
    await first.release()
    await (await admitted(limiter, "a")).release()
    await held.release()
    assert (await limiter.statistics()).dimension("concurrency").used == 0
    assert [s.used for s in await limiter.tenant_statistics("a")] == [0]


async def test_a_refusal_by_the_account_takes_nothing_from_the_tenant(bench: Bench) -> None:
    """The tenant's windows and the account's are one step: a call the account refuses
    leaves the tenant's own window as it was."""
    limiter = bench.limiter(Limits(rpm=1), Tenants(Tenant(Limits(rpm=1))))
    await (await admitted(limiter, None)).release()  # the account's one request this minute
    assert await attempt(limiter, "a") == Refusal(pytest.approx(61.0), "rpm")
    assert await used(limiter, "a", "rpm") == 0
    bench.clock.advance(61)
    await (await admitted(limiter, "a")).release()
    assert await used(limiter, "a", "rpm") == 1


async def test_a_tenants_own_refusal_comes_first(bench: Bench) -> None:
    """Refused by both its own limits and the account's, a call is refused by its own
    (it then waits out of the queue); the account's refusals are the account's."""
    limiter = bench.limiter(Limits(rpm=3), Tenants(Tenant(Limits(rpm=2))))
    for tenant in ("a", "a", "b"):
        await (await admitted(limiter, tenant)).release()
    assert await attempt(limiter, "a") == Refusal(pytest.approx(61.0), "tenant rpm")
    assert await attempt(limiter, "b") == Refusal(pytest.approx(61.0), "rpm")
    assert await used(limiter, "b", "rpm") == 1


async def test_refund_and_settle_reach_the_tenant_windows(bench: Bench) -> None:
    """A refunded call gives its tenant's tokens back; a settled one records its usage."""
    counting = TokenCounting.USAGE
    limiter = bench.limiter(
        Limits(tpm=10_000, token_counting=counting),
        Tenants(Tenant(Limits(tpm=1_000, token_counting=counting))),
    )
    async with limiter.acquire(tokens=800, tenant="a") as admission:
        assert await used(limiter, "a", "tpm") == 800
        admission.settle(tokens=300)
    assert await used(limiter, "a", "tpm") == 300
    admission = await limiter.acquire(tokens=500, tenant="a")
    await admission.refund()
    assert await used(limiter, "a", "tpm") == 300
    refusal = await attempt(limiter, "a", tokens=800)
    assert refusal == Refusal(pytest.approx(61.0), "tenant tpm")


async def test_a_sent_request_counts_for_its_tenant_from_when_it_left(bench: Bench) -> None:
    """A request that leaves 30 s after its admission counts in its tenant's window from
    then (as in the account's): the tenant's next request waits until 61 s after it left."""
    limiter = bench.limiter(Limits(rpm=100), Tenants(Tenant(Limits(rpm=1))))
    admission = await admitted(limiter, "a")
    bench.clock.advance(30)
    await admission.sent()
    await admission.release()
    bench.clock.advance(31)
    assert await attempt(limiter, "a") == Refusal(pytest.approx(30.0), "tenant rpm")
    bench.clock.advance(30)
    await (await admitted(limiter, "a")).release()


async def test_a_cancelled_caller_held_back_by_its_tenant_leaves_nothing(bench: Bench) -> None:
    """Cancelled while waiting for its own limit: nothing is held, the account is intact."""
    limiter = bench.limiter(Limits(rpm=100), Tenants(Tenant(Limits(rpm=1))))
    await (await admitted(limiter, "a")).release()
    with anyio.move_on_after(0.05):
        await limiter.acquire(tenant="a")
    stats = await limiter.statistics()
    assert stats.waiting == 0
    assert stats.dimension("rpm").used == 1
    assert await used(limiter, "a", "rpm") == 1


async def test_a_tenant_without_limits_is_the_account_alone(bench: Bench) -> None:
    """A tenant with a weight only takes the account's windows and has none of its own."""
    limiter = bench.limiter(
        Limits(rpm=2), Tenants(named={"capped": Tenant(Limits(rpm=1)), "free": Tenant(weight=3)})
    )
    for _ in range(2):
        await (await admitted(limiter, "free")).release()
    assert await attempt(limiter, "free") == Refusal(pytest.approx(61.0), "rpm")
    assert await limiter.tenant_statistics("free") == ()


# -- memory and Redis agree, operation by operation ---------------------------------------


@dataclass(frozen=True)
class Setup:
    """The limits of one example: the account's and its tenants'."""

    account: Limits
    tenants: Tenants


@st.composite
def tenant_limits(draw: st.DrawFn) -> Limits:
    """A tenant's own limits: requests per period, maybe tokens, maybe a cap."""
    period_s = draw(st.sampled_from([2.0, 10.0, 60.0]))
    rates = [
        Rate(
            draw(st.integers(1, 4)),
            period_s,
            "requests",
            name="req",
            slices=draw(st.sampled_from([1, 5, 60])),
        )
    ]
    if draw(st.booleans()):
        rates.append(Rate(draw(st.sampled_from([40, 100])), 4.0, "tokens", name="tok", slices=2))
    return Limits(
        concurrency=draw(st.sampled_from([None, None, 1, 2])),
        rates=tuple(rates),
        token_counting=draw(st.sampled_from(list(TokenCounting))),
        margin_s=draw(st.sampled_from([0.0, 0.5])),
    )


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    """An account that binds now and then, a default tenant and a named one with limits
    of their own, and a tenant with a weight only."""
    account = Limits(
        concurrency=draw(st.sampled_from([None, None, 3])),
        rates=(
            Rate(draw(st.integers(3, 8)), 10.0, "requests", name="rpx", slices=5),
            Rate(draw(st.sampled_from([150, 400])), 60.0, "tokens", name="tpm", slices=60),
        ),
        token_counting=draw(st.sampled_from(list(TokenCounting))),
    )
    tenants = Tenants(
        default=Tenant(draw(tenant_limits())),
        named={"b": Tenant(draw(tenant_limits()), weight=2), "w": Tenant(weight=3)},
    )
    return Setup(account, tenants)


TENANTS = ("a", "b", "c", "w", None)


def same_wait(waits: list[float]) -> bool:
    """Whether the backends' wait hints agree (a release on memory: a lease's bound on
    Redis)."""
    first = waits[0]
    if math.isinf(first):
        return all(wait >= UNTIL_RELEASE_S for wait in waits)
    return all(math.isclose(wait, first, rel_tol=1e-6, abs_tol=1e-9) for wait in waits)


@dataclass
class Held:
    """One call admitted by every backend, with each one's admission."""

    number: int
    tenant: str | None
    admissions: list[Admission]


class TenantDifferential(RuleBasedStateMachine):
    """Plays each operation on a limiter with tenants on memory, fakeredis and a real
    redis-server at once; compares every outcome and every tenant's usage."""

    redis_url = ""
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self._runner = asyncio.Runner()
        self._benches: list[Bench] = []
        self._limiters: list[Limiter] = []
        self._calls = 0
        self._hint_s: float | None = None

    def _run(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine

        return self._runner.run(wrapped())

    def _on_all(self, call: Callable[[Limiter], Awaitable[T]]) -> list[T]:
        async def each() -> list[T]:
            out = []
            for i, limiter in enumerate(self._limiters):
                try:
                    async with asyncio.timeout(5):
                        out.append(await call(limiter))
                except TimeoutError:
                    raise AssertionError(f"hung on {KINDS[i]}") from None
            return out

        return self._run(each())

    @initialize(setup=setups())
    def begin(self, setup: Setup) -> None:
        self._benches = [Bench(kind, self.redis_url) for kind in KINDS]
        self._limiters = [bench.limiter(setup.account, setup.tenants) for bench in self._benches]

    def teardown(self) -> None:
        async def close() -> None:
            for bench in self._benches:
                await bench.aclose()

        try:
            self._run(close())
        finally:
            self._runner.close()

    @rule(
        target=held,
        tenant=st.sampled_from(TENANTS),
        requests=st.sampled_from([0, 1, 1, 1, 2]),
        tokens=st.integers(0, 60) | st.sampled_from([0, 100, 500]),
    )
    def acquire(self, tenant: str | None, requests: int, tokens: int) -> object:
        """Any demand of any tenant (or none): admitted by all, or refused alike."""

        async def one(limiter: Limiter) -> Admission | Refusal | str:
            try:
                return await attempt(limiter, tenant, requests, tokens)
            except ratekit.CostExceedsLimitError as error:  # compared, not hidden
                return str(error)

        outcomes = self._on_all(one)
        where = f"acquire({tenant!r}, {requests}, {tokens})"
        kinds = [type(outcome).__name__ for outcome in outcomes]
        assert len(set(kinds)) == 1, f"{where}: {outcomes}"
        first = outcomes[0]
        if isinstance(first, str):
            assert len(set(outcomes)) == 1, f"{where}: {outcomes}"
            return multiple()
        if isinstance(first, Refusal):
            refusals = [o for o in outcomes if isinstance(o, Refusal)]
            assert len({r.dimension for r in refusals}) == 1, f"{where}: {outcomes}"
            assert same_wait([r.wait_s for r in refusals]), f"{where}: {outcomes}"
            if not math.isinf(first.wait_s):
                self._hint_s = first.wait_s
            return multiple()
        self._calls += 1
        return Held(self._calls, tenant, [o for o in outcomes if isinstance(o, Admission)])

    @rule(
        call=consumes(held),
        how=st.sampled_from(["release", "settle", "settle", "refund"]),
        tokens=st.integers(0, 120),
        counted=st.sampled_from([None, None, 0, 30, 90]),
    )
    def end(self, call: Held, how: str, tokens: int, counted: int | None) -> None:
        """End a call: with its estimates, settled with real usage, or refunded."""

        async def finish(admission: Admission) -> None:
            if how == "refund":
                await admission.refund()
                return
            if how == "settle":
                admission.settle(tokens=tokens, counted_tokens=counted)
            await admission.release()

        async def each() -> None:
            for admission in call.admissions:
                await finish(admission)

        self._run(each())

    @rule(call=held)
    def sent(self, call: Held) -> None:
        """The request of a call in flight leaves now."""

        async def each() -> None:
            for admission in call.admissions:
                await admission.sent()

        self._run(each())

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.0, 4.0, 11.0, 61.0]))
    def advance(self, seconds: float) -> None:
        for bench in self._benches:
            bench.clock.advance(seconds)

    @rule()
    def advance_to_hint(self) -> None:
        """To the instant the last refusal named, where an off-by-one would show."""
        if self._hint_s is not None:
            for bench in self._benches:
                bench.clock.advance(self._hint_s)
            self._hint_s = None

    @invariant()
    def same_usage(self) -> None:
        """Every tenant's own usage, and the account's, is the same on every backend."""
        if not self._limiters:
            return
        for tenant in ("a", "b", "c"):
            stats = self._on_all(lambda limiter, t=tenant: limiter.tenant_statistics(t))
            for one in stats[1:]:
                assert _usage(one) == pytest.approx(_usage(stats[0]), abs=1e-9), (tenant, stats)
        account = self._on_all(lambda limiter: limiter.statistics())
        for one in account[1:]:
            assert _usage(one.dimensions) == pytest.approx(_usage(account[0].dimensions))


def _usage(stats: tuple[ratekit.DimensionStatistics, ...]) -> list[float]:
    return [value for s in stats for value in (s.used, s.in_flight)]


@pytest.mark.redis
def test_memory_and_redis_agree_on_tenants(redis_server: RedisServer) -> None:
    """Random sequences of tenants' acquires, settles, refunds and sends give the same
    admissions, refusals (wait and dimension) and usage on memory and on both Redis."""
    TenantDifferential.redis_url = redis_server.url
    run_state_machine_as_test(
        TenantDifferential,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# -- Redis alone: the queue, leases, notices, keys ----------------------------------------


@pytest.mark.redis
async def test_a_head_held_back_by_its_tenant_steps_aside_on_redis(
    redis_server: RedisServer,
) -> None:
    """Callers queued for the account on Redis, the head admitted with those behind it in
    one script: one refused by its tenant's own limit leaves the queue, the callers
    behind it go on, and it is admitted when its own window frees."""
    bench = Bench("redis", redis_server.url)
    tenants = Tenants(named={"capped": Tenant(Limits(rpm=1))})
    limiter = bench.limiter(Limits(concurrency=2), tenants)
    order: list[tuple[str, float]] = []
    start = bench.clock.now()

    async def call(tenant: str) -> None:
        async with limiter.acquire(tenant=tenant):
            order.append((tenant, bench.clock.now() - start))

    async def until(condition: Callable[[], Awaitable[bool]]) -> None:
        with anyio.fail_after(10):
            while not await condition():  # noqa: ASYNC110 - polled over the network
                await anyio.sleep(0.005)

    async def waiting(count: int) -> bool:
        return (await limiter.statistics()).waiting == count

    try:
        blockers = [await admitted(limiter, None) for _ in range(2)]
        async with anyio.create_task_group() as group:
            for number, tenant in enumerate(["capped", "capped", "free", "capped", "free"]):
                group.start_soon(call, tenant)
                await until(lambda n=number: waiting(n + 1))
            for blocker in blockers:
                await blocker.release()

            async def served(count: int) -> bool:
                return len(order) == count

            await until(lambda: served(3))
            assert [tenant for tenant, _ in order] == ["capped", "free", "free"]
            bench.clock.advance(61)
            await until(lambda: served(4))
            bench.clock.advance(61)
            await until(lambda: served(5))
        assert order[3:] == [("capped", pytest.approx(61)), ("capped", pytest.approx(122))]
    finally:
        await bench.aclose()


async def test_a_lapsed_lease_gives_back_its_tenants_slot_and_holds() -> None:
    """A process that died mid-call (its lease no longer renewed) frees its tenant's slot
    and held tokens when the lease lapses, as it frees the account's."""
    clock = FakeClock()
    server = fakeredis.FakeServer()
    limits = Limits(concurrency=10, tpm=10_000, token_counting=TokenCounting.USAGE)
    own = Limits(concurrency=1, tpm=1_000, token_counting=TokenCounting.USAGE)
    tenants = Tenants(Tenant(own))

    def pod() -> tuple[RedisBackend, Limiter]:
        client = fakeredis.FakeAsyncRedis(server=server)
        backend = RedisBackend(client, namespace="acct", server_time=False, lease_ttl_s=5.0)
        return backend, Limiter(limits, backend=backend, clock=clock, tenants=tenants)

    dying, first = pod()
    living, second = pod()
    await admitted(first, "a", tokens=800)
    await dying.aclose()  # no renewal, no settle: as if killed
    assert await attempt(second, "a", tokens=100) == Refusal(5.0, "tenant concurrency")
    assert [s.used for s in await second.tenant_statistics("a")] == [1, 800]
    clock.advance(5.0)
    admission = await admitted(second, "a", tokens=900)
    assert [s.used for s in await second.tenant_statistics("a")] == [1, 900]
    await admission.release()
    await living.aclose()


async def test_a_living_holder_keeps_its_tenants_slot() -> None:
    """A call held longer than its lease is renewed, on its tenant's own leases too: its
    slot is not given to another caller of the tenant."""
    server = fakeredis.FakeServer()
    tenants = Tenants(Tenant(Limits(concurrency=1)))
    pods = [
        RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct", lease_ttl_s=0.3)
        for _ in range(2)
    ]
    here, there = (Limiter(Limits(concurrency=5), backend=b, tenants=tenants) for b in pods)
    held = await admitted(here, "a")
    await asyncio.sleep(1.0)  # three lease ttls: renewed every 0.1 s
    refusal = await attempt(there, "a")
    assert isinstance(refusal, Refusal)
    assert refusal.dimension == "tenant concurrency"
    assert 0 < refusal.wait_s <= 0.3
    await held.release()
    await (await admitted(there, "a")).release()
    for backend in pods:
        await backend.aclose()


async def test_a_tenants_release_elsewhere_wakes_its_waiter_at_once() -> None:
    """A caller held back by its tenant's cap waits out of the queue; the end of the
    tenant's call in another process is announced and wakes it long before its hint."""
    server = fakeredis.FakeServer()
    pods = [
        RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct", lease_ttl_s=30)
        for _ in range(2)
    ]
    # Each its own Tenants, as in two processes: only the store's notice links them.
    here, there = (
        Limiter(Limits(concurrency=5), backend=b, tenants=Tenants(Tenant(Limits(concurrency=1))))
        for b in pods
    )
    held = await admitted(there, "a")
    woken_after: list[float] = []

    async def wait_for_it() -> None:
        started = time.monotonic()
        async with here.acquire(tenant="a"):
            woken_after.append(time.monotonic() - started)

    async with anyio.create_task_group() as group:
        group.start_soon(wait_for_it)
        await asyncio.sleep(0.5)  # refused (hint: 30 s), its listener subscribed
        assert woken_after == []
        await held.release()
    assert woken_after[0] < 5
    for backend in pods:
        await backend.aclose()


async def test_a_release_heard_while_a_refusal_was_on_its_way_is_not_missed() -> None:
    """The end of a tenant's call announced after the script refused its caller but
    before the refusal came back: the caller tries again at once instead of waiting for
    a notice that already came (or its hint, a lease's ttl)."""
    server = fakeredis.FakeServer()
    pods = [
        RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="acct", lease_ttl_s=30)
        for _ in range(2)
    ]
    here, there = (
        Limiter(Limits(concurrency=5), backend=b, tenants=Tenants(Tenant(Limits(concurrency=1))))
        for b in pods
    )
    held = await admitted(there, "a")
    await asyncio.sleep(0.3)  # the listener of `here` subscribed
    reserve = pods[0].reserve_tenants
    slow = [True]

    async def refusal_on_its_way(*args: Any) -> Any:
        outcome = await reserve(*args)
        if slow.pop() if slow else False:
            await held.release()  # announced, and heard here, before the refusal lands
            await asyncio.sleep(0.3)
        return outcome

    pods[0].reserve_tenants = refusal_on_its_way  # type: ignore[method-assign]
    with anyio.fail_after(5):
        await (await here.acquire(tenant="a")).release()
    for backend in pods:
        await backend.aclose()


async def test_a_caller_is_asked_for_by_one_head_at_a_time() -> None:
    """While a head's batch (itself and the caller behind it) is on its way to Redis, a
    caller held back by its tenant comes back ahead of both (its earlier fair-share tag)
    and is served as the new head: it does not ask for them again, so no grant is handed
    over another one (which nobody would end), and once every caller has ended nothing
    is in flight."""
    bench = Bench("fakeredis", None)
    tenants = Tenants(Tenant(Limits(concurrency=10)), named={"b": Tenant(Limits(concurrency=1))})
    limiter = bench.limiter(Limits(concurrency=5), tenants)
    backend = limiter.backend
    assert isinstance(backend, RedisBackend)
    reserve = backend.reserve_tenants
    go = asyncio.Event()  # batches are sent once the blockers' settles are answered
    b_refused = asyncio.Event()
    b_admitted = asyncio.Event()
    a_queued = asyncio.Event()

    async def ordered(limits: Limits, demands: Any, now: Any, shares: Any) -> Any:
        names = [share[0] for share in shares if share is not None]
        batch = len(demands) > 1
        if batch:
            await go.wait()
        grants, refusal = await reserve(limits, demands, now, shares)
        if "b" in names:
            (b_admitted if grants else b_refused).set()
        elif not grants:
            a_queued.set()
        elif batch:
            await b_admitted.wait()  # still on its way while the held-back caller is served
        return grants, refusal

    admitted_tenants: list[str] = []

    async def call(tenant: str) -> None:
        async with limiter.acquire(tenant=tenant):
            admitted_tenants.append(tenant)

    try:
        held_b = await admitted(limiter, "b")
        backend.reserve_tenants = ordered  # type: ignore[method-assign]
        with anyio.fail_after(10):  # a bound on a hang, not a timing
            async with anyio.create_task_group() as group:
                group.start_soon(call, "b")  # held back by its tenant: waits out of the queue
                await b_refused.wait()
                blockers = [await admitted(limiter, "c") for _ in range(4)]  # the account is full
                group.start_soon(call, "a")  # the head
                await a_queued.wait()
                group.start_soon(call, "a")  # behind it, asked for in the head's batch
                await anyio.wait_all_tasks_blocked()
                assert (await limiter.statistics()).waiting == 2
                for blocker in blockers:
                    await blocker.release()
                await backend.drain()
                go.set()
                await held_b.release()  # the held-back caller comes back, ahead of both
        assert sorted(admitted_tenants) == ["a", "a", "b"]
        await backend.drain()
        assert (await limiter.statistics()).dimension("concurrency").used == 0
        assert [s.used for s in await limiter.tenant_statistics("a")] == [0]
    finally:
        await bench.aclose()


@pytest.mark.redis
async def test_a_tenant_leaves_a_few_bytes_that_expire(redis_server: RedisServer) -> None:
    """After its calls end, a tenant is one small hash with a ttl (its leases' fields are
    gone with its last lease); a call without a tenant touches no tenant key and sends
    what it sent before tenants existed: the account's key, and the arguments of its
    reserve and of its settle."""
    client = Redis.from_url(redis_server.url)
    namespace = f"bytes-{uuid.uuid4().hex}"
    backend = RedisBackend(client, namespace=namespace, lease_ttl_s=5.0)
    tenants = Tenants(Tenant(Limits(rpm=60, tpm=100_000)))
    limiter = Limiter(Limits(rpm=10**9, tpm=10**9), backend=backend, tenants=tenants)
    sent: list[tuple[str, ...]] = []
    wire = backend._link._wire  # what goes out for each command sent

    def spy(command: Any) -> tuple[Any, ...]:
        if command.args[0] != "EXISTS":  # the first call's look for an earlier layout
            sent.append(command.args)
        return wire(command)

    backend._link._wire = spy  # type: ignore[method-assign]
    try:
        async with limiter.acquire(tokens=100):
            pass
        await backend.drain()  # the settle is posted, not awaited
        assert [(args[2], len(args) - 3 - int(args[2])) for args in sent] == [("1", 7), ("1", 11)]
        prefix = backend.key_prefix()
        keys = {key.decode() async for key in client.scan_iter(match=f"ratekit:{{{namespace}}}:*")}
        assert keys == {f"{prefix}:state"}
        async with limiter.acquire(tokens=100, tenant="acme"):
            pass
        await backend.drain()
        keys = {key.decode() async for key in client.scan_iter(match=f"ratekit:{{{namespace}}}:*")}
        tenant_key = f"{prefix}:ts:acme"
        assert keys == {f"{prefix}:state", tenant_key}
        assert await client.memory_usage(tenant_key) <= 512
        # The tenant's longest window, a minute, and two leases: then it is gone.
        assert 60_000 < await client.pttl(tenant_key) <= (60 + 1 + 10) * 1125
    finally:
        await backend.aclose()
        await client.aclose()


# -- four processes, one account ----------------------------------------------------------

# A minute compressed to 2 s; each admission counts 0.25 s longer than its period, which
# covers the time between the server's admission and the moment a process writes it down.
FLEET_SCALE = 1 / 30
FLEET_PERIOD_S = 60 * FLEET_SCALE
FLEET_MARGIN_S = 0.25
FLEET_ACCOUNT = Limits(rpm=14, period_scale=FLEET_SCALE, margin_s=FLEET_MARGIN_S)
FLEET_TENANTS = {
    "a": Limits(rpm=3, period_scale=FLEET_SCALE, margin_s=FLEET_MARGIN_S),
    "b": Limits(rpm=4, concurrency=1, period_scale=FLEET_SCALE, margin_s=FLEET_MARGIN_S),
    "c": Limits(concurrency=2),
}
# A tenant with a weight only: it takes what the others leave of the account.
FLEET_FREE = "d"
FLEET_PODS = 4
FLEET_RUN_S = 6.0
FLEET_CALL_S = 0.05


def _fleet_pod(url: str, namespace: str, start_at: float, results: Any) -> None:
    """One process of the fleet: callers of every tenant for `FLEET_RUN_S` from
    `start_at` (monotonic, shared by the processes of one machine)."""
    results.put(asyncio.run(_fleet_calls(url, namespace, start_at)))


async def _fleet_calls(url: str, namespace: str, start_at: float) -> list[tuple[str, float, float]]:
    backend = RedisBackend(url, namespace=namespace, lease_ttl_s=2.0)
    tenants = Tenants(named={name: Tenant(limits) for name, limits in FLEET_TENANTS.items()})
    limiter = Limiter(FLEET_ACCOUNT, backend=backend, tenants=tenants)
    calls: list[tuple[str, float, float]] = []

    async def caller(tenant: str) -> None:
        while True:
            async with limiter.acquire(tenant=tenant):
                started = time.monotonic()
                await asyncio.sleep(FLEET_CALL_S)
                calls.append((tenant, started, time.monotonic()))

    await asyncio.sleep(max(start_at - time.monotonic(), 0))
    with anyio.move_on_after(FLEET_RUN_S):
        async with anyio.create_task_group() as group:
            for tenant in [*FLEET_TENANTS, FLEET_FREE]:
                for _ in range(3):
                    group.start_soon(caller, tenant)
    await backend.aclose()
    return calls


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The most of `times` in any half-open window of `window_s`."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of `spans` (start, end) that overlap at one instant."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.redis
def test_four_processes_never_exceed_a_tenants_limits_or_the_accounts(
    redis_server: RedisServer,
) -> None:
    """Four processes call as three tenants with limits of their own and one without, on
    one real redis-server: in no window does a tenant exceed its own rpm, nor the account
    its rpm; a tenant's cap holds over the four; and the account's rate is used."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    namespace = f"fleet-{uuid.uuid4().hex}"
    start_at = time.monotonic() + 5.0
    pods = [
        context.Process(target=_fleet_pod, args=(redis_server.url, namespace, start_at, results))
        for _ in range(FLEET_PODS)
    ]
    for pod in pods:
        pod.start()
    try:
        calls = [call for _ in pods for call in results.get(timeout=60)]
    finally:
        for pod in pods:
            pod.join(timeout=10)
            if pod.is_alive():
                pod.kill()
    by_tenant: dict[str, list[tuple[float, float]]] = {}
    for tenant, started, ended in calls:
        by_tenant.setdefault(tenant, []).append((started, ended))
    for tenant, limits in FLEET_TENANTS.items():
        spans = by_tenant[tenant]
        if limits.rpm is not None:
            assert most_in_any_window([s for s, _ in spans], FLEET_PERIOD_S) <= limits.rpm
        if limits.concurrency is not None:
            assert most_at_once(spans) <= limits.concurrency
    starts = [started for _, started, _ in calls]
    assert FLEET_ACCOUNT.rpm is not None
    assert most_in_any_window(starts, FLEET_PERIOD_S) <= FLEET_ACCOUNT.rpm
    # The account binds: over the run, close to its rate (a window per period).
    periods = FLEET_RUN_S / (FLEET_PERIOD_S + FLEET_MARGIN_S)
    assert len(calls) >= 0.8 * periods * FLEET_ACCOUNT.rpm
    assert {tenant for tenant, _, _ in calls} == {*FLEET_TENANTS, FLEET_FREE}
