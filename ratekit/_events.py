"""What a scheduler reports as it works: frozen events, and hooks that receive them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Queued:
    """A call entered the scheduler (or a pool) and waits for its admission."""

    model: str | None
    priority: int
    tokens: float
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A call was admitted after waiting `waited_s` seconds; a pool names the `account`
    that admitted it."""

    model: str | None
    priority: int
    waited_s: float
    tenant: str | None = None
    account: str | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    """A call ended; `tokens` and `cost` are what it was settled with (estimates if
    unknown); a pool names the `account` that served it."""

    model: str | None
    tokens: float
    cost: float
    tenant: str | None = None
    account: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimited:
    """The provider answered "too many requests" to a call ratekit had admitted."""

    model: str | None
    retry_after_s: float | None
    message: str


@dataclass(frozen=True, slots=True)
class Cooldown:
    """The account (or a model's limits) is paused for `seconds` after a 429."""

    group: str
    seconds: float


@dataclass(frozen=True, slots=True)
class LimitsAdapted:
    """Effective limits are now `factor` times the tier's, for `reason`."""

    group: str
    factor: float
    reason: str


@dataclass(frozen=True, slots=True)
class TierChanged:
    """The account moved from tier `old` to tier `new`."""

    old: str
    new: str


@dataclass(frozen=True, slots=True)
class AccountOut:
    """A pool's `account` answered that its quota or balance is spent: no call goes
    there for `seconds`, after which it is tried again."""

    account: str
    seconds: float
    reason: str


Event = (
    Queued | Admitted | Settled | RateLimited | Cooldown | LimitsAdapted | TierChanged | AccountOut
)


class Hook(Protocol):
    """Receives every event; called synchronously, so it must be quick and not raise."""

    def __call__(self, event: Event) -> None: ...


class LoggingHook:
    """Logs events to the standard `logging` module (logger "ratekit")."""

    def __init__(self, logger: logging.Logger | None = None, *, quiet: bool = True) -> None:
        self._logger = logger or logging.getLogger("ratekit")
        # Queued, admitted and settled happen for every call: debug level when quiet.
        self._routine_level = logging.DEBUG if quiet else logging.INFO

    def __call__(self, event: Event) -> None:
        routine = isinstance(event, Queued | Admitted | Settled)
        level = self._routine_level if routine else logging.WARNING
        if isinstance(event, TierChanged | LimitsAdapted):
            level = logging.INFO
        self._logger.log(level, "%s", event)
