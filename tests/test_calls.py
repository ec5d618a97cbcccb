"""Decorated call sites and threaded code, on the scheduler's async core."""

from __future__ import annotations

import contextvars
import functools
import threading
import time
import warnings
from typing import Any

import anyio
import fakeredis
import pytest

import ratekit
from ratekit import Account, Scheduler, SyncScheduler
from ratekit.backends.redis import RedisBackend
from ratekit.errors import NoEventLoopError
from ratekit.integrations import _calls, _wrap_sync
from ratekit.integrations._calls import submit_sync

from .test_scheduler import TooManyRequests, classify


def compressed(tier: str = "tier0") -> Account:
    # Moonshot Tier0 with a minute of 0.5 s: 3 requests per 0.5 s, 1 at a time.
    return Account("moonshot", tier=tier, period_scale=0.5 / 60)


@pytest.mark.anyio
async def test_a_decorated_async_function_is_admitted_with_tokens_from_its_arguments() -> None:
    """@scheduler.limit reserves the tokens its function computes from the call's arguments."""
    clock = ratekit.clock.FakeClock()
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, classify=classify)

    @scheduler.limit(tokens=lambda prompt, max_tokens: len(prompt) + max_tokens)
    async def ask(prompt: str, max_tokens: int) -> str:
        return prompt.upper()

    assert await ask("hello", max_tokens=100) == "HELLO"
    stats = await scheduler.limiter().statistics()
    assert stats.dimension("tpm").used == 105
    assert stats.dimension("rpm").used == 1


@pytest.mark.anyio
async def test_a_decorators_functions_get_the_arguments_they_name_however_passed() -> None:
    """``tokens=lambda prompt, **_:`` and ``tenant=lambda customer, **_:`` get their
    arguments by name whether the call passed them by position or by name; one left
    out comes with the decorated function's default unless the lambda has its own; a
    function naming none of them gets the call as it came."""
    clock = ratekit.clock.FakeClock()
    events: list[ratekit.Event] = []
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, hooks=[events.append])

    @scheduler.limit(
        tokens=lambda prompt, max_tokens, **_: len(prompt) + max_tokens,
        tenant=lambda customer, **_: customer,
    )
    async def answer(customer: str, prompt: str, max_tokens: int = 100, **extra: Any) -> str:
        return prompt

    @scheduler.limit(tokens=lambda prompt, max_tokens=256: len(prompt) + max_tokens)
    async def ask(prompt: str, max_tokens: int | None = None) -> str:
        return prompt

    @scheduler.limit(tokens=lambda *args, **kwargs: len(args) + len(kwargs))
    async def count(*args: Any, **kwargs: Any) -> None:
        return None

    @scheduler.limit(tokens=lambda **kwargs: kwargs.get("max_tokens", 7))
    async def given(prompt: str, max_tokens: int = 100) -> str:
        return prompt

    assert await answer("acme", "hello") == "hello"  # 105 tokens
    assert await answer("initech", "hi", 10) == "hi"  # 12
    assert await answer(prompt="hey", customer="acme", max_tokens=1, seed=7) == "hey"  # 4
    assert await ask("hello") == "hello"  # the lambda's own default: 261
    await count(1, 2, x=3)  # 3
    assert await given(prompt="hi") == "hi"  # as given: no max_tokens, 7
    assert admitted_tenants(events) == ["acme", "initech", "acme", None, None, None]
    stats = await scheduler.limiter().statistics()
    assert stats.dimension("tpm").used == 105 + 12 + 4 + 261 + 3 + 7


@pytest.mark.anyio
async def test_a_decorated_function_wrapped_by_another_decorator_is_called_as_given() -> None:
    """Under ``@scheduler.limit``, a decorator that hides a parameter (``functools.wraps``
    over a different signature): the lambda gets what the outer function is called with."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=ratekit.clock.FakeClock())

    def with_client(inner: Any) -> Any:
        @functools.wraps(inner)
        async def outer(prompt: str, **kwargs: Any) -> str:
            return str(await inner("client", prompt, **kwargs))

        return outer

    @scheduler.limit(tokens=lambda prompt, **_: len(prompt))
    @with_client
    async def complete(client: str, prompt: str) -> str:
        return f"{client}:{prompt}"

    assert await complete("hi") == "client:hi"
    assert (await scheduler.limiter().statistics()).dimension("tpm").used == 2


def test_sync_threads_share_one_scheduler() -> None:
    """Eight threads calling a decorated sync function keep to 3 requests per window."""
    with SyncScheduler(compressed(), classify=classify) as sync:
        starts: list[float] = []
        lock = threading.Lock()

        @sync.limit(tokens=10)
        def work(n: int) -> int:
            with lock:
                starts.append(time.monotonic())
            return n * n

        results: list[int] = []

        def run(n: int) -> None:
            results.append(work(n))

        threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        elapsed = time.monotonic() - began
    assert sorted(results) == [n * n for n in range(8)]
    # 8 calls at 3 per 0.5 s need two more windows after the first burst.
    assert elapsed >= 1.0
    starts.sort()
    for first, fourth in zip(starts, starts[3:], strict=False):
        assert fourth - first >= 0.5 - 0.02


def test_an_async_function_given_to_a_sync_scheduler_is_refused() -> None:
    """SyncScheduler.submit runs sync functions: an async one, or one that returns a
    coroutine, is an InvalidArgumentError (not a coroutine handed back never run), and
    the slot of the one that returned a coroutine comes back."""

    async def ask() -> str:
        return "never"

    with SyncScheduler(compressed(), classify=classify) as sync:
        with pytest.raises(ratekit.InvalidArgumentError, match=r"runs sync functions.* is async"):
            sync.submit(ask)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "coroutine was never awaited"
            with pytest.raises(ratekit.InvalidArgumentError, match="returns an awaitable"):
                sync.submit(lambda: ask())

        async def stream() -> Any:
            yield "never"

        with pytest.raises(ratekit.InvalidArgumentError, match="is async"):
            sync.submit(stream)
        # One call at a time (Tier0): the refused call's slot came back.
        assert sync.submit(lambda: 5, timeout=5) == 5
        assert sync.statistics().admitted == 2  # the one that returned a coroutine, and 5


def test_a_sync_429_is_answered_and_retried() -> None:
    """A sync call raising a 429 pauses the account and is retried until it succeeds."""
    with SyncScheduler(Account("moonshot", tier="tier1"), classify=classify) as sync:
        calls: list[float] = []

        def flaky() -> str:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise TooManyRequests(retry_after_s=0.3)
            return "ok"

        assert sync.submit(flaky) == "ok"
        assert calls[1] - calls[0] >= 0.3 - 0.02
        stats = sync._portal.call(sync.scheduler.statistics)
        assert stats.rate_limited == 1


def test_the_sync_facade_works_with_the_redis_backend() -> None:
    """A SyncScheduler builds its Redis backend in its own loop and shares the account."""
    server = fakeredis.FakeServer()

    def backend() -> RedisBackend:
        return RedisBackend(fakeredis.FakeAsyncRedis(server=server), namespace="sync-1")

    account = Account("moonshot", tier="tier1", token_counting="usage")
    with SyncScheduler(account, backend=backend, classify=classify) as sync:
        with sync.slot(tokens=50) as permit:
            permit.settle(tokens=20)
        stats = sync._portal.call(sync.scheduler.limiter().statistics)
    assert stats.dimension("tpm").used == 20


def test_sync_calls_without_a_loop_fail_clearly() -> None:
    """A plain Scheduler used from a thread before it ever ran says what to do."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"))
    with pytest.raises(NoEventLoopError, match=r"use ratekit\.SyncScheduler"):
        submit_sync(scheduler, lambda: None)


@pytest.mark.anyio
async def test_worker_threads_of_the_loop_can_use_the_async_scheduler() -> None:
    """Sync code run with anyio.to_thread reaches its loop's scheduler."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"), classify=classify)

    @scheduler.limit(tokens=7)
    def blocking(x: int) -> int:
        return x + 1

    async with scheduler.slot():  # the scheduler learns its loop
        pass
    assert await anyio.to_thread.run_sync(blocking, 41) == 42
    assert (await scheduler.limiter().statistics()).dimension("rpm").used == 2


@pytest.mark.anyio
async def test_a_sync_admitted_call_on_the_loop_thread_fails_instead_of_hanging() -> None:
    """A decorated sync function called on the event loop's own thread raises at once
    (waiting there for an admission would block the loop for good)."""
    scheduler = Scheduler(Account("moonshot", tier="tier1"), classify=classify)

    @scheduler.limit(tokens=7)
    def blocking(x: int) -> int:
        return x + 1

    async with scheduler.slot():  # the scheduler learns its loop
        pass
    with pytest.raises(NoEventLoopError, match="event loop's own thread"):
        blocking(41)  # a regression hangs: pytest-timeout ends it
    assert await anyio.to_thread.run_sync(blocking, 41) == 42


# -- tenants -------------------------------------------------------------------------------


def admitted_tenants(events: list[ratekit.Event]) -> list[str | None]:
    return [event.tenant for event in events if isinstance(event, ratekit.events.Admitted)]


@pytest.mark.anyio
async def test_a_decorator_names_the_tenant_of_each_call() -> None:
    """``limit(tenant=...)`` is a name, or a function of the call's arguments (its None:
    the tenant of the ``ratekit.tenant`` block around the call); a bad name is refused
    when the function is decorated, or at the call that computed it."""
    clock = ratekit.clock.FakeClock()
    events: list[ratekit.Event] = []
    scheduler = Scheduler(Account("moonshot", tier="tier1"), clock=clock, hooks=[events.append])

    @scheduler.limit(tokens=10, tenant=lambda customer, prompt: customer)
    async def ask(customer: str | None, prompt: str) -> str:
        return prompt

    @scheduler.limit(tenant="batch")
    async def nightly() -> None:
        return None

    await ask("acme", "hi")
    await ask(customer="initech", prompt="hi")
    with ratekit.tenant("block"):
        await ask(None, "hi")
        await nightly()
    assert admitted_tenants(events) == ["acme", "initech", "block", "batch"]
    with pytest.raises(ratekit.InvalidArgumentError, match=r"^limit\(tenant=\.\.\.\): a tenant"):
        scheduler.limit(tenant="")
    with pytest.raises(ratekit.InvalidArgumentError, match=r"limit\(tenant=\.\.\.\).* got 3$"):
        await ask(3, "hi")  # type: ignore[arg-type]
    assert len(admitted_tenants(events)) == 4


# How a sync call's hops to the scheduler's loop carry the calling thread's context: as
# anyio's portal does (it copies it, today), or not at all (ratekit must then carry the
# tenant itself).
PORTALS = ["context copied", "context dropped"]


def portal(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every hop of a sync call to the scheduler's loop carry the calling thread's
    context (`kind` "context copied", as anyio's portal does) or none ("context dropped")."""
    if kind == "context copied":
        return
    hop = _calls.on_loop

    def without_context(*args: Any, **kwargs: Any) -> Any:
        return contextvars.Context().run(hop, *args, **kwargs)

    monkeypatch.setattr(_calls, "on_loop", without_context)
    monkeypatch.setattr(_wrap_sync, "on_loop", without_context)


@pytest.mark.parametrize("kind", PORTALS)
def test_a_sync_call_is_admitted_as_the_tenant_of_its_thread(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submit, slot and a decorated function of a SyncScheduler take ``tenant=``; without
    it, the ``ratekit.tenant`` block of the calling thread reaches the admission made on
    the scheduler's loop (another thread), whether or not the hop there carries the
    thread's context, and each thread keeps its own."""
    portal(kind, monkeypatch)
    events: list[ratekit.Event] = []
    with SyncScheduler(Account("moonshot", tier="tier1"), hooks=[events.append]) as sync:

        @sync.limit(tenant=lambda customer: customer)
        def per_customer(customer: str | None) -> None:
            return None

        @sync.limit()
        def plain() -> None:
            return None

        seen: dict[str, list[str | None]] = {}

        def work(name: str) -> None:
            with ratekit.tenant(name):
                before = len(admitted_tenants(events))
                sync.submit(lambda: None)
                with sync.slot():
                    pass
                plain()
                per_customer(None)
                seen[name] = admitted_tenants(events)[before:]

        for name in ("acme", "initech"):
            thread = threading.Thread(target=work, args=(name,))
            thread.start()
            thread.join(timeout=30)
        assert seen == {"acme": ["acme"] * 4, "initech": ["initech"] * 4}
        with ratekit.tenant("block"):
            sync.submit(lambda: None, tenant="gold")
            with sync.slot(tenant="gold"):
                pass
            per_customer("gold")
        plain()
    assert admitted_tenants(events)[-4:] == ["gold", "gold", "gold", None]
