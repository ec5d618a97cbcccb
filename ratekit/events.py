"""What a scheduler tells its hooks (``Scheduler(hooks=[...])``, `Scheduler.add_hook`).

A hook is any callable taking one `Event`; `LoggingHook` logs them. A hook that
raises is logged and skipped: it never fails a call or loses an admission.
"""

from ._events import (
    Admitted,
    Cooldown,
    Event,
    Hook,
    LimitsAdapted,
    LoggingHook,
    Queued,
    RateLimited,
    Settled,
    TierChanged,
)

__all__ = [
    "Admitted",
    "Cooldown",
    "Event",
    "Hook",
    "LimitsAdapted",
    "LoggingHook",
    "Queued",
    "RateLimited",
    "Settled",
    "TierChanged",
]
