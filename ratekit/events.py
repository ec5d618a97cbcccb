"""What a scheduler or a pool tells its hooks (``Scheduler(hooks=[...])``, `add_hook`).

A hook is any callable taking one `Event`; `LoggingHook` logs them. A hook that
raises is logged and skipped: it never fails a call or loses an admission.
"""

from ._events import (
    AccountOut,
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
    "AccountOut",
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
