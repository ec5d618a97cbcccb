"""`wrap`: an OpenAI-compatible async client whose calls go through a scheduler.

The wrapped client is the same client: every attribute passes through, and
``chat.completions.create`` (plain and streaming), ``embeddings.create`` and
``responses.create`` are admitted first. Each call reserves its prompt's
estimated tokens plus the most it may output, and settles with the response's
``usage``. A stream keeps its concurrency slot until it ends or is closed, and
asks for usage in its last chunk without changing what the caller sees.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import anyio

from .._scheduler import Scheduler, Slot
from .._tokens import TokenEstimator, default_estimator, estimate_request_tokens
from ._usage import usage_tokens

# The create methods that are admitted, by the attribute path that leads to them.
_ADMITTED = {
    ("chat", "completions"): "chat.completions.create",
    ("completions",): "completions.create",
    ("embeddings",): "embeddings.create",
    ("responses",): "responses.create",
}
_PREFIXES = {path[:depth] for path in _ADMITTED for depth in range(1, len(path) + 1)}


def wrap(
    client: Any,
    scheduler: Scheduler,
    *,
    estimator: TokenEstimator | None = None,
    priority: int = 0,
    timeout: float | None = None,
) -> Any:
    """`client` (an ``openai.AsyncOpenAI`` or a compatible one) with every call admitted.

    `estimator` counts prompt tokens (the best available by default: tiktoken
    when installed, else a CJK-aware heuristic with the profile's hint). Per call,
    ``ratekit_tokens=`` gives an exact reservation, ``ratekit_priority=`` and
    ``ratekit_timeout=`` override the defaults; they are not sent.
    """
    if estimator is None:
        estimator = default_estimator(scheduler.account.profile)
    return _Proxy(client, (), _Settings(scheduler, estimator, priority, timeout))


class _Settings:
    __slots__ = ("estimator", "priority", "scheduler", "timeout")

    def __init__(
        self,
        scheduler: Scheduler,
        estimator: TokenEstimator,
        priority: int,
        timeout: float | None,
    ) -> None:
        self.scheduler = scheduler
        self.estimator = estimator
        self.priority = priority
        self.timeout = timeout


class _Proxy:
    """Passes every attribute through, except along the paths to the admitted creates."""

    __slots__ = ("_path", "_settings", "_target")

    def __init__(self, target: Any, path: tuple[str, ...], settings: _Settings) -> None:
        self._target = target
        self._path = path
        self._settings = settings

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        path = (*self._path, name)
        if path in _PREFIXES:
            return _Proxy(value, path, self._settings)
        if name == "create" and self._path in _ADMITTED:
            return _Create(value, _ADMITTED[self._path], self._settings)
        return value

    def __repr__(self) -> str:
        return f"ratekit.wrap({self._target!r})"


class _Create:
    """One admitted ``create``."""

    __slots__ = ("_create", "_kind", "_settings")

    def __init__(self, create: Callable[..., Any], kind: str, settings: _Settings) -> None:
        self._create = create
        self._kind = kind
        self._settings = settings

    async def __call__(self, **params: Any) -> Any:
        settings = self._settings
        exact = params.pop("ratekit_tokens", None)
        priority = params.pop("ratekit_priority", settings.priority)
        timeout = params.pop("ratekit_timeout", settings.timeout)
        if exact is None:
            prompt, output = estimate_request_tokens(self._kind, params, settings.estimator)
            tokens = prompt + output
        else:
            tokens = exact
        model = params.get("model")
        scheduler = settings.scheduler
        if params.get("stream"):
            return await self._stream(params, tokens, model, priority, timeout)
        return await scheduler.submit(
            functools.partial(self._create, **params),
            tokens=tokens,
            model=model,
            priority=priority,
            timeout=timeout,
            usage=usage_tokens,
        )

    async def _stream(
        self,
        params: dict[str, Any],
        tokens: float,
        model: str | None,
        priority: int,
        timeout: float | None,  # noqa: ASYNC109 - the admission's deadline, as in submit
    ) -> _AdmittedStream:
        asked_usage = _asks_for_usage(params)
        if not asked_usage and self._kind == "chat.completions.create":
            params = copy.copy(params)
            options = dict(params.get("stream_options") or {})
            options["include_usage"] = True
            params["stream_options"] = options
        scheduler = self._settings.scheduler
        # The 429 that refuses a stream comes when it is opened: retried like a call.
        async for attempt in scheduler.retrying():
            with attempt:
                slot = scheduler.slot(
                    tokens=tokens, model=model, priority=priority, timeout=timeout
                )
                await slot.__aenter__()
                try:
                    stream = await self._create(**params)
                except BaseException as exc:
                    with anyio.CancelScope(shield=True):
                        await slot.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
                return _AdmittedStream(stream, slot, hide_usage_chunk=not asked_usage)
        raise AssertionError("unreachable: tenacity re-raises the last error")


def _asks_for_usage(params: Mapping[str, Any]) -> bool:
    options = params.get("stream_options")
    return bool(isinstance(options, Mapping) and options.get("include_usage"))


class _AdmittedStream:
    """A provider stream that holds its admission until it ends, is closed or is dropped.

    Iterate it as the original (``async for chunk in stream``); ``async with
    stream`` or ``await stream.close()`` ends it early. Its usage chunk, if the
    caller did not ask for one, is read for the settle and not shown.
    """

    def __init__(self, stream: Any, slot: Slot, *, hide_usage_chunk: bool) -> None:
        self._stream = stream
        self._slot: Slot | None = slot
        self._hide_usage_chunk = hide_usage_chunk
        self._usage: float | None = None
        self._iterator: AsyncIterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> _AdmittedStream:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._stream.__aiter__()
        try:
            while True:
                chunk = await self._iterator.__anext__()
                usage = usage_tokens(chunk)
                if usage is not None:
                    self._usage = usage
                    if self._hide_usage_chunk and not getattr(chunk, "choices", None):
                        continue
                return chunk
        except StopAsyncIteration:
            await self._finish(None)
            raise
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._finish(exc)
            raise

    async def close(self) -> None:
        """Close the provider stream and give the admission back."""
        try:
            await self._stream.close()
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(None)

    async def __aenter__(self) -> _AdmittedStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _finish(self, exc: BaseException | None) -> None:
        slot, self._slot = self._slot, None
        if slot is None:
            return
        if self._usage is not None and slot.permit is not None:
            slot.permit.settle(tokens=self._usage)
        await slot.__aexit__(type(exc) if exc else None, exc, None)

    def __del__(self) -> None:
        # Dropped before its end or close() (a caller that broke out of the loop):
        # give the slot back now where that needs no I/O; on a shared backend the
        # permit's finaliser warns and its lease lapses.
        slot, self._slot = self._slot, None
        permit = slot.permit if slot is not None else None
        if permit is not None:
            if self._usage is not None and permit.granted:
                permit.settle(tokens=self._usage)
            permit.release_nowait()
