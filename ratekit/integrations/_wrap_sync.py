"""`wrap` for sync clients (``openai.OpenAI``, ``anthropic.Anthropic``), on a
`SyncScheduler`'s event loop.

The calls run in the caller's thread; everything that touches the scheduler (the
plan's estimate, the admission, the settle, the end, the answer's headers) runs on
the scheduler's loop, one blocking hop each (the `SyncScheduler`'s own, which its
close ends with `NoEventLoopError`). The plan, the retries and the rules are those of
the async wrapper (`_wrap`); only the waiting differs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar, cast

from tenacity import Retrying

from .._admission import Admission
from .._tenants import current_tenant
from ._calling import (
    _SENDING,
    CreateBase,
    HeldStream,
    HelperManager,
    SdkRetries,
    StreamReading,
    _admit_at_send,
    _Deadline,
    _Plan,
    _Sending,
    final_usage,
    plan_call,
    stream_params,
)
from ._calls import loop_of, on_loop
from ._counts import PendingCount
from ._sending import stamp_when_sent_sync
from ._usage import Usage, read_usage

R = TypeVar("R")


def _run(sending: _Sending, fn: Callable[..., Coroutine[Any, Any, R]], *args: Any) -> R:
    return cast(R, on_loop(sending.scheduler, fn, *args))


def admit_on_send_sync(request: Any) -> None:
    """Sync httpx request hook: `_admit_on_send` from the sending thread."""
    sending = _SENDING.get()
    if sending is None or sending.done:
        return
    _run(sending, sending.admit)
    if sending.admission is not None:
        stamp_when_sent_sync(request, sending.admission, functools.partial(_run, sending))


def observe_answer_sync(response: Any) -> None:
    """Sync httpx response hook: the answer's rate-limit headers, to the scheduler."""
    sending = _SENDING.get()
    if sending is not None and not sending.done:
        on_loop(sending.scheduler, sending.observe, response, awaited=False)


async def _end(
    sending: _Sending, admission: Admission, usage: Usage | None, error: BaseException | None
) -> None:
    """Settle `admission` with `usage` and end it (on the scheduler's loop)."""
    plan = sending.plan
    try:
        plan.settle(admission, usage)
    finally:
        await sending.scheduler.finish(admission, error, model=plan.model)


class SyncCreate(CreateBase):
    """One admitted ``create`` (or stream helper) of a sync client."""

    __slots__ = ()

    def __call__(self, **params: Any) -> Any:
        plan = self._plan(params)
        if not params.get("stream"):
            return self._retried(lambda left: self._call(params, plan, left), plan)
        params, hide_usage = stream_params(self._kind, params)
        return self._retried(lambda left: self._open(params, plan, left, hide_usage), plan)

    def _plan(self, params: dict[str, Any]) -> _Plan:
        """`plan_call` on the scheduler's loop, with the prompt counted by the provider
        (in this thread) when asked."""
        settings = self._settings
        loop_of(settings.scheduler)  # a closed SyncScheduler says so before any count
        counted = self._counted(params)
        if isinstance(counted, PendingCount):
            try:
                answer = counted.ask()
            except Exception:
                answer = None
            counted = counted.done(answer)
        # The tenant of this thread's `ratekit.tenant` block, read here: the plan is made
        # on the scheduler's loop, in another thread.
        planned = functools.partial(plan_call, tenant=current_tenant())
        plan = on_loop(
            settings.scheduler, planned, settings, self._kind, params, counted, awaited=False
        )
        return cast(_Plan, plan)

    def _retried(self, attempt: Callable[[float | None], R], plan: _Plan) -> R:
        """`_Create._retried`, waiting in this thread."""
        scheduler = self._settings.scheduler
        left = _Deadline(scheduler, plan)
        retries = SdkRetries(self._retries)
        for tried in Retrying(**scheduler.retry_policy(), sleep=time.sleep):
            with tried:
                while True:
                    try:
                        return attempt(left.seconds())
                    except Exception as error:
                        wait_s = retries.wait_after(error)
                        if wait_s is None:
                            raise
                    time.sleep(wait_s)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _sent(
        self, send: Callable[[], Any], plan: _Plan, left: float | None
    ) -> tuple[Any, Admission, _Sending]:
        """`_Create._sent` from this thread: the answer, its admission, and the sending
        (which ends it on the scheduler's loop)."""
        sending = _Sending(self._settings.scheduler, plan, left)
        if self._owner is None or not _admit_at_send(self._owner, self._settings):
            _run(sending, sending.admit)
        token = _SENDING.set(sending)
        try:
            answer = send()
        except BaseException as error:
            if sending.error is not None:
                raise sending.error from None
            admission = sending.take()
            if admission is not None:
                _run(sending, _end, sending, admission, None, error)
            raise
        finally:
            _SENDING.reset(token)
        if sending.admission is None:
            _run(sending, sending.admit)
        admission = sending.take()
        assert admission is not None
        return answer, admission, sending

    def _call(self, params: dict[str, Any], plan: _Plan, left: float | None) -> Any:
        result, admission, sending = self._sent(lambda: self._create(**params), plan, left)
        _run(sending, _end, sending, admission, read_usage(result), None)
        return result

    def _open(
        self, params: dict[str, Any], plan: _Plan, left: float | None, hide_usage: bool
    ) -> _SyncAdmittedStream:
        stream, admission, sending = self._sent(lambda: self._create(**params), plan, left)
        reading = StreamReading(self._settings.api.stream_usage, hide_usage)
        return _SyncAdmittedStream(stream, sending, admission, reading)

    def enter(self, params: dict[str, Any]) -> tuple[Any, Any, Admission, _Sending]:
        """Open a stream helper's stream (``with client.messages.stream(...)``): the
        helper's manager, its stream, and the admission that holds it."""
        plan = self._plan(params)

        def open_(left: float | None) -> tuple[Any, Any, Admission, _Sending]:
            manager = self._create(**params)
            stream, admission, sending = self._sent(manager.__enter__, plan, left)
            return manager, stream, admission, sending

        return self._retried(open_, plan)


class _SyncAdmittedStream(HeldStream):
    """`_AdmittedStream` for a sync client: iterate it (``for chunk in stream``), close
    it or leave its ``with`` block to end its admission early."""

    def __init__(
        self, stream: Any, sending: _Sending, admission: Admission, reading: StreamReading
    ) -> None:
        super().__init__(stream, sending.plan, admission, reading)
        self._sending = sending
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _SyncAdmittedStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._stream)
        try:
            while True:
                chunk = next(self._iterator)
                if not self._reading.hides(chunk):
                    return chunk
        except StopIteration:
            self._finish(None)
            raise
        except BaseException as error:
            self._finish(error)
            raise

    def close(self) -> None:
        """Close the provider stream and end the admission."""
        try:
            self._stream.close()
        finally:
            self._finish(None)

    def __enter__(self) -> _SyncAdmittedStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._stream.close()
        finally:
            self._finish(exc)

    def _finish(self, error: BaseException | None) -> None:
        admission = self._take()
        if admission is not None:
            _run(self._sending, _end, self._sending, admission, self._reading.usage, error)


class SyncStreamManager(HelperManager[SyncCreate, _Sending]):
    """``with client.messages.stream(...) as stream:`` of a wrapped sync client; see
    `_StreamManager`."""

    def __enter__(self) -> Any:
        manager, stream, admission, sending = self._create.enter(self._params_to_open())
        return self._hold(manager, stream, admission, sending)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        opened = self._take()
        if opened is None:
            return
        manager, admission, sending = opened
        try:
            manager.__exit__(exc_type, exc, tb)
        finally:
            _run(sending, _end, sending, admission, final_usage(self._stream), exc)
