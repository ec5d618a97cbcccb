"""The Limiter on a fake clock: waits, order, deadlines, settle, release, run-time limits."""

from __future__ import annotations

import gc
import warnings

import anyio
import anyio.lowlevel
import pytest

import ratekit
from ratekit import Limiter, Limits, TokenCounting
from ratekit.clock import FakeClock

pytestmark = pytest.mark.anyio


def make(limits: Limits) -> tuple[Limiter, FakeClock]:
    clock = FakeClock()
    return Limiter(limits, clock=clock), clock


async def settle_tasks() -> None:
    await anyio.wait_all_tasks_blocked()


class Recorder:
    """Starts acquires in tasks and records, per name, the fake time of admission."""

    def __init__(self, limiter: Limiter, clock: FakeClock, group: anyio.abc.TaskGroup) -> None:
        self.limiter = limiter
        self.clock = clock
        self.group = group
        self.admitted: dict[str, float] = {}
        self.order: list[str] = []
        self.permits: dict[str, ratekit.Admission] = {}

    async def start(self, name: str, **demand: float) -> None:
        """Start an acquire and let it run until it is admitted or waits (trio starts
        tasks in random order, so each one is started on its own)."""

        async def run() -> None:
            permit = await self.limiter.acquire(**demand)  # type: ignore[arg-type]
            self.admitted[name] = self.clock.now()
            self.order.append(name)
            self.permits[name] = permit

        self.group.start_soon(run)
        await settle_tasks()


async def test_acquire_waits_exactly_until_the_oldest_slice_expires() -> None:
    """A full rpm window admits the next call at the instant its oldest slice stops counting."""
    limiter, clock = make(Limits(rpm=2))
    start = clock.now()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        for name in "abc":
            await rec.start(name)
        await settle_tasks()
        assert sorted(rec.admitted) == ["a", "b"]
        clock.advance(60.999)
        await settle_tasks()
        assert "c" not in rec.admitted
        clock.advance(0.001)
        await settle_tasks()
    assert rec.admitted["c"] - start == pytest.approx(61.0)


async def test_waiters_are_served_first_come_first_served() -> None:
    """A large demand at the head is not overtaken by small ones that would fit sooner."""
    limiter, clock = make(Limits(tpm=100, token_counting=TokenCounting.RESERVE))
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("first", tokens=60)
        await settle_tasks()
        await rec.start("big", tokens=90)
        await settle_tasks()
        await rec.start("small", tokens=10)
        await settle_tasks()
        # "small" would fit now (60 + 10 <= 100) but waits behind "big".
        assert rec.order == ["first"]
        clock.advance(61.0)
        await settle_tasks()
        assert rec.order == ["first", "big", "small"]


async def test_try_acquire_never_waits() -> None:
    """try_acquire grants a permit when every dimension admits now, and None otherwise."""
    limiter, _ = make(Limits(concurrency=1, rpm=10))
    permit = await limiter.try_acquire()
    assert permit is not None
    assert await limiter.try_acquire() is None
    await permit.release()
    second = await limiter.try_acquire()
    assert second is not None
    await second.release()


async def test_timeout_fails_at_once_when_the_predicted_wait_is_longer() -> None:
    """A deadline shorter than the wait hint raises AcquireTimeout without waiting it out."""
    limiter, _clock = make(Limits(rpm=1))
    await (await limiter.acquire()).release()
    with pytest.raises(ratekit.AcquireTimeout) as caught:
        await limiter.acquire(timeout=30)
    assert str(caught.value) == "no permit within 30 s: rpm frees up in 61.000 s"
    assert caught.value.retry_after_s == pytest.approx(61.0)
    assert (await limiter.statistics()).waiting == 0


async def test_timeout_within_the_hint_waits_and_succeeds() -> None:
    """A deadline longer than the wait hint waits and is admitted at the hint."""
    limiter, clock = make(Limits(rpm=1))
    await (await limiter.acquire()).release()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("late", timeout=120)
        await settle_tasks()
        clock.advance(61)
    assert rec.order == ["late"]


async def test_timeout_on_concurrency_ends_at_the_deadline() -> None:
    """With no hint (only a release can help), the caller waits until its deadline, then fails."""
    limiter, clock = make(Limits(concurrency=1))
    held = await limiter.acquire()
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await limiter.acquire(timeout=5)
        except ratekit.AcquireTimeout as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(waiter)
        await settle_tasks()
        clock.advance(4.9)
        await settle_tasks()
        assert outcome == []
        clock.advance(0.1)
    assert str(outcome[0]) == (
        "no permit within 5 s: concurrency frees up only when a call in flight ends"
    )
    await held.release()


async def test_a_released_slot_wakes_the_waiter_without_time_passing() -> None:
    """The head of the queue is woken by a release, not by polling."""
    limiter, clock = make(Limits(concurrency=1))
    held = await limiter.acquire()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("next")
        await settle_tasks()
        assert clock.pending_timers == 0  # no timer armed while only a release can help
        await held.release()
        await settle_tasks()
        assert rec.order == ["next"]
    await rec.permits["next"].release()


async def test_a_waiter_on_a_rate_arms_exactly_one_timer() -> None:
    """Many callers waiting on a rate arm one timer (the head's), not one each."""
    limiter, clock = make(Limits(rpm=1))
    await (await limiter.acquire()).release()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        for index in range(50):
            await rec.start(f"w{index}")
        await settle_tasks()
        assert clock.pending_timers == 1
        assert (await limiter.statistics()).waiting == 50
        group.cancel_scope.cancel()
    assert (await limiter.statistics()).waiting == 0


async def test_settle_replaces_the_estimate_in_usage_mode() -> None:
    """Settled tokens replace the reservation: the window then holds the real usage."""
    limiter, _ = make(Limits(concurrency=4, tpm=1000, token_counting=TokenCounting.USAGE))
    async with limiter.acquire(tokens=800) as permit:
        stats = await limiter.statistics()
        assert stats.dimension("tpm").in_flight == 800
        assert stats.dimension("concurrency").used == 1
        permit.settle(tokens=120)
    stats = await limiter.statistics()
    assert stats.dimension("tpm").used == 120
    assert stats.dimension("tpm").in_flight == 0
    assert stats.dimension("concurrency").used == 0


async def test_a_block_left_without_settle_counts_the_estimate() -> None:
    """An unsettled permit (the call raised) counts its estimate, the conservative choice."""
    limiter, _ = make(Limits(concurrency=2, tpm=1000, token_counting=TokenCounting.USAGE))
    with pytest.raises(RuntimeError, match="provider broke"):
        async with limiter.acquire(tokens=300):
            raise RuntimeError("provider broke")
    stats = await limiter.statistics()
    assert stats.dimension("tpm").used == 300
    assert stats.dimension("concurrency").used == 0


async def test_refund_hands_everything_back() -> None:
    """A refunded permit returns its request, tokens and slot, once."""
    limiter, _ = make(Limits(concurrency=1, rpm=5, tpm=1000, token_counting=TokenCounting.RESERVE))
    permit = await limiter.acquire(tokens=400)
    await permit.refund()
    await permit.release()  # a second release does nothing
    stats = await limiter.statistics()
    assert [(d.name, d.used) for d in stats.dimensions] == [
        ("concurrency", 0),
        ("rpm", 0),
        ("tpm", 0),
    ]


async def test_cancellation_inside_the_block_releases_the_slot_once() -> None:
    """A task cancelled during its call frees its slot exactly once."""
    limiter, _clock = make(Limits(concurrency=1, rpm=100))
    async with anyio.create_task_group() as group:

        async def call() -> None:
            async with limiter.acquire():
                await anyio.sleep_forever()

        group.start_soon(call)
        await settle_tasks()
        assert (await limiter.statistics()).dimension("concurrency").used == 1
        group.cancel_scope.cancel()
    stats = await limiter.statistics()
    assert stats.dimension("concurrency").used == 0
    assert stats.dimension("rpm").used == 1


async def test_raising_the_limits_admits_waiters_and_keeps_usage() -> None:
    """A tier upgrade at run time wakes the queue; usage so far counts against the new numbers."""
    limiter, clock = make(Limits(rpm=2))
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        for name in "abcde":
            await rec.start(name)
        await settle_tasks()
        assert rec.order == ["a", "b"]
        limiter.limits = Limits(rpm=4)
        await settle_tasks()
        # Only two more fit under 4: "e" waits until slice 0 stops counting.
        assert rec.order == ["a", "b", "c", "d"]
        clock.advance(61)
    assert rec.order == ["a", "b", "c", "d", "e"]


async def test_lowering_the_limits_below_a_queued_demand_fails_it() -> None:
    """A waiter whose demand no longer fits the new limits gets CostExceedsLimitError."""
    limiter, _clock = make(Limits(tpm=1000, token_counting=TokenCounting.RESERVE))
    await (await limiter.acquire(tokens=1000)).release()
    errors: list[BaseException] = []

    async def big() -> None:
        try:
            await limiter.acquire(tokens=800)
        except ratekit.CostExceedsLimitError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(big)
        await settle_tasks()
        limiter.limits = Limits(tpm=500, token_counting=TokenCounting.RESERVE)
    assert str(errors[0]) == "tpm: a cost of 800 can never be admitted, the whole limit is 500"


async def test_amounts_asked_before_are_checked_again_under_new_limits() -> None:
    """The amounts of the last call, admitted before a downgrade, now exceed the whole rate:
    the next acquire of the same amounts refuses them instead of reusing the old check."""
    limiter, clock = make(Limits(tpm=1000, token_counting=TokenCounting.RESERVE))
    async with limiter.acquire(tokens=800):
        pass
    limiter.limits = Limits(tpm=500, token_counting=TokenCounting.RESERVE)
    clock.advance(61)
    with pytest.raises(ratekit.CostExceedsLimitError, match="the whole limit is 500"):
        limiter.acquire(tokens=800)
    # And bools never pass for the ones they equal, repeated or not.
    async with limiter.acquire(1):
        pass
    with pytest.raises(ratekit.errors.InvalidCostError, match="requests must be a number"):
        limiter.acquire(True)


@pytest.mark.parametrize("fresh", [True, False])
async def test_no_amounts_pass_for_the_ones_of_no_call_yet(fresh: bool) -> None:
    """Before its first call, and again after its limits changed, a limiter has no last
    amounts to compare with: whatever amounts come are checked, negative ones too."""
    limiter, _clock = make(Limits(rpm=2, tpm=100))
    if not fresh:
        async with limiter.acquire(tokens=10):
            pass
        limiter.limits = Limits(rpm=2, tpm=100)
    for requests, tokens, cost in [(-1, -1, -1), (-1.0, -1.0, -1.0), (0, -1, 0)]:
        with pytest.raises(ratekit.errors.InvalidCostError, match="must be non-negative"):
            limiter.acquire(requests, tokens=tokens, cost=cost)


async def test_statistics_are_a_frozen_snapshot() -> None:
    """Statistics do not change after they were taken and cannot be modified."""
    limiter, _ = make(Limits(concurrency=3, rpm=10, tpm=1000, tpd=10_000))
    stats = await limiter.statistics()
    async with limiter.acquire(tokens=10):
        pass
    assert [d.name for d in stats.dimensions] == ["concurrency", "rpm", "tpm", "tpd"]
    assert all(d.used == 0 for d in stats.dimensions)
    with pytest.raises(AttributeError):
        stats.waiting = 3  # type: ignore[misc]
    with pytest.raises(KeyError, match="no dimension 'rph'; known: concurrency, rpm, tpm, tpd"):
        stats.dimension("rph")


async def test_unlimited_limits_admit_everything() -> None:
    """Limits with no rate and no cap never refuse."""
    limiter, _ = make(Limits())
    for _ in range(1000):
        async with limiter.acquire(tokens=10**9):
            pass
    assert (await limiter.statistics()).dimensions == ()


async def test_compressed_limits_keep_the_ratio() -> None:
    """Limits compressed 60 times admit a minute's worth per second."""
    limiter, clock = make(Limits(rpm=3).compressed(60))
    for _ in range(3):
        await (await limiter.acquire()).release()
    assert await limiter.try_acquire() is None
    clock.advance(1.0 + 1.0 / 60)
    assert await limiter.try_acquire() is not None


async def test_timeout_is_validated() -> None:
    """A negative timeout is a typed error naming it."""
    limiter, _ = make(Limits(rpm=3))
    with pytest.raises(
        ratekit.errors.InvalidArgumentError, match=r"^timeout must be non-negative, got -1$"
    ):
        await limiter.acquire(timeout=-1)
    with pytest.raises(ratekit.errors.InvalidArgumentError, match=r"^timeout must be a number"):
        await limiter.acquire(timeout="x")  # type: ignore[arg-type]


async def test_an_admission_granted_by_try_acquire_is_ended_by_its_block() -> None:
    """``async with`` an admission already granted (by `try_acquire`, or awaited) holds it
    for the block and ends it there, as the docs say."""
    limiter, _ = make(Limits(rpm=3, concurrency=1))
    admission = await limiter.try_acquire()
    assert admission is not None
    async with admission as held:
        assert held is admission
        assert held.granted
        assert (await limiter.statistics()).dimension("concurrency").in_flight == 1
    assert not admission.granted
    assert (await limiter.statistics()).dimension("concurrency").in_flight == 0
    with pytest.raises(ratekit.errors.PermitError):
        async with admission:  # ended: not a second time
            pass
    offered = await limiter.try_acquire()
    assert offered is not None
    async with offered:
        with pytest.raises(ratekit.errors.PermitError):
            async with offered:  # nested: one block holds it
                pass
    assert (await limiter.statistics()).dimension("concurrency").in_flight == 0


async def test_one_admission_entered_by_two_tasks_is_a_permit_error() -> None:
    """The same `acquire()` object entered by a second task (or nested) is refused, never
    a second caller on the first one's grant; an awaited admission is ended by
    `release()`, not by a block."""
    limiter, _ = make(Limits(rpm=100, concurrency=2))
    shared = limiter.acquire()
    async with shared:
        with pytest.raises(ratekit.errors.PermitError):
            async with shared:
                pass
        errors: list[BaseException] = []

        async def other() -> None:
            try:
                async with shared:
                    pass
            except ratekit.errors.PermitError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(other)
        assert len(errors) == 1
        assert (await limiter.statistics()).dimension("concurrency").in_flight == 1
    awaited = await limiter.acquire()
    with pytest.raises(ratekit.errors.PermitError):
        async with awaited:
            pass
    await awaited.release()
    assert (await limiter.statistics()).dimension("concurrency").in_flight == 0


async def test_permit_misuse_is_a_typed_error() -> None:
    """Settling twice, after the end, or before the grant raises PermitError."""
    limiter, _ = make(Limits(rpm=3))
    with pytest.raises(ratekit.errors.PermitError, match="needs a granted admission"):
        limiter.acquire().settle(tokens=1)
    async with limiter.acquire() as permit:
        permit.settle(tokens=1)
        with pytest.raises(ratekit.errors.PermitError, match="already settled"):
            permit.settle(tokens=2)
        with pytest.raises(ratekit.errors.PermitError, match="cannot be refunded"):
            await permit.refund()
    with pytest.raises(ratekit.errors.PermitError, match="that has not ended"):
        permit.settle(tokens=1)


async def test_a_queued_caller_fails_at_once_when_the_head_is_later_than_its_deadline() -> None:
    """Behind a head predicted to wait 61 s, a caller with 5 s to spare fails at once."""
    limiter, clock = make(Limits(rpm=1))
    await (await limiter.acquire()).release()
    async with anyio.create_task_group() as group:
        rec = Recorder(limiter, clock, group)
        await rec.start("head")
        with pytest.raises(ratekit.AcquireTimeout) as caught:
            await limiter.acquire(timeout=5)
        assert str(caught.value) == (
            "no permit within 5 s: the caller ahead in the queue is admitted in 61.000 s"
        )
        clock.advance(61)
    assert rec.order == ["head"]


async def test_a_used_permit_cannot_be_entered_again() -> None:
    """Re-entering a released permit is an error, not an unlimited call."""
    limiter, _ = make(Limits(rpm=1))
    permit = limiter.acquire()
    async with permit:
        pass
    with pytest.raises(ratekit.errors.PermitError, match=r"already used; call limiter\.acquire"):
        async with permit:
            pass
    assert (await limiter.statistics()).dimension("rpm").used == 1


async def test_releasing_a_permit_never_acquired_is_an_error() -> None:
    """release() and refund() of a permit that was never granted raise PermitError."""
    limiter, _ = make(Limits(rpm=1))
    with pytest.raises(ratekit.errors.PermitError, match="has not been acquired"):
        await limiter.acquire().release()
    with pytest.raises(ratekit.errors.PermitError, match="has not been acquired"):
        await limiter.acquire().refund()


async def test_a_dropped_permit_gives_its_slot_back_with_a_warning() -> None:
    """A granted admission dropped without release warns, and its own limiter's loop (not
    the garbage collector) gives its slot back at the next tick."""
    limiter, _ = make(Limits(concurrency=1, tpm=1000, token_counting=TokenCounting.USAGE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()  # permits other tests dropped are not this test's business
    permit = await limiter.acquire(tokens=600)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del permit
        gc.collect()
    assert [w.category for w in caught] == [ResourceWarning]
    assert "dropped without release" in str(caught[0].message)
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()
    stats = await limiter.statistics()
    assert stats.dimension("concurrency").used == 0
    assert stats.dimension("tpm").in_flight == 0
    assert stats.dimension("tpm").used == 600  # counted as sent: the estimate


def test_the_limiter_is_the_one_clock_owner() -> None:
    """The memory backend reads no clock: time comes only from the limiter's clock."""
    with pytest.raises(TypeError):
        ratekit.MemoryBackend(clock=FakeClock())  # type: ignore[call-arg]
    clock = FakeClock()
    limiter = Limiter(Limits(rpm=1), clock=clock, backend=ratekit.MemoryBackend())
    assert limiter.clock is clock
    assert limiter.instant() == (clock.now(), clock.wall())


async def test_a_concurrency_cap_held_for_a_minute_while_callers_wait_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every slot taken by admissions nobody ends while a caller waits: after a minute the
    limiter says so (an admission that is never ended is the usual cause), once a minute."""
    clock = ratekit.clock.FakeClock()
    limiter = ratekit.Limiter(ratekit.Limits(concurrency=1), clock=clock)
    held = await limiter.acquire()
    async with anyio.create_task_group() as group:

        async def waiter() -> None:
            async with limiter.acquire():
                pass

        group.start_soon(waiter)
        for _ in range(130):
            await anyio.wait_all_tasks_blocked()
            clock.advance(1)
            limiter._on_change()  # a release notice that frees nothing: the head tries again
        warnings = [r.getMessage() for r in caplog.records if "concurrency slot" in r.getMessage()]
        assert len(warnings) == 2
        assert "has been taken for 60 s while 1 call(s) wait" in warnings[0]
        await held.release()


def test_an_uncontended_acquire_from_a_second_running_loop_is_refused() -> None:
    """A limiter used in one running loop refuses another thread's loop on every path,
    the uncontended one included (nothing waits there), and goes on working in its
    own; once its loop is closed, the next one takes it over."""
    import asyncio
    import threading

    limiter = Limiter(Limits(rpm=1000))
    first_in = threading.Event()
    second_done = threading.Event()
    results: dict[str, object] = {}

    def first() -> None:
        async def run() -> None:
            async with limiter.acquire():
                pass
            first_in.set()
            await asyncio.to_thread(second_done.wait, 10)
            async with limiter.acquire() as admission:
                results["first"] = admission.granted

        asyncio.run(run())

    def second() -> None:
        first_in.wait(10)

        async def run() -> None:
            async with limiter.acquire():
                pass

        try:
            asyncio.run(run())
        except ratekit.errors.WrongEventLoopError as exc:
            results["second"] = exc
        finally:
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert isinstance(results["second"], ratekit.errors.WrongEventLoopError)
    assert results["first"] is True

    async def third() -> bool:
        async with limiter.acquire() as admission:
            return admission.granted

    assert asyncio.run(third()) is True  # the first loop is closed: handed over


def test_a_loop_replaced_in_the_same_thread_takes_the_limiter_over() -> None:
    """Two `asyncio.run` in one thread: the second loop takes the limiter over on the
    uncontended path too, so that an admission dropped there is handed back on the loop
    that runs (the first one is closed and would never run it)."""
    import asyncio

    limiter = Limiter(Limits(concurrency=1))

    async def once() -> None:
        async with limiter.acquire():
            pass

    asyncio.run(once())

    async def drop_one() -> int:
        admission = await limiter.acquire()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del admission
            gc.collect()
        await asyncio.sleep(0)  # the hand-back runs on this loop's next turn
        async with limiter.acquire(timeout=1):
            pass
        return (await limiter.statistics()).dimension("concurrency").in_flight

    assert asyncio.run(drop_one()) == 0


def test_a_finished_trio_run_hands_the_limiter_over_to_the_next() -> None:
    import threading

    import trio

    limiter = Limiter(Limits(rpm=100))

    async def once() -> bool:
        async with limiter.acquire() as admission:
            return admission.granted

    assert trio.run(once)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(trio.run(once)))
    thread.start()
    thread.join(10)
    assert results == [True]
