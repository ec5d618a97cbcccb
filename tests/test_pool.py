"""Pools: several accounts behind one admission, on a fake clock and the memory backend."""

from __future__ import annotations

import math
import socket
import uuid
from collections import Counter
from typing import Any

import anyio
import pytest

from ratekit import Account, AcquireTimeout, InvalidArgumentError, Pool, Scheduler
from ratekit.backends import Backend, MemoryBackend
from ratekit.clock import FakeClock
from ratekit.errors import BackendUnavailableError, CostExceedsLimitError, PoolExhaustedError
from ratekit.events import AccountOut, Admitted, Event, Settled
from ratekit.pools import Member, Served
from ratekit.testing import RedisServer

from .test_scheduler import run_clock

pytestmark = pytest.mark.anyio


class ProviderError(Exception):
    """An answer as an SDK raises it: a status, headers and a parsed body."""

    def __init__(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}")
        self.status_code = status
        self.headers = headers or {}
        self.body = {"error": {"code": code, "type": code, "message": code}}


def too_many(retry_after_s: float = 20) -> ProviderError:
    return ProviderError(429, "rate_limit_exceeded", {"retry-after": f"{retry_after_s:g}"})


def spent() -> ProviderError:
    return ProviderError(429, "insufficient_quota")


def scheduler(clock: FakeClock, provider: str = "moonshot", **limits: Any) -> Scheduler:
    numbers = {"rpm": None, "tpm": None, "tpd": None, "concurrency": None, **limits}
    return Scheduler(Account(provider, **numbers), clock=clock)


def pool_of(clock: FakeClock, rpms: dict[str, int], **options: Any) -> tuple[Pool, list[Event]]:
    events: list[Event] = []
    members = {name: scheduler(clock, rpm=rpm) for name, rpm in rpms.items()}
    return Pool(members, hooks=[events.append], **options), events


async def test_a_pool_runs_at_the_sum_of_its_accounts_limits() -> None:
    """Three accounts of 3, 2 and 1 RPM serve 6 calls a minute together, each within its
    own rate in every 60 s window, and 18 calls take three minutes."""
    clock = FakeClock()
    pool, events = pool_of(clock, {"a": 3, "b": 2, "c": 1})
    served: list[tuple[str, float]] = []
    start = clock.now()

    async def call(at: Served) -> str:
        served.append((at.account, clock.now() - start))
        return at.account

    async with anyio.create_task_group() as group:
        for _ in range(18):
            group.start_soon(pool.submit, call)
        await run_clock(clock, 200, step_s=1)
    assert len(served) == 18
    assert Counter(name for name, _ in served) == {"a": 9, "b": 6, "c": 3}
    limit = {"a": 3, "b": 2, "c": 1}
    for name, at_s in served:
        # Every 60 s window (plus the margin) holds at most the account's rpm.
        window = [t for n, t in served if n == name and at_s <= t < at_s + 60]
        assert len(window) <= limit[name]
    # Six a minute: the last six at the start of the third minute, not later.
    assert 120 <= max(t for _, t in served) < 125
    accounts = [e.account for e in events if isinstance(e, Admitted)]
    assert Counter(accounts) == {"a": 9, "b": 6, "c": 3}
    assert all(e.account is not None for e in events if isinstance(e, Settled))
    stats = pool.statistics()
    assert {name: s.admitted for name, s in stats.accounts.items()} == {"a": 9, "b": 6, "c": 3}
    assert stats.waiting == 0


async def test_accounts_are_asked_in_order_of_preference() -> None:
    """prefer="order": the first account takes every call it admits; the next only the
    overflow."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"first": 2, "second": 5})
    names = [(await pool.submit(lambda at: _name(at))) for _ in range(4)]
    assert names == ["first", "first", "second", "second"]


async def _name(at: Served) -> str:
    return at.account


async def test_the_cheapest_account_is_asked_first() -> None:
    """prefer="cheapest": the channel with the lower price (list price x discount) of the
    model takes the calls while it admits them; an account that does not price the
    model is asked last."""
    clock = FakeClock()
    full = Member(scheduler(clock, "stepfun", rpm=5))
    discounted = Member(scheduler(clock, "stepfun", rpm=5), discount=0.6)
    unpriced = Member(scheduler(clock, "moonshot", rpm=5), models={"step-3.5-flash": "kimi"})
    with pytest.raises(InvalidArgumentError, match="one currency"):
        Pool({"full": full, "cny": Member(scheduler(clock, "minimax", rpm=1))}, prefer="cheapest")
    pool = Pool({"unpriced": unpriced, "full": full, "discounted": discounted}, prefer="cheapest")
    names = [await pool.submit(_name, model="step-3.5-flash") for _ in range(12)]
    assert names == ["discounted"] * 5 + ["full"] * 5 + ["unpriced"] * 2


async def test_most_headroom_spreads_calls() -> None:
    """prefer="headroom": each call goes where the largest share of the limit is free (a
    tie to the one declared first)."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"small": 2, "large": 6}, prefer="headroom")
    names = [await pool.submit(_name) for _ in range(8)]
    # Free shares before each call: 1 = 1, 1/2 < 1, 1/2 < 5/6, 1/2 < 4/6, 1/2 = 1/2, ...
    assert names == ["small", "large", "large", "large", "small", "large", "large", "large"]


async def test_a_429_cools_only_its_account() -> None:
    """The provider answers 429 on one account: the retry goes to the other at once, and
    the one that answered takes nothing until its Retry-After has passed."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"a": 100, "b": 100})
    start = clock.now()
    answers = iter([too_many(20)])

    async def call(at: Served) -> str:
        if at.account == "a":
            error = next(answers, None)
            if error is not None:
                raise error
        return at.account

    assert await pool.submit(call) == "b"
    assert clock.now() == start  # no wait: the other account admitted at once
    assert [await pool.submit(call) for _ in range(3)] == ["b", "b", "b"]
    assert pool.statistics().accounts["a"].rate_limited == 1
    clock.advance(21)
    assert await pool.submit(call) == "a"


async def test_a_spent_quota_takes_its_account_out_until_it_recovers() -> None:
    """ "insufficient quota" on one account: the call is retried on the next one at once;
    the spent account is out for out_s (an event says so), then tried again."""
    clock = FakeClock()
    pool, events = pool_of(clock, {"a": 100, "b": 100}, out_s=600)
    spent_until = clock.now() + 300.0

    async def call(at: Served) -> str:
        if at.account == "a" and clock.now() < spent_until:
            raise spent()
        return at.account

    assert await pool.submit(call) == "b"
    out = [e for e in events if isinstance(e, AccountOut)]
    assert len(out) == 1
    assert (out[0].account, out[0].seconds) == ("a", 600)
    assert "insufficient_quota" in out[0].reason
    assert pool.statistics().accounts["a"].exhausted == 1
    assert math.isclose(pool.statistics().accounts["a"].out_for_s, 600)
    clock.advance(400)
    assert await pool.submit(call) == "b"  # still out, though its quota is back
    clock.advance(201)
    assert await pool.submit(call) == "a"


async def test_every_account_out_raises_instead_of_waiting() -> None:
    """When every account serving the model has a spent quota, the caller gets a typed
    error naming them and the provider's answer as its cause, not an endless wait."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"a": 100, "b": 100}, out_s=60)

    async def call(at: Served) -> str:
        raise spent()

    with pytest.raises(PoolExhaustedError, match="every account") as raised:
        await pool.submit(call)
    assert set(raised.value.out) == {"a", "b"}
    assert isinstance(raised.value.__cause__, ProviderError)
    assert 0 < raised.value.retry_after_s <= 60


def pods_on(clock: FakeClock, backends: dict[str, Backend], **options: Any) -> Pool:
    """A pool as one process of a fleet builds it: its own schedulers on shared stores."""
    account = Account("moonshot", rpm=100, tpm=None, tpd=None, concurrency=None)
    members = {name: Scheduler(account, backend=b, clock=clock) for name, b in backends.items()}
    return Pool(members, **options)


async def test_an_account_out_in_one_process_is_out_in_the_others() -> None:
    """Accounts taken out by one process (their quota spent) are out for every process
    sharing their stores: another pool sends its calls elsewhere, and raises at once,
    naming why, when every account is out; not a wait for a pause it cannot explain."""
    clock = FakeClock()
    backends: dict[str, Backend] = {"a": MemoryBackend(), "b": MemoryBackend()}
    first = pods_on(clock, backends, out_s=60)
    events: list[Event] = []
    second = pods_on(clock, backends, out_s=60, hooks=[events.append])

    async def spent_on_a(at: Served) -> str:
        if at.account == "a":
            raise spent()
        return at.account

    assert await first.submit(spent_on_a) == "b"
    assert await second.submit(_name) == "b"  # not a 60 s wait for "a"
    out = [e for e in events if isinstance(e, AccountOut)]
    assert [e.account for e in out] == ["a"]
    assert "another process" in out[0].reason

    async def spent_everywhere(at: Served) -> str:
        raise spent()

    with pytest.raises(PoolExhaustedError):
        await first.submit(spent_everywhere)
    with pytest.raises(PoolExhaustedError) as raised:
        await second.admit(timeout=5)
    assert set(raised.value.out) == {"a", "b"}
    assert 0 < raised.value.retry_after_s <= 60
    clock.advance(61)
    assert await second.submit(_name) == "a"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py runs on asyncio
async def test_an_account_out_is_known_through_redis(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    """The same through a real redis-server, with callers asking together (each ask a
    round trip): the second process learns from the store's refusals that the account
    is out, not merely paused, and tells its hooks once; after out_s, one of the callers
    arriving together probes the account, not each of them."""
    from ratekit.backends.redis import RedisBackend

    clock = FakeClock()
    namespace = f"pool-{uuid.uuid4().hex}"
    stores = [
        {
            name: RedisBackend(redis_server.url, namespace=f"{namespace}-{name}", server_time=False)
            for name in ("a", "b")
        }
        for _ in range(2)
    ]
    sent: list[str] = []

    async def spent_on_a(at: Served) -> str:
        sent.append(at.account)
        await anyio.sleep(0.02)
        if at.account == "a":
            raise spent()
        return at.account

    async def together(pool: Pool) -> None:
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(pool.submit, spent_on_a)

    try:
        first = pods_on(clock, dict(stores[0]), out_s=60)
        events: list[Event] = []
        second = pods_on(clock, dict(stores[1]), out_s=60, hooks=[events.append])
        assert await first.submit(spent_on_a) == "b"
        sent.clear()
        await together(second)
        assert sent == ["b"] * 8
        assert [e.account for e in events if isinstance(e, AccountOut)] == ["a"]
        assert second.statistics().accounts["a"].out_for_s > 50
        clock.advance(61)
        sent.clear()
        await together(second)
        assert sent.count("a") == 1  # one probe, refused again: out for another out_s
        assert sent.count("b") == 8
    finally:
        for backends in stores:
            for backend in backends.values():
                await backend.aclose()


async def test_an_account_back_from_out_takes_one_call_until_it_answers() -> None:
    """After out_s, one call (a probe) goes to the account; the others go elsewhere while
    it is answered. A probe refused again keeps the account out for another out_s; one
    answered brings it back in full."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"a": 100, "b": 100}, out_s=60)
    sent: list[str] = []
    quota_back = False

    async def call(at: Served) -> str:
        sent.append(at.account)
        await clock.wait(anyio.Event(), 1)
        if at.account == "a" and not quota_back:
            raise spent()
        return at.account

    async def burst() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(pool.submit, call)
            await run_clock(clock, 5, step_s=0.5)

    await burst()  # a: spent, out; its calls go to b
    assert pool.statistics().accounts["a"].out_for_s > 50
    clock.advance(61)
    sent.clear()
    await burst()
    assert sent.count("a") == 1  # the probe alone, refused again
    assert pool.statistics().accounts["a"].out_for_s > 50
    clock.advance(61)
    quota_back = True
    sent.clear()
    await burst()
    assert sent.count("a") == 1
    assert sent.count("b") == 4  # b took the others meanwhile
    sent.clear()
    await burst()
    assert sent.count("a") == 5  # back in full: first in order again


async def test_a_model_goes_only_to_the_accounts_that_serve_it() -> None:
    """Members list their models (a mapping renames them): calls of a model go only to
    the accounts serving it, under each account's own name; an unknown model is refused
    up front."""
    clock = FakeClock()
    pool = Pool(
        {
            "kimi": Member(scheduler(clock, rpm=100), models=["kimi-k2"]),
            "relay": Member(
                scheduler(clock, rpm=100),
                models={"kimi-k2": "moonshot/kimi-k2", "glm": "zhipu/glm"},
            ),
        }
    )
    seen: list[tuple[str, str | None]] = []

    async def call(at: Served) -> None:
        seen.append((at.account, at.model))

    for _ in range(2):
        await pool.submit(call, model="kimi-k2")
    await pool.submit(call, model="glm")
    assert seen == [("kimi", "kimi-k2"), ("kimi", "kimi-k2"), ("relay", "zhipu/glm")]
    with pytest.raises(InvalidArgumentError, match="no account serves model 'gpt-9'"):
        await pool.submit(call, model="gpt-9")


async def test_a_predicted_wait_beyond_the_timeout_fails_at_once() -> None:
    """Both accounts are full for a minute: a caller with a 5 s timeout is refused at
    once, naming the account and dimension; nothing is taken."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"a": 1, "b": 1})
    await pool.submit(_name)
    await pool.submit(_name)
    start = clock.now()
    with pytest.raises(AcquireTimeout, match="rpm") as raised:
        await pool.admit(timeout=5)
    assert raised.value.retry_after_s > 5
    assert clock.now() == start
    assert pool.statistics().waiting == 0


async def test_waiters_are_served_by_priority_and_in_order() -> None:
    """Callers waiting for the pool are served by priority, FIFO within one; a caller
    cancelled while waiting leaves its place and loses nothing."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"a": 1, "b": 1})
    await pool.submit(_name)
    await pool.submit(_name)
    order: list[str] = []

    async def wait_for(name: str, priority: int) -> None:
        served = await pool.admit(priority=priority)
        order.append(name)
        await pool.finish(served)

    async with anyio.create_task_group() as group:
        for name, priority in (("low1", 0), ("low2", 0), ("gone", 5), ("high", 5)):
            scope = anyio.CancelScope()
            if name == "gone":

                async def doomed(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await wait_for("gone", 5)

                group.start_soon(doomed)
                cancel = scope
            else:
                group.start_soon(wait_for, name, priority)
            await anyio.wait_all_tasks_blocked()
        cancel.cancel()
        await run_clock(clock, 130, step_s=1)
    assert order == ["high", "low1", "low2"]
    assert pool.statistics().waiting == 0


async def test_a_slot_releases_and_answers_on_its_account() -> None:
    """`slot` admits on one account and releases there when the block ends, even when the
    block raises; the member's scheduler counts the admission."""
    clock = FakeClock()
    members = {"a": scheduler(clock, rpm=10, concurrency=1), "b": scheduler(clock, concurrency=1)}
    pool = Pool(members)
    async with pool.slot(tokens=10) as first, pool.slot(tokens=10) as second:
        assert (first.account, second.account) == ("a", "b")
        with pytest.raises(AcquireTimeout):
            await pool.admit(timeout=0)
    third = pool.slot()
    with pytest.raises(RuntimeError, match="the call failed"):
        await _fail_inside(third)
    stats = await members["a"].statistics()
    assert stats.admitted == 2
    limiter = members["a"].limiter()
    assert (await limiter.statistics()).dimension("concurrency").used == 0


async def _fail_inside(slot: Any) -> None:
    async with slot as served:
        assert served.account == "a"
        raise RuntimeError("the call failed")


@pytest.mark.parametrize(
    ("members", "options", "message"),
    [
        ({}, {}, "non-empty mapping"),
        ({"a": "moonshot"}, {}, r"members\['a'\] must be a ratekit.Member"),
        ({"": None}, {}, "names must be non-empty"),
        (None, {"prefer": "fastest"}, "prefer must be one of order, cheapest, headroom"),
        (None, {"max_attempts": 0}, "max_attempts must be an int of at least 1"),
    ],
)
def test_bad_pools_are_refused_with_the_field_named(
    members: Any, options: dict[str, Any], message: str
) -> None:
    clock = FakeClock()
    if members is None:
        members = {"a": scheduler(clock, rpm=1)}
    elif "" in members:
        members = {"": scheduler(clock, rpm=1)}
    with pytest.raises(InvalidArgumentError, match=message):
        Pool(members, **options)


def test_bad_members_are_refused_with_the_field_named() -> None:
    clock = FakeClock()
    one = scheduler(clock, rpm=1)
    with pytest.raises(InvalidArgumentError, match=r"Member\.scheduler"):
        Member("moonshot")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"Member\.discount"):
        Member(one, discount=0)
    with pytest.raises(InvalidArgumentError, match=r"Member\.models"):
        Member(one, models="kimi")
    with pytest.raises(InvalidArgumentError, match="a scheduler of its own"):
        Pool({"a": one, "b": one})
    with pytest.raises(InvalidArgumentError, match="same clock"):
        Pool({"a": one, "b": scheduler(FakeClock(), rpm=1)})


async def test_each_call_is_told_once_with_the_account_that_served_it() -> None:
    """A hook given to the pool hears every call once: `Admitted` and `Settled` from the
    account's scheduler, naming the account, also when the same hook is on that
    scheduler; a scheduler cannot be an account of two pools under two names."""
    clock = FakeClock()
    events: list[Event] = []

    def hook(event: Event) -> None:
        events.append(event)

    first = Scheduler(
        Account("moonshot", rpm=1, tpm=None, tpd=None, concurrency=None), clock=clock, hooks=[hook]
    )
    second = scheduler(clock, rpm=10)
    pool = Pool({"first": first, "second": second}, hooks=[hook])
    for _ in range(3):
        await pool.submit(_name, tokens=5)
    admitted = [e.account for e in events if isinstance(e, Admitted)]
    settled = [(e.account, e.tokens) for e in events if isinstance(e, Settled)]
    assert admitted == ["first", "second", "second"]
    assert settled == [("first", 5), ("second", 5), ("second", 5)]
    with pytest.raises(InvalidArgumentError, match="account 'first' of another pool"):
        Pool({"renamed": first})
    assert Pool({"first": first}).members["first"].scheduler is first


async def test_an_account_that_refused_is_asked_again_only_when_it_can_admit() -> None:
    """An account that refused named when a call would fit: until then the pool does not
    ask it again (on Redis each ask is a round trip), unless capacity is freed there."""
    clock = FakeClock()
    pool, _ = pool_of(clock, {"small": 1, "large": 100})
    asked: Counter[str] = Counter()
    for name, member in pool.members.items():
        offer = member.scheduler.offer

        async def counted(*, name: str = name, offer: Any = offer, **kwargs: Any) -> Any:
            asked[name] += 1
            return await offer(**kwargs)

        member.scheduler.offer = counted  # type: ignore[method-assign]
    names = [await pool.submit(_name) for _ in range(6)]
    assert names == ["small"] + ["large"] * 5
    assert asked == {"small": 2, "large": 5}  # refused once, then skipped until it fits
    accounts = pool.statistics().accounts
    assert (accounts["small"].admitted, accounts["small"].refused) == (1, 1)
    assert (accounts["large"].admitted, accounts["large"].refused) == (5, 0)
    clock.advance(62)  # its window (60 s, 1 s slices, the 50 ms margin) has passed
    assert await pool.submit(_name) == "small"
    assert asked["small"] == 3


async def test_a_call_too_large_for_one_account_goes_to_another() -> None:
    """A call larger than one account's whole limit is served by an account it fits; it
    is refused (CostExceedsLimitError) only when it fits none."""
    clock = FakeClock()
    pool = Pool({"small": scheduler(clock, tpm=10_000), "big": scheduler(clock, tpm=100_000)})
    served = await pool.admit(tokens=50_000)
    assert served.account == "big"
    await pool.finish(served)
    with pytest.raises(CostExceedsLimitError):
        await pool.admit(tokens=500_000)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py runs on asyncio
async def test_an_account_whose_store_is_down_is_passed_over(anyio_backend: str) -> None:
    """An account on a Redis that cannot be reached fails only its own asks: the call goes
    to the next account; with every store down the caller waits the outage out for
    `outage_wait_s`, or until its own timeout, then gets the outage error."""
    from ratekit.backends.redis import RedisBackend

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    down = RedisBackend(url, namespace="down", outage_wait_s=0.5)
    waited = RedisBackend(url, namespace="waited")
    account = Account("moonshot", rpm=100, tpm=None, tpd=None, concurrency=None)
    try:
        pool = Pool({"down": Scheduler(account, backend=down), "up": Scheduler(account)})
        assert (await pool.submit(_name)) == "up"
        alone = Pool({"down": Scheduler(account, backend=down)})
        with anyio.fail_after(5), pytest.raises(BackendUnavailableError):
            await alone.admit()
        started = anyio.current_time()
        timed = Pool({"waited": Scheduler(account, backend=waited)})
        with anyio.fail_after(5), pytest.raises(BackendUnavailableError, match=r"within 0\.6 s"):
            await timed.admit(timeout=0.6)
        assert anyio.current_time() - started >= 0.55  # its timeout, not a forecast
    finally:
        await down.aclose()
        await waited.aclose()


async def test_a_pool_caller_is_not_stranded_behind_an_accounts_own_queue() -> None:
    """A caller of an account's own scheduler waits there and goes first; when it gives up,
    the pool's caller is admitted at the next instant the window allows, not never."""
    clock = FakeClock()
    only = scheduler(clock, rpm=1)
    pool = Pool({"only": only})
    await only.submit(_noop)  # the window's one call
    admitted: list[float] = []
    start = clock.now()

    async def through_pool() -> None:
        served = await pool.admit()
        admitted.append(clock.now() - start)
        await pool.finish(served)

    async with anyio.create_task_group() as group:
        direct = anyio.CancelScope()

        async def direct_caller() -> None:
            with direct:
                await only.submit(_noop)

        group.start_soon(direct_caller)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(through_pool)
        await anyio.wait_all_tasks_blocked()
        direct.cancel()
        await run_clock(clock, 70, step_s=0.5)
    assert len(admitted) == 1
    assert 60 <= admitted[0] <= 62


async def _noop() -> None:
    return None


def test_garbage_is_refused_with_the_argument_named() -> None:
    clock = FakeClock()
    one = scheduler(clock, rpm=1)
    with pytest.raises(InvalidArgumentError, match=r"Pool\.hooks must be callables"):
        Pool({"a": one}, hooks=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"Member\.name must be a str"):
        Member(one, name=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"Member\.models names no model"):
        Member(one, models=[])


async def test_finish_refuses_what_admit_did_not_return() -> None:
    pool, _ = pool_of(FakeClock(), {"a": 1})
    with pytest.raises(InvalidArgumentError, match=r"Pool\.finish: served must be"):
        await pool.finish("x")  # type: ignore[arg-type]
