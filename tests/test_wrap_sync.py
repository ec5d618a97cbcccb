"""Wrapped sync clients (``openai.OpenAI``, ``anthropic.Anthropic``) called from threads,
on a `SyncScheduler`, over HTTP to the strict local provider (served from a thread of
this process), with the account in memory or on a real redis-server."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from anyio.from_thread import start_blocking_portal

import ratekit
from ratekit import Account, Limits
from ratekit.testing.mock_provider import MockProvider

from .test_calls import PORTALS, portal

SPEED = 60  # a minute of the provider's limits lasts a second
LIMITS = Limits(concurrency=8, rpm=120, tpm=60_000)
MESSAGES = [{"role": "user", "content": "hello world!"}]
THREADS = 16


@pytest.fixture(scope="module")
def server() -> Iterator[MockProvider]:
    """The strict provider, on an event loop in a thread of its own."""
    with start_blocking_portal() as loop:
        provider = MockProvider(LIMITS, speed=SPEED, completion_tokens=8, latency_s=0.6)
        loop.call(provider.start)
        try:
            yield provider
        finally:
            loop.call(provider.close)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Callable[[], Any] | None:
    """How the SyncScheduler builds its backend (None: in memory)."""
    if request.param == "memory":
        return None
    url = request.getfixturevalue("redis_server").url

    def build() -> Any:
        from ratekit.backends.redis import RedisBackend

        return RedisBackend(url, namespace=f"sync-{uuid.uuid4().hex}")

    return build


def scheduler(backend: Callable[[], Any] | None, **options: Any) -> ratekit.SyncScheduler:
    account = Account(
        "moonshot",
        tier="tier1",
        concurrency=LIMITS.concurrency,
        rpm=LIMITS.rpm,
        tpm=LIMITS.tpm,
        period_scale=1 / SPEED,
        margin_s=0.15,
        pacing=True,
    )
    return ratekit.SyncScheduler(account, backend=backend, **options)


def clients(server: MockProvider, sync: ratekit.SyncScheduler) -> tuple[Any, Any]:
    """Both SDKs' sync clients as a user builds them (their own retries on), wrapped."""
    chat = openai.OpenAI(base_url=server.base_url, api_key="test")
    messages = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test")
    return ratekit.wrap(chat, sync), ratekit.wrap(messages, sync)


def in_flight(sync: ratekit.SyncScheduler) -> float:
    stats = sync._portal.call(sync.scheduler.limiter().statistics)
    return stats.dimension("concurrency").used


def run_threads(work: Callable[[int], None]) -> list[str]:
    """Run `work(i)` in each of the threads; what each that died raised (its repr only:
    the exception's traceback would keep the frames it left, and what they hold, alive)."""
    errors: list[str] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    return errors


def test_sixteen_threads_share_one_account_with_no_429(
    server: MockProvider, backend: Callable[[], Any] | None
) -> None:
    """16 threads, each calling both SDKs plain and streamed (the stream helper too):
    every call served, no 429 from a provider enforcing the tier exactly, no slot left."""
    before = server.statistics()
    with scheduler(backend) as sync:
        chat, messages = clients(server, sync)

        def work(index: int) -> None:
            for _ in range(2):
                answer = chat.chat.completions.create(
                    model="kimi-k2", messages=MESSAGES, max_tokens=16
                )
                assert answer.usage.total_tokens == 11
                chunks = list(
                    chat.chat.completions.create(
                        model="kimi-k2", messages=MESSAGES, max_tokens=16, stream=True
                    )
                )
                assert all(chunk.choices for chunk in chunks)  # no usage chunk it did not ask for
                message = messages.messages.create(
                    model="kimi-k2", max_tokens=16, messages=MESSAGES
                )
                assert message.usage.output_tokens == 8
                with messages.messages.stream(
                    model="kimi-k2", max_tokens=16, messages=MESSAGES
                ) as stream:
                    assert stream.get_final_message().usage.output_tokens == 8

        assert run_threads(work) == []
        stats = sync._portal.call(sync.scheduler.statistics)
        assert stats.admitted == THREADS * 8
        assert stats.rate_limited == 0
        assert in_flight(sync) == 0
    after = server.statistics()
    assert after.rejected == before.rejected
    assert after.served - before.served == THREADS * 8
    assert after.max_concurrency <= LIMITS.concurrency


def test_a_thread_that_dies_mid_call_leaks_nothing(
    server: MockProvider, backend: Callable[[], Any] | None
) -> None:
    """Threads that raise while reading a stream (and drop it unclosed), or between
    the chunks of a stream helper, give every slot back."""
    with scheduler(backend) as sync:
        chat, messages = clients(server, sync)

        def work(index: int) -> None:
            if index % 2:
                stream = chat.chat.completions.create(
                    model="kimi-k2", messages=MESSAGES, max_tokens=16, stream=True
                )
                next(iter(stream))
                raise RuntimeError("died reading a stream")
            with messages.messages.stream(
                model="kimi-k2", max_tokens=16, messages=MESSAGES
            ) as helper:
                next(iter(helper))
                raise RuntimeError("died inside the stream helper")

        with pytest.warns(ResourceWarning, match="dropped without release"):  # noqa: PT031
            errors = run_threads(work)
            gc.collect()
        assert len(errors) == THREADS
        assert all(error.startswith("RuntimeError('died") for error in errors)
        sync._portal.call(_checkpoints)  # the hand-backs run on the scheduler's loop
        assert in_flight(sync) == 0
        assert sync._portal.call(sync.scheduler.statistics).admitted == THREADS


async def _checkpoints() -> None:
    import anyio

    for _ in range(10):
        await anyio.sleep(0.01)


def test_an_async_client_with_a_sync_scheduler_is_refused(server: MockProvider) -> None:
    with scheduler(None) as sync:
        with pytest.raises(ratekit.InvalidArgumentError, match="async client"):
            ratekit.wrap(openai.AsyncOpenAI(base_url=server.base_url, api_key="t"), sync)
        scheduler_ = sync.scheduler
        with pytest.raises(ratekit.InvalidArgumentError, match="sync client"):
            ratekit.wrap(openai.OpenAI(base_url=server.base_url, api_key="t"), scheduler_)


def test_calls_after_close_are_a_typed_error(server: MockProvider) -> None:
    """A SyncScheduler closed: its decorated functions, slots and wrapped clients raise
    NoEventLoopError saying so; closing again does nothing."""
    sync = scheduler(None)
    chat, messages = clients(server, sync)
    sync.close()
    sync.close()
    with pytest.raises(ratekit.errors.NoEventLoopError, match="SyncScheduler is closed"):
        chat.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=4)
    with pytest.raises(ratekit.errors.NoEventLoopError, match="SyncScheduler is closed"):
        messages.messages.create(model="kimi-k2", max_tokens=4, messages=MESSAGES)
    with pytest.raises(ratekit.errors.NoEventLoopError, match="SyncScheduler is closed"):
        sync.submit(lambda: None)


def test_a_sync_client_without_an_http_client_is_told_by_its_methods() -> None:
    """A hand-made sync client (no ``_client``, no ``post``): its create is called in the
    thread, admitted through the SyncScheduler."""
    from types import SimpleNamespace

    seen: list[dict[str, Any]] = []

    def create(**params: Any) -> Any:
        seen.append(params)
        return SimpleNamespace(usage={"prompt_tokens": 3, "completion_tokens": 2})

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    with scheduler(None) as sync:
        wrapped = ratekit.wrap(client, sync)
        wrapped.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=4)
        assert sync.statistics().admitted == 1
    assert seen == [{"model": "kimi-k2", "messages": MESSAGES, "max_tokens": 4}]


def test_closing_while_threads_call_ends_each_call_cleanly(server: MockProvider) -> None:
    """close() while 16 threads call (most waiting for one of 8 slots): each call either
    returns or raises NoEventLoopError; no thread hangs or dies of a cancellation."""
    sync = scheduler(None)
    chat, _ = clients(server, sync)
    outcomes: list[str] = []

    def work(index: int) -> None:
        for _ in range(200):
            try:
                chat.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=4)
            except ratekit.errors.NoEventLoopError:
                outcomes.append("closed")
                return
        outcomes.append("done")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    time.sleep(0.8)
    sync.close()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    assert len(outcomes) == THREADS  # every thread ended by returning or NoEventLoopError
    assert "closed" in outcomes


@pytest.mark.parametrize("kind", PORTALS)
def test_a_sync_call_takes_the_tenant_of_its_own_thread(
    server: MockProvider, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``ratekit.tenant`` block in the calling thread names the tenant of the calls made
    in it, though each is planned and admitted on the scheduler's loop, in another thread
    (whether or not the hop there carries the thread's context); ``ratekit_tenant=``
    wins, and neither is sent."""
    portal(kind, monkeypatch)
    events: list[ratekit.Event] = []
    with scheduler(None, hooks=[events.append]) as sync:
        chat, messages = clients(server, sync)

        def work(index: int) -> None:
            with ratekit.tenant(f"t{index}"):
                chat.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=4)
                messages.messages.create(model="kimi-k2", max_tokens=4, messages=MESSAGES)
                with messages.messages.stream(
                    model="kimi-k2", max_tokens=4, messages=MESSAGES
                ) as stream:
                    stream.get_final_message()
                chat.chat.completions.create(
                    model="kimi-k2", messages=MESSAGES, max_tokens=4, ratekit_tenant="gold"
                )

        assert run_threads(work) == []
    admitted = Counter(e.tenant for e in events if isinstance(e, ratekit.events.Admitted))
    assert admitted == {**{f"t{index}": 3 for index in range(THREADS)}, "gold": THREADS}


def test_a_call_that_reaches_the_loop_as_it_stops_ends_with_a_typed_error() -> None:
    """A hop onto the loop that lands while close() is stopping it (after the calls that
    waited there were cancelled) raises NoEventLoopError: it does not wait forever for a
    loop that will never run it. Forced: one thread holds the only slot, a second one's
    hop waits behind the busy loop while close() begins, a third calls while the loop
    shuts down (an async generator left open on it says when)."""
    sync = ratekit.SyncScheduler(Account("moonshot", tier="tier1", concurrency=1))
    assert sync.scheduler.loop_token is not None
    loop: Any = sync.scheduler.loop_token.native_token
    ended: dict[str, str] = {}
    submitted: dict[str, threading.Event] = {}  # set once the thread's hop is queued, or it ended
    threads: dict[str, threading.Thread] = {}
    hop_to_loop = loop.call_soon_threadsafe

    def spied_hop(*args: Any, **kwargs: Any) -> Any:
        handle = hop_to_loop(*args, **kwargs)
        name = threading.current_thread().name
        if name in submitted:
            submitted[name].set()
        return handle

    loop.call_soon_threadsafe = spied_hop  # says when a thread's hop is on the loop's queue

    def call(name: str, fn: Callable[[], None] = lambda: None, after: Any = None) -> None:
        def run() -> None:
            if after is not None:
                assert after.wait(10)
            try:
                sync.submit(fn)
                ended[name] = "returned"
            except BaseException as error:
                ended[name] = type(error).__name__
            submitted[name].set()

        submitted[name] = threading.Event()
        threads[name] = threading.Thread(target=run, name=name, daemon=True)
        threads[name].start()

    holding, release, stopping = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    call("holder", hold)  # takes the only slot and keeps it
    assert holding.wait(5)

    async def open_until_shutdown() -> Any:
        try:
            yield
        finally:  # on the loop, as it shuts down: let the late call hop on, and wait for it
            stopping.set()
            submitted["late"].wait(5)

    left_open = open_until_shutdown()
    sync._portal.call(left_open.__anext__)
    call("late", after=stopping)

    gate = threading.Event()
    loop.call_soon_threadsafe(gate.wait, 10)  # the loop busy: the next hop waits its turn
    call("waiter")  # will wait for the slot
    assert submitted["waiter"].wait(5)
    closer = threading.Thread(target=sync.close, daemon=True)
    closer.start()
    for _ in range(500):
        if sync.scheduler.sync_closed:
            break
        time.sleep(0.01)
    gate.set()

    threads["late"].join(timeout=10)
    release.set()
    for thread in [*threads.values(), closer]:
        thread.join(timeout=10)
    assert not threads["late"].is_alive(), "a call made as the loop stopped hangs"
    assert not any(thread.is_alive() for thread in [*threads.values(), closer])
    assert ended == {
        "holder": "NoEventLoopError",
        "waiter": "NoEventLoopError",
        "late": "NoEventLoopError",
    }
