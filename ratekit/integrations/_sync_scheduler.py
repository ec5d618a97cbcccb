"""`SyncScheduler`: a scheduler for threaded code, its event loop in a thread of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio.from_thread
import anyio.lowlevel

from .._scheduler import Scheduler, SchedulerStatistics
from ._calls import limit, slot_sync, submit_sync

T = TypeVar("T")


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

        async def build() -> Scheduler:
            made = backend() if callable(backend) else backend
            scheduler = Scheduler(*args, backend=made, **kwargs)
            scheduler.loop_token = anyio.lowlevel.current_token()
            return scheduler

        self.scheduler: Scheduler = self._portal.call(build)

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
        through it afterwards raise `NoEventLoopError`; closing again does nothing."""
        scheduler = self.scheduler
        if scheduler.loop_token is None:
            return
        backend = scheduler.limiter().backend
        # Closed first: a call that starts from now on fails at once.
        token, scheduler.loop_token = scheduler.loop_token, None
        scheduler.sync_closed = True
        close = getattr(backend, "aclose", None)
        if close is not None:
            anyio.from_thread.run(close, token=token)
        self._portal_context.__exit__(None, None, None)

    def __enter__(self) -> SyncScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
