"""Exact prompt counts from the provider's own token-count endpoint (opt-in).

The Anthropic Messages API counts a request's input tokens for free
(``messages.count_tokens``, with limits of its own, apart from the calls'). With
``wrap(client, scheduler, count_tokens=True)`` each Messages call's prompt is counted
there before it is admitted, so that it reserves exactly what the provider will
count; the count is kept (by the request's prompt) so that a prompt sent again costs
no second count. When the endpoint fails or is slow, the call falls back to
ratekit's own estimate. What the counts cost (calls, time, failures) is in
`TokenCounts.statistics`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# The request fields the provider counts, when its count method does not say (the
# Anthropic SDK's ``messages.count_tokens`` takes the body's counted fields as keywords).
_COUNTED_FIELDS = ("model", "system", "messages", "tools", "tool_choice", "thinking")
# Keywords of an SDK method that are options of the HTTP call, not of the body; the
# beta flags (``extra_headers``) change what is counted, so they are kept.
_CALL_OPTIONS = frozenset({"extra_query", "extra_body", "timeout", "betas"})
# Seconds a count may take before the call goes on with ratekit's own estimate.
DEFAULT_COUNT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class TokenCountStatistics:
    """What the exact counts cost so far.

    `counted` requests asked the provider (`seconds` in all, `failed` of them fell
    back to ratekit's estimate); `reused` were answered from counts kept.
    """

    counted: int
    reused: int
    failed: int
    seconds: float


class TokenCounts:
    """The counts kept for ``wrap(..., count_tokens=TokenCounts())``, and their cost.

    At most `max_kept` prompts are kept (the least recently used goes first); a count
    that takes longer than `timeout_s` is given up for ratekit's own estimate. Pass
    ``count_tokens=True`` to `wrap` for a fresh one with the defaults; pass your own to
    read `statistics` or share the counts between wrapped clients.
    """

    def __init__(self, *, max_kept: int = 4096, timeout_s: float = DEFAULT_COUNT_TIMEOUT_S) -> None:
        if isinstance(max_kept, bool) or not isinstance(max_kept, int) or max_kept < 0:
            raise ValueError(f"TokenCounts.max_kept must be an int >= 0, got {max_kept!r}")
        if not isinstance(timeout_s, int | float) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"TokenCounts.timeout_s must be positive seconds, got {timeout_s!r}")
        self.max_kept = max_kept
        self.timeout_s = float(timeout_s)
        self._kept: OrderedDict[str, int] = OrderedDict()
        # Shared by clients of several threads (sync clients) or loops: one at a time.
        self._lock = threading.Lock()
        self._counted = 0
        self._reused = 0
        self._failed = 0
        self._seconds = 0.0

    def statistics(self) -> TokenCountStatistics:
        with self._lock:
            return TokenCountStatistics(self._counted, self._reused, self._failed, self._seconds)

    @staticmethod
    def key(params: Mapping[str, Any], fields: tuple[str, ...] = _COUNTED_FIELDS) -> str | None:
        """The prompt of a request (its `fields`), as the key of its count (None: not
        readable as JSON)."""
        counted = {name: params[name] for name in fields if name in params}
        try:
            text = json.dumps(counted, sort_keys=True, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            return None
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def kept(self, key: str | None) -> int | None:
        """The count kept for `key`, if any (it becomes the most recently used)."""
        if key is None:
            return None
        with self._lock:
            count = self._kept.get(key)
            if count is None:
                return None
            self._kept.move_to_end(key)
            self._reused += 1
            return count

    def started(self) -> float:
        return time.monotonic()

    def done(self, key: str | None, started: float, count: object) -> int | None:
        """Record a count's answer (`count`: the provider's ``input_tokens``, or anything
        else for a failure); returns the count, None when it failed."""
        seconds = time.monotonic() - started
        with self._lock:
            self._counted += 1
            self._seconds += seconds
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                self._failed += 1
                return None
            if key is not None and self.max_kept:
                self._kept[key] = count
                self._kept.move_to_end(key)
                while len(self._kept) > self.max_kept:
                    self._kept.popitem(last=False)
            return count


@dataclass(frozen=True, slots=True)
class PendingCount:
    """A prompt to count with the provider (`count`: the SDK's count method, `fields`:
    what it counts of `params`, `key`: where the count is kept, `started`: when): `ask`
    calls the method (an async client's answer is awaited by its caller), `done`
    records its answer."""

    counts: TokenCounts
    count: Callable[..., Any]
    params: Mapping[str, Any]
    fields: tuple[str, ...]
    key: str | None
    started: float

    def ask(self) -> Any:
        """The count method called with the prompt (a coroutine, for an async client)."""
        arguments = count_params(self.params, self.fields)
        return self.count(**arguments, timeout=self.counts.timeout_s)

    def done(self, answer: object) -> int | None:
        """Record the count method's `answer` (None: it failed); the count, None if failed."""
        return self.counts.done(self.key, self.started, getattr(answer, "input_tokens", None))


def lookup(
    counts: TokenCounts, count: Callable[..., Any], params: Mapping[str, Any]
) -> int | PendingCount:
    """The count kept for the prompt of `params`, else the count to ask of `count` (an
    SDK's ``messages.count_tokens``)."""
    fields = counted_fields(count)
    key = counts.key(params, fields)
    kept = counts.kept(key)
    if kept is not None:
        return kept
    return PendingCount(counts, count, params, fields, key, counts.started())


def counted_fields(count: Any) -> tuple[str, ...]:
    """The request fields `count` (an SDK's ``messages.count_tokens``) takes: those it
    counts, plus the beta flags (``extra_headers``)."""
    try:
        names = inspect.signature(count).parameters
    except (TypeError, ValueError):
        return (*_COUNTED_FIELDS, "extra_headers")
    fields = tuple(
        name
        for name, parameter in names.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in _CALL_OPTIONS
    )
    return fields or (*_COUNTED_FIELDS, "extra_headers")


def count_params(params: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """The arguments of ``messages.count_tokens`` for a ``messages.create`` request."""
    return {name: params[name] for name in fields if name in params}
