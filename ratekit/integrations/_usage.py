"""What an answer reports as used, and what that costs: one reader for parsed JSON and
for client objects, shared by the openai wrapper and the httpx transport.

`read_usage` reads an answer's ``usage`` (chat, completions, embeddings, responses, and
the responses API's ``response.completed`` event); `CallPrice` turns a call's estimate
and its real usage into money with the profile's prices. Pure: no I/O, never raises on
a malformed answer (it reads as "not said").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._admission import Admission
from .._errors import MissingPriceError, UnknownModelError
from .._limits import MAX_AMOUNT
from .._scheduler import Scheduler


def _field(value: object, name: str) -> object:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _count(value: object) -> float | None:
    """A token count as an answer may write it: a number in [0, MAX_AMOUNT], else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        # NaN fails both tests; infinity and absurd counts fail the second.
        return float(value) if value >= 0 and value <= MAX_AMOUNT else None
    return None


def _first(usage: object, *names: str) -> float | None:
    for name in names:
        found = _count(_field(usage, name))
        if found is not None:
            return found
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one answer reports as used.

    `tokens` is the total; `input_tokens` every prompt token (cache hits included) and
    `output_tokens` every output token (reasoning included), each None when the answer
    does not say; `cached_input_tokens` the prompt tokens served from the provider's
    cache (0 when not reported), never more than `input_tokens`; `cache_write_tokens`
    the prompt tokens written to the cache (the Anthropic API reports them), part of
    `input_tokens` too.
    """

    tokens: float
    input_tokens: float | None = None
    output_tokens: float | None = None
    cached_input_tokens: float = 0.0
    cache_write_tokens: float = 0.0

    def without_cache_reads(self) -> Usage:
        """This usage as a provider counts it when its cache hits do not count toward its
        token rates: the total less the cache hits."""
        return Usage(
            max(self.tokens - self.cached_input_tokens, 0.0),
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
        )


def read_usage(answer: object) -> Usage | None:
    """The usage an answer (a JSON body, an SSE event, or a client's response object)
    reports, else None.

    The usage may sit at the top (chat, embeddings, responses) or under ``response``
    (the responses API's ``response.completed`` event). The total is ``total_tokens``,
    else input + output. Input is ``prompt_tokens`` or ``input_tokens``; output
    ``completion_tokens`` or ``output_tokens``, else the total less the input (an
    embedding's usage: 0). Cache hits are ``prompt_tokens_details.cached_tokens``
    (OpenAI chat), ``input_tokens_details.cached_tokens`` (responses) or a top-level
    ``cached_tokens`` (Moonshot). The Anthropic Messages API's usage counts only the
    uncached prompt as ``input_tokens``, beside ``cache_creation_input_tokens`` and
    ``cache_read_input_tokens``: the three together are the prompt.
    """
    usage = _field(answer, "usage")
    if usage is None:
        usage = _field(_field(answer, "response"), "usage")
        if usage is None:
            return None
    written = _count(_field(usage, "cache_creation_input_tokens"))
    read = _count(_field(usage, "cache_read_input_tokens"))
    if written is not None or read is not None:
        return _messages_usage(usage, written or 0.0, read or 0.0)
    total = _first(usage, "total_tokens")
    input_tokens = _first(usage, "prompt_tokens", "input_tokens")
    output_tokens = _first(usage, "completion_tokens", "output_tokens")
    if total is None:
        parts = [part for part in (input_tokens, output_tokens) if part is not None]
        if not parts:
            return None
        total = sum(parts)
    if output_tokens is None and input_tokens is not None:
        output_tokens = max(total - input_tokens, 0.0)
    cached = (
        _first(_field(usage, "prompt_tokens_details"), "cached_tokens")
        or _first(_field(usage, "input_tokens_details"), "cached_tokens")
        or _first(usage, "cached_tokens")
        or 0.0
    )
    if input_tokens is not None:
        cached = min(cached, input_tokens)
    return Usage(total, input_tokens, output_tokens, cached)


def _messages_usage(usage: object, written: float, read: float) -> Usage:
    """A Messages API usage: its ``input_tokens`` is the prompt outside the cache."""
    uncached = _first(usage, "input_tokens") or 0.0
    output = _first(usage, "output_tokens")
    prompt = uncached + written + read
    return Usage(prompt + (output or 0.0), prompt, output, read, written)


def message_event_usage(seen: Usage | None, event: object) -> Usage | None:
    """The usage of a Messages API stream so far, after `event`: its ``message_start``
    says the prompt (and a first output count), each ``message_delta`` the output so far
    and, from some servers, some of the prompt's counts again. A count a delta leaves out
    (or gives as null) keeps its value from before, as the SDK's own accumulator does.
    `seen` is the usage before `event`."""
    kind = _field(event, "type")
    if kind == "message_start":
        return read_usage(_field(event, "message")) or seen
    if kind != "message_delta":
        return seen
    usage = _field(event, "usage")
    told = {name: _count(_field(usage, name)) for name in _MESSAGE_COUNTS}
    if all(value is None for value in told.values()):
        return seen
    if seen is None:
        uncached = written = read = 0.0
        output: float | None = None
        prompt_known = False
    else:
        written, read = seen.cache_write_tokens, seen.cached_input_tokens
        uncached = max((seen.input_tokens or 0.0) - written - read, 0.0)
        output = seen.output_tokens
        prompt_known = seen.input_tokens is not None
    if told["input_tokens"] is not None:
        uncached, prompt_known = told["input_tokens"], True
    if told["cache_creation_input_tokens"] is not None:
        written, prompt_known = told["cache_creation_input_tokens"], True
    if told["cache_read_input_tokens"] is not None:
        read, prompt_known = told["cache_read_input_tokens"], True
    if told["output_tokens"] is not None:
        output = told["output_tokens"]
    prompt = uncached + written + read
    return Usage(prompt + (output or 0.0), prompt if prompt_known else None, output, read, written)


# The counts of a Messages API usage: the uncached prompt, cache writes and reads, output.
_MESSAGE_COUNTS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def usage_tokens(answer: object) -> float | None:
    """The total tokens an answer reports as used (see `read_usage`), else None."""
    usage = read_usage(answer)
    return None if usage is None else usage.tokens


class CallPrice:
    """The money side of calls of one model, from the profile's prices (its currency).

    `estimate` is what a call may cost at most, passed as the admission's ``cost`` so
    that money rates (spend budgets) admit it; `settle` records the real cost from the
    answer's usage. A model the profile does not price (or None) costs 0 and settles
    only tokens.
    """

    __slots__ = ("_model", "_scheduler")

    def __init__(self, scheduler: Scheduler, model: str | None) -> None:
        self._scheduler = scheduler
        self._model = model

    def _cost(
        self, input_tokens: float, output_tokens: float, cached: float = 0.0, written: float = 0.0
    ) -> float | None:
        if self._model is None:
            return None
        try:
            return self._scheduler.estimate_cost(
                self._model,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cached_input_tokens=cached,
                cache_write_tokens=written,
            )
        except (UnknownModelError, MissingPriceError):
            return None

    @property
    def priced(self) -> bool:
        """Whether the profile prices this call's model (else every cost is 0)."""
        return self._cost(0.0, 1.0) is not None

    def estimate(
        self, input_tokens: float, output_tokens: float, *, writes_cache: bool = False
    ) -> float:
        """The most a call of `input_tokens` prompt and `output_tokens` output costs; with
        `writes_cache` (the request marks a prefix for the cache), the prompt at the dearer
        of the input and cache-write prices."""
        cost = self._cost(input_tokens, output_tokens) or 0.0
        if writes_cache:
            cost = max(cost, self._cost(0.0, output_tokens, 0.0, input_tokens) or 0.0)
        return cost

    def estimate_total(self, tokens: float) -> float:
        """The most a call of `tokens` in all costs, its split unknown: every token at
        the dearer of the input and output prices."""
        as_input = self._cost(tokens, 0) or 0.0
        as_output = self._cost(0, tokens) or 0.0
        return max(as_input, as_output)

    def settle(
        self, admission: Admission, usage: Usage | None, counted: float | None = None
    ) -> None:
        """Settle `admission` with the real tokens and, when the call was priced and the
        usage splits input from output, the real cost (cache hits and writes at the
        model's cache prices); what is not known keeps its estimate (the safe side).
        `counted` is what the provider reserved at arrival, when known (see
        `Admission.settle`)."""
        if usage is None or not admission.granted:
            return
        cost = None
        if admission.demand.cost > 0 and usage.input_tokens is not None:
            cached, written = usage.cached_input_tokens, usage.cache_write_tokens
            uncached = max(usage.input_tokens - cached - written, 0.0)
            cost = self._cost(uncached, usage.output_tokens or 0.0, cached, written)
        admission.settle(tokens=usage.tokens, cost=cost, counted_tokens=counted)
