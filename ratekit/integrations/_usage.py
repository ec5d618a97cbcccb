"""What an answer reports as used: one reader for parsed JSON and for client objects."""

from __future__ import annotations

from collections.abc import Mapping


def _field(value: object, name: str) -> object:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _count(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def usage_tokens(answer: object) -> float | None:
    """The tokens an answer (a JSON body, an SSE event, or a client's response object)
    reports as used, else None.

    ``usage.total_tokens``, else ``usage.input_tokens + usage.output_tokens``; the
    usage may sit at the top (chat, embeddings, responses) or under ``response``
    (the responses API's ``response.completed`` event).
    """
    usage = _field(answer, "usage")
    if usage is None:
        usage = _field(_field(answer, "response"), "usage")
        if usage is None:
            return None
    total = _count(_field(usage, "total_tokens"))
    if total is not None:
        return total
    parts = [_count(_field(usage, name)) for name in ("input_tokens", "output_tokens")]
    counted = [part for part in parts if part is not None]
    return sum(counted) if counted else None
