"""`SyncScheduler`: a scheduler for threaded code, its event loop in a thread of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio.from_thread
import anyio.lowlevel
import sniffio

from .._errors import NoEventLoopError
from .._scheduler import Scheduler, SchedulerStatistics
from ._calls import SYNC_LOOPS, limit, slot_sync, submit_sync

T = TypeVar("T")

_CLOSED = (
    "this SyncScheduler is closed: its event loop has stopped, so no call can be "
    "admitted through it any more; make a new one"
)
_STOPPED = "this SyncScheduler was closed while the call waited for its event loop"


def _end(future: concurrent.futures.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class _Hops:
    """The blocking hops of threads onto a SyncScheduler's loop, each kept until it ends.

    A hop is checked against `close` and put on the loop's queue under one lock, so
    that `close` knows every hop it must end: those the loop has started are cancelled
    on the loop (their threads get `NoEventLoopError`), and one the stopped loop never
    ran is failed once its thread has ended. A thread never waits for a loop that has
    stopped (anyio's ``from_thread.run(token=...)`` would: its future is never resolved
    when the loop stops before running the hop, or with the hop's task still pending).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self.closed = False
        self._waiting: set[concurrent.futures.Future[Any]] = set()  # threads', until answered
        self._tasks: set[asyncio.Task[Any]] = set()  # on the loop, until they end

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], awaited: bool) -> Any:
        """``fn(*args)`` on the loop, its result (awaited when `awaited`), from a thread.
        Carries this thread's context, as anyio's portal does."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        context = contextvars.copy_context()
        context.run(sniffio.current_async_library_cvar.set, "asyncio")
        with self._lock:
            if self.closed:
                raise NoEventLoopError(_CLOSED)
            self._waiting.add(future)
            self._loop.call_soon_threadsafe(self._start, future, fn, args, awaited, context=context)
        try:
            return future.result()
        finally:
            with self._lock:
                self._waiting.discard(future)

    def _start(
        self,
        future: concurrent.futures.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        awaited: bool,
    ) -> None:
        if future.done():
            return
        if awaited:
            task = asyncio.ensure_future(self._await(future, fn, args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            future.set_result(fn(*args))
        except BaseException as error:
            future.set_exception(error)
            if not isinstance(error, Exception):
                raise

    async def _await(
        self, future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        try:
            result = await fn(*args)
        except asyncio.CancelledError:
            stopped = NoEventLoopError(_STOPPED) if self.closed else None
            _end(future, stopped or concurrent.futures.CancelledError())
            raise
        except BaseException as error:
            _end(future, error)
            if not isinstance(error, Exception):
                raise
        else:
            if not future.done():
                future.set_result(result)

    def close(self) -> bool:
        """Refuse every hop from now on; False when closed already."""
        with self._lock:
            closed, self.closed = self.closed, True
        return not closed

    async def cancel(self) -> None:
        """On the loop, after `close`: cancel the hops it runs, and wait until they end.
        Every hop that got past `close` was queued before this, so it has started."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def fail_left(self) -> None:
        """Once the loop's thread has ended: a hop still waiting was never run."""
        with self._lock:
            left = list(self._waiting)
        for future in left:
            _end(future, NoEventLoopError(_STOPPED))


class SyncScheduler:
    """A `Scheduler` for threaded code: its event loop runs in a thread of its own.

    ``SyncScheduler(account, backend=...)`` takes the `Scheduler`'s arguments;
    `backend` may be a function that builds it, so that a Redis client is made in
    the scheduler's loop. Use `submit`, `slot` (a ``with`` block) and `limit` (a
    decorator) from any number of threads; `close` stops the loop. All share one
    scheduler, so threads and processes see the same limits. Each takes `tenant=`; without
    it, a call is admitted as the tenant of the `ratekit.tenant` block around it in its
    own thread (read there, and carried to the scheduler's loop).
    """

    def __init__(self, *args: Any, backend: Any = None, **kwargs: Any) -> None:
        self._portal_context = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_context.__enter__()

        async def build() -> tuple[Scheduler, asyncio.AbstractEventLoop]:
            made = backend() if callable(backend) else backend
            scheduler = Scheduler(*args, backend=made, **kwargs)
            scheduler.loop_token = anyio.lowlevel.current_token()
            return scheduler, asyncio.get_running_loop()

        self.scheduler: Scheduler
        self.scheduler, loop = self._portal.call(build)
        self._hops = _Hops(loop)
        SYNC_LOOPS[self.scheduler] = self._hops

    def submit(self, fn: Callable[..., T], *args: Any, **options: Any) -> T:
        """Run ``fn(*args)`` in this thread once admitted; `options` as `Scheduler.submit`."""
        return cast(T, submit_sync(self.scheduler, fn, *args, **options))

    def slot(self, **kwargs: Any) -> Any:
        """``with sync_scheduler.slot(tokens=n) as permit:``; see `Scheduler.slot`."""
        return slot_sync(self.scheduler, **kwargs)

    def limit(self, **kwargs: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator for sync functions; see `limit`."""
        return limit(self.scheduler, **kwargs)

    def statistics(self) -> SchedulerStatistics:
        """`Scheduler.statistics`, from any thread."""
        return self._portal.call(self.scheduler.statistics)

    def close(self) -> None:
        """Stop the scheduler's loop (and close a backend that has `aclose`). Calls made
        through it afterwards raise `NoEventLoopError`, and so do those waiting on the
        loop meanwhile; closing again does nothing."""
        # Closed first: a call that starts from now on fails at once.
        if not self._hops.close():
            return
        scheduler = self.scheduler
        backend = scheduler.limiter().backend
        scheduler.loop_token = None
        scheduler.sync_closed = True
        try:
            self._portal.call(self._hops.cancel)
            close = getattr(backend, "aclose", None)
            if close is not None:
                self._portal.call(close)
        finally:
            self._portal_context.__exit__(None, None, None)
            self._hops.fail_left()

    def __enter__(self) -> SyncScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
