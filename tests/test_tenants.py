"""Tenants: their own limits checked with the account's, weighted fair share, no blocking."""

from __future__ import annotations

import math
import uuid
from collections import Counter

import anyio
import anyio.lowlevel
import pytest

import ratekit
from ratekit import Account, Limiter, Limits, Scheduler, Tenant, Tenants
from ratekit._tenants import _PRUNE_AT, FairShare
from ratekit.clock import FakeClock
from ratekit.testing import RedisServer

from .test_limiter import settle_tasks
from .test_scheduler import run_clock

pytestmark = pytest.mark.anyio


def make(limits: Limits, tenants: Tenants | dict[str, Tenant]) -> tuple[Limiter, FakeClock]:
    clock = FakeClock()
    return Limiter(limits, clock=clock, tenants=tenants), clock


class Calls:
    """Callers of tenants, started one by one; records who was admitted when."""

    def __init__(self, limiter: Limiter, clock: FakeClock, group: anyio.abc.TaskGroup) -> None:
        self.limiter = limiter
        self.clock = clock
        self.group = group
        self.order: list[str] = []
        self.times: dict[str, list[float]] = {}
        self.held: list[ratekit.Admission] = []

    async def start(self, tenant: str, *, hold: bool = False, **kwargs: float) -> None:
        async def run() -> None:
            admission = await self.limiter.acquire(tenant=tenant, **kwargs)  # type: ignore[arg-type]
            self.order.append(tenant)
            self.times.setdefault(tenant, []).append(self.clock.now())
            if hold:
                self.held.append(admission)
            else:
                await admission.release()

        self.group.start_soon(run)
        await settle_tasks()


async def test_waiting_tenants_are_served_in_proportion_to_their_weights() -> None:
    """Three backlogged tenants of weights 1, 1 and 2 share admissions 25/25/50, interleaved,
    whatever order their callers arrived in."""
    tenants = Tenants(named={"a": Tenant(weight=1), "b": Tenant(weight=1), "c": Tenant(weight=2)})
    limiter, clock = make(Limits(concurrency=1), tenants)
    blocker = await limiter.acquire()
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        for tenant in "abc":
            for _ in range(40):
                await calls.start(tenant)
        assert calls.order == []
        await blocker.release()
        await settle_tasks()
    first = Counter(calls.order[:80])
    assert first == {"a": 20, "b": 20, "c": 40}
    # Interleaved, not in bursts: every window of 8 admissions holds 2, 2 and 4.
    for start in range(0, 80, 8):
        assert Counter(calls.order[start : start + 8]) == {"a": 2, "b": 2, "c": 4}
    assert len(calls.order) == 120


async def test_a_tenant_alone_gets_the_whole_account() -> None:
    """An idle tenant's share goes to the others: a tenant of weight 1 among weights that
    sum to 10 takes every admission while nobody else waits."""
    tenants = Tenants(named={"small": Tenant(weight=1), "big": Tenant(weight=9)})
    limiter, clock = make(Limits(rpm=10), tenants)
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        for _ in range(15):
            await calls.start("small")
        assert len(calls.order) == 10  # the whole account's rpm at once
        clock.advance(61)
        await settle_tasks()
    assert calls.order == ["small"] * 15


async def test_a_newcomer_starts_level_with_the_others_not_with_saved_credit() -> None:
    """A tenant that had nobody waiting while another was served gets no burst of turns
    when it arrives: from then on the two alternate (equal weights)."""
    limiter, clock = make(Limits(concurrency=1), Tenants())
    blocker = await limiter.acquire()
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        for _ in range(30):
            await calls.start("old", hold=True)
        await blocker.release()
        await settle_tasks()
        for _ in range(19):
            await calls.held[-1].release()
            await settle_tasks()
        assert calls.order == ["old"] * 20
        for _ in range(10):
            await calls.start("new", hold=True)
        for _ in range(20):
            await calls.held[-1].release()
            await settle_tasks()
        await calls.held[-1].release()
    assert calls.order[20:40] == ["new", "old"] * 10


async def test_calls_made_while_nobody_waited_earn_a_tenant_no_debt() -> None:
    """Calls a tenant made while it had the account to itself (each admitted at once, as
    every call through a shared backend is asked) leave it level with a newcomer when
    the account becomes contended: the two alternate."""
    limiter, clock = make(Limits(concurrency=1), Tenants())
    for _ in range(20):
        await (await limiter.acquire(tenant="old", timeout=5)).release()
    blocker = await limiter.acquire()
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        for _ in range(5):
            await calls.start("old")
            await calls.start("new")
        await blocker.release()
        await settle_tasks()
    assert calls.order == ["old", "new"] * 5


def test_fair_share_keeps_few_tags_for_many_tenants_calling_once() -> None:
    """A hundred thousand tenants calling once each, with nobody waiting between them,
    leave only a bounded number of tags behind: the virtual time moves up to the latest
    tag once the queue empties, so the kept tags can go (and tagging stays O(1))."""
    fair = FairShare()
    for number in range(100_000):
        fair.served(fair.tag(f"t{number}", 1.0), idle=True)
    assert len(fair._finish) <= _PRUNE_AT + 1


async def test_a_tenant_never_exceeds_its_own_rate_and_does_not_hold_up_others() -> None:
    """A tenant at its own rpm steps out of the queue: the others behind it are admitted
    at once, and it is admitted again exactly when its own window frees."""
    tenants = Tenants(named={"capped": Tenant(Limits(rpm=2))})
    limiter, clock = make(Limits(rpm=100), tenants)
    start = clock.now()
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        for _ in range(5):
            await calls.start("capped")
        for _ in range(5):
            await calls.start("free")
        assert calls.order == ["capped", "capped", "free", "free", "free", "free", "free"]
        clock.advance(60.999)
        await settle_tasks()
        assert len(calls.times["capped"]) == 2
        clock.advance(0.001)
        await settle_tasks()
        assert len(calls.times["capped"]) == 4
        clock.advance(61)
        await settle_tasks()
    capped = calls.times["capped"]
    assert [t - start for t in capped] == pytest.approx([0, 0, 61, 61, 122])
    for i, t in enumerate(capped):  # in any 60 s, at most 2
        assert sum(1 for u in capped[i:] if u - t < 60) <= 2


async def test_a_head_held_back_by_its_tenant_steps_aside_for_the_queue() -> None:
    """At the head of a queue for the account, a caller refused by its tenant's own limit
    leaves the queue: the callers behind it go on, and it comes back when its window frees."""
    tenants = Tenants(named={"capped": Tenant(Limits(rpm=1))})
    limiter, clock = make(Limits(concurrency=1), tenants)
    start = clock.now()
    blocker = await limiter.acquire()
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        for _ in range(3):
            await calls.start("capped")
            await calls.start("free")
        await blocker.release()
        await settle_tasks()
        assert calls.order == ["capped", "free", "free", "free"]
        clock.advance(61)
        await settle_tasks()
        clock.advance(61)
        await settle_tasks()
    assert [t - start for t in calls.times["capped"]] == pytest.approx([0, 61, 122])


async def test_a_tenant_concurrency_cap_holds_its_own_calls_only() -> None:
    """A tenant with a cap of 1 waits for its own call to end; another tenant's calls go."""
    tenants = Tenants(default=Tenant(Limits(concurrency=1)))
    limiter, clock = make(Limits(concurrency=10), tenants)
    async with anyio.create_task_group() as group:
        calls = Calls(limiter, clock, group)
        await calls.start("a", hold=True)
        await calls.start("a", hold=True)
        await calls.start("b", hold=True)
        assert calls.order == ["a", "b"]
        await calls.held[0].release()
        await settle_tasks()
        assert calls.order == ["a", "b", "a"]
        for admission in calls.held[1:]:
            await admission.release()
    stats = await limiter.statistics()
    assert stats.dimension("concurrency").used == 0
    assert (await limiter.tenant_statistics("a"))[0].used == 0


async def test_a_refusal_by_the_account_takes_nothing_from_the_tenant() -> None:
    """The tenant's windows and the account's are one step: a call the account refuses
    leaves the tenant's own window as it was."""
    tenants = Tenants(default=Tenant(Limits(rpm=1)))
    limiter, clock = make(Limits(rpm=1), tenants)
    await (await limiter.acquire()).release()  # the account's one request this minute
    assert await limiter.try_acquire(tenant="a") is None
    assert (await limiter.tenant_statistics("a"))[0].used == 0
    clock.advance(61)
    admission = await limiter.try_acquire(tenant="a")
    assert admission is not None
    await admission.release()
    assert (await limiter.tenant_statistics("a"))[0].used == 1


async def test_refund_and_settle_reach_the_tenant_windows() -> None:
    """A refunded call gives its tenant's tokens back; a settled one records its usage."""
    tenants = Tenants(default=Tenant(Limits(tpm=1_000, token_counting="usage")))
    limiter, _ = make(Limits(tpm=10_000, token_counting="usage"), tenants)
    async with limiter.acquire(tokens=800, tenant="a") as admission:
        assert (await limiter.tenant_statistics("a"))[0].used == 800
        admission.settle(tokens=300)
    assert (await limiter.tenant_statistics("a"))[0].used == 300
    admission = await limiter.acquire(tokens=500, tenant="a")
    await admission.refund()
    assert (await limiter.tenant_statistics("a"))[0].used == 300


async def test_a_wait_for_the_tenants_own_limit_times_out_by_name() -> None:
    """A timeout shorter than the tenant's own wait fails at once, naming its dimension."""
    tenants = Tenants(default=Tenant(Limits(rpm=1)))
    limiter, _ = make(Limits(rpm=100), tenants)
    await (await limiter.acquire(tenant="a")).release()
    with pytest.raises(ratekit.AcquireTimeout, match="tenant rpm"):
        await limiter.acquire(tenant="a", timeout=5)
    admission = await limiter.acquire(tenant="b", timeout=5)  # another tenant is free
    await admission.release()


async def test_a_cancelled_caller_held_back_by_its_tenant_leaves_nothing() -> None:
    """Cancelled while waiting for its own limit: nothing is held, the account is intact."""
    tenants = Tenants(default=Tenant(Limits(rpm=1)))
    limiter, _ = make(Limits(rpm=100), tenants)
    await (await limiter.acquire(tenant="a")).release()
    with anyio.move_on_after(0):
        await limiter.acquire(tenant="a")
    stats = await limiter.statistics()
    assert stats.waiting == 0
    assert stats.dimension("rpm").used == 1
    assert (await limiter.tenant_statistics("a"))[0].used == 1


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Tenant(weight=0), r"Tenant.weight must be a number in \(0, 1e6\], got 0"),
        (lambda: Tenant(weight=math.nan), r"Tenant.weight .* got nan"),
        (lambda: Tenant(weight=True), r"Tenant.weight .* got True"),
        (lambda: Tenant(limits={"rpm": 5}), r"Tenant.limits must be a ratekit.Limits"),
        (lambda: Tenants(named={"": Tenant()}), r"Tenants.named: a tenant is named by"),
        (lambda: Tenants(named={"a": 3}), r"Tenants.named\['a'\] must be a Tenant, got 3"),
        (lambda: Limiter(Limits(rpm=1), tenants=[1]), r"tenants must be a ratekit.Tenants"),
    ],
)
def test_bad_tenants_are_named(build: object, message: str) -> None:
    with pytest.raises(ratekit.InvalidArgumentError, match=message):
        build()  # type: ignore[operator]


async def test_a_tenant_needs_a_limiter_with_tenants() -> None:
    limiter = Limiter(Limits(rpm=1))
    with pytest.raises(ratekit.InvalidArgumentError, match="needs a limiter with tenants"):
        limiter.acquire(tenant="a")
    limiter = Limiter(Limits(rpm=1), tenants=Tenants())
    with pytest.raises(ratekit.InvalidArgumentError, match="non-empty str"):
        limiter.acquire(tenant="")


async def test_idle_tenants_are_forgotten() -> None:
    """The state of tenants with nothing in flight and empty windows is dropped: memory
    follows the active tenants, not every tenant ever seen."""
    tenants = Tenants(default=Tenant(Limits(rpm=5)))
    limiter, clock = make(Limits(rpm=1_000_000), tenants)
    for i in range(3_000):
        await (await limiter.acquire(tenant=f"t{i}")).release()
        if i % 1_000 == 999:
            clock.advance(62)
    assert tenants.active() <= 2_048


async def test_many_tenants_at_once_are_looked_over_a_few_times_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thirty thousand tenants each calling within one minute (none idle yet): the idle
    ones are looked for once the count doubles or a second passes, not on every new
    tenant; once they are idle they are forgotten."""
    prunes = Counter[str]()
    prune = Tenants._prune

    def counted(self: Tenants, now: float) -> None:
        prunes["prune"] += 1
        prune(self, now)

    monkeypatch.setattr(Tenants, "_prune", counted)
    tenants = Tenants(default=Tenant(Limits(rpm=5)))
    limiter, clock = make(Limits(rpm=1_000_000), tenants)
    for i in range(30_000):
        await (await limiter.acquire(tenant=f"t{i}")).release()
    assert prunes["prune"] <= 8
    assert tenants.active() == 30_000
    clock.advance(62)
    await (await limiter.acquire(tenant="late")).release()
    assert tenants.active() == 1


# -- through a scheduler ------------------------------------------------------------------


def _scheduler(tenants: Tenants, clock: FakeClock, events: list[ratekit.Event]) -> Scheduler:
    # Moonshot Tier1 at 60 RPM and no concurrency cap: the account binds by its rpm.
    account = Account("moonshot", tier="tier1", rpm=60, concurrency=None, tpm=None)
    return Scheduler(account, clock=clock, tenants=tenants, hooks=[events.append])


async def _run(
    scheduler: Scheduler, clock: FakeClock, callers: dict[str, int], seconds: float
) -> list[tuple[float, str]]:
    """Start `callers[t]` calls of each tenant `t` at once, their arrivals interleaved in
    proportion to the counts; return (time, tenant) of each call, in the order served."""
    served: list[tuple[float, str]] = []

    async def call(tenant: str) -> None:
        served.append((clock.now(), tenant))

    arrivals = sorted(
        ((i + 0.5) / count, tenant) for tenant, count in callers.items() for i in range(count)
    )
    async with anyio.create_task_group() as group:
        for _, tenant in arrivals:
            group.start_soon(lambda t=tenant: scheduler.submit(call, t, tenant=t))
            await settle_tasks()  # in this order (trio starts tasks in any order)
        await run_clock(clock, seconds)
    return served


async def test_a_scheduler_shares_its_account_by_weight() -> None:
    """Three tenants of weights 1, 1 and 2 wanting more than the account gets: 25/25/50
    of the admissions while all three wait, and each alone later gets the whole rate."""
    clock = FakeClock()
    events: list[ratekit.Event] = []
    tenants = Tenants(named={"gold": Tenant(weight=2)})
    scheduler = _scheduler(tenants, clock, events)
    served = await _run(scheduler, clock, {"a": 100, "b": 100, "gold": 200}, 400)
    assert len(served) == 400
    contended = Counter(tenant for _, tenant in served[:300])
    assert contended == {"a": 75, "b": 75, "gold": 150}
    start = served[0][0]
    per_minute = Counter(int((t - start) // 61) for t, _ in served)
    assert all(count == 60 for minute, count in per_minute.items() if minute < 6)
    admitted = [event for event in events if isinstance(event, ratekit.events.Admitted)]
    assert Counter(event.tenant for event in admitted) == {"a": 100, "b": 100, "gold": 200}


async def test_a_tenant_at_its_own_limit_leaves_the_rest_to_the_others() -> None:
    """A tenant capped at 10 RPM never has more than 10 in any 60 s; the others (weights 1
    and 2) take the account's other 50 a minute between them, 1:2."""
    clock = FakeClock()
    tenants = Tenants(named={"capped": Tenant(Limits(rpm=10)), "gold": Tenant(weight=2)})
    scheduler = _scheduler(tenants, clock, [])
    served = await _run(scheduler, clock, {"capped": 40, "b": 100, "gold": 200}, 420)
    capped = [t for t, tenant in served if tenant == "capped"]
    for i, t in enumerate(capped):
        assert sum(1 for u in capped[i:] if u - t < 60) <= 10
    start = served[0][0]
    first = Counter(tenant for t, tenant in served if t - start < 240)
    # Not starved: its window frees at the very instant the account's does (all started at
    # once), and the queue may take that instant's capacity first; then it goes next.
    assert first["capped"] >= 30
    assert len(capped) == 40
    assert abs(first["gold"] / first["b"] - 2.0) < 0.1
    per_minute = Counter(int((t - start) // 61) for t, _ in served)
    assert all(count == 60 for minute, count in per_minute.items() if minute < 4)


async def test_ratekit_tenant_names_the_tenant_of_every_call_in_its_block() -> None:
    """``with ratekit.tenant(...)`` reaches the admission of a call made in the block (and
    in tasks started there); a tenant given to the call itself wins."""
    clock = FakeClock()
    events: list[ratekit.Event] = []
    scheduler = _scheduler(Tenants(), clock, events)

    async def call() -> None:
        return None

    with ratekit.tenant("acme"):
        await scheduler.submit(call)
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: scheduler.submit(call))
        await scheduler.submit(call, tenant="other")
    await scheduler.submit(call)
    admitted = [e.tenant for e in events if isinstance(e, ratekit.events.Admitted)]
    assert admitted == ["acme", "acme", "other", None]
    with pytest.raises(ratekit.InvalidArgumentError, match=r"ratekit\.tenant: a tenant is"):
        ratekit.tenant("").__enter__()


def test_tenant_limits_are_kept_with_a_shared_backend() -> None:
    """A Redis backend takes tenants with limits of their own, as the memory one does."""
    from ratekit.backends.redis import RedisBackend

    backend = RedisBackend("redis://127.0.0.1:1/0", namespace="tenants-test")
    account = Account("moonshot", tier="tier1")
    scheduler = Scheduler(account, backend=backend, tenants={"a": Tenant(Limits(rpm=1))})
    assert scheduler.tenants.limited
    Limiter(Limits(rpm=5), backend=backend, tenants={"a": Tenant(Limits(concurrency=1))})


def test_tenant_limits_on_a_model_of_its_own_need_one_slot_on_a_cluster() -> None:
    """On a Redis Cluster a model's own namespace is another slot than its account's
    tenants: no script could take both, and the limiter says so when it is built."""
    from redis.asyncio.cluster import RedisCluster

    from ratekit.backends.redis import RedisBackend

    backend = RedisBackend(RedisCluster(host="127.0.0.1", port=1), namespace="acct")
    limited = {"a": Tenant(Limits(rpm=1))}
    Limiter(Limits(rpm=5), backend=backend, tenants=limited)  # the account's own slot
    Limiter(Limits(rpm=5), backend=backend.child("m"), tenants={"a": Tenant(weight=2)})
    with pytest.raises(
        ratekit.InvalidArgumentError,
        match=r"tenant limits cannot be kept with namespace 'acct.m' on a Redis Cluster",
    ):
        Limiter(Limits(rpm=5), backend=backend.child("m"), tenants=limited)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_tenant_weights_order_a_queue_on_redis(redis_server: RedisServer) -> None:
    """On a shared backend the weights still order each pod's queue: 1, 1 and 2 give
    20/20/40 of the first 80 admissions, the callers behind the head admitted in batches
    in the same order."""
    from redis.asyncio import Redis

    from ratekit.backends.redis import RedisBackend

    client = Redis.from_url(redis_server.url)
    backend = RedisBackend(client, namespace=f"tenants-{uuid.uuid4().hex}")
    tenants = Tenants(named={"c": Tenant(weight=2)})
    limiter = Limiter(Limits(concurrency=1), backend=backend, tenants=tenants)
    order: list[str] = []
    try:
        blocker = await limiter.acquire()

        async def call(tenant: str) -> None:
            async with limiter.acquire(tenant=tenant):
                order.append(tenant)

        async with anyio.create_task_group() as group:
            for tenant in "abc":
                for _ in range(40):
                    group.start_soon(call, tenant)
                    await anyio.lowlevel.checkpoint()
            while (await limiter.statistics()).waiting < 120:  # noqa: ASYNC110 - polled
                await anyio.sleep(0.01)
            await blocker.release()
    finally:
        await backend.aclose()
        await client.aclose()
    assert Counter(order[:80]) == {"a": 20, "b": 20, "c": 40}
    assert len(order) == 120
