"""When a request leaves: the instant its admission should count from.

A provider counts a request when it arrives, so the admission of a request is
counted from the moment its body has been written (`Admission.sent`), not from
when the admission was granted: on a busy event loop the two are milliseconds to
hundreds of milliseconds apart. Stamped once the write is done, the count starts
no earlier than the arrival could (an earlier stamp, at the start of the write,
still waits for the event loop before the bytes go). httpx (and the openai SDK's
httpx2) report that moment through the ``trace`` request extension
(``http11.send_request_body.complete``, or ``http2.``): `stamp_when_sent` hooks it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .._admission import Admission

_Trace = Callable[[str, dict[str, Any]], Awaitable[None]]
_SENDING_EVENT = ".send_request_body.complete"


def stamp_when_sent(request: Any, admission: Admission) -> Callable[[], None]:
    """Have `admission` count from when `request` (an httpx request, before the
    transport) has been written, keeping any trace the caller set. Returns what lets
    go of the admission, to call once the transport has returned: a transport that
    traces nothing (a mock, an in-process app) never says the body was written."""
    extensions = getattr(request, "extensions", None)
    if not isinstance(extensions, dict):
        return _nothing
    previous: _Trace | None = extensions.get("trace")
    # Held until the body is written or the transport has returned (`let_go`): a
    # response keeps its request, and so this trace, long after the admission ended.
    # (Not a weak reference: a compiled admission has none.)
    held: Admission | None = admission

    async def trace(event: str, info: dict[str, Any]) -> None:
        nonlocal held
        if held is not None and event.endswith(_SENDING_EVENT):
            admission, held = held, None
            await admission.sent()
        if previous is not None:
            await previous(event, info)

    def let_go() -> None:
        nonlocal held
        held = None

    extensions["trace"] = trace
    return let_go


def stamp_when_sent_sync(request: Any, admission: Admission, run: Callable[..., Any]) -> None:
    """`stamp_when_sent` for a sync httpx client: its trace callback is called in the
    sending thread, and `run(admission.sent)` runs the restamp on the scheduler's loop."""
    extensions = getattr(request, "extensions", None)
    if not isinstance(extensions, dict):
        return
    previous: Callable[[str, dict[str, Any]], None] | None = extensions.get("trace")
    held: Admission | None = admission  # as in `stamp_when_sent`

    def trace(event: str, info: dict[str, Any]) -> None:
        nonlocal held
        if held is not None and event.endswith(_SENDING_EVENT):
            admission, held = held, None
            run(admission.sent)
        if previous is not None:
            previous(event, info)

    extensions["trace"] = trace


def _nothing() -> None:
    return None
