"""ratekit: a client-side rate limiter and quota-aware request scheduler for LLM APIs."""

from ._clock import Clock, FakeClock, SystemClock
from ._errors import (
    AcquireTimeout,
    CostExceedsLimitError,
    InvalidCostError,
    LimitsError,
    PermitError,
    ProfileError,
    RatekitError,
    UnknownModelError,
    UnknownNameError,
    UnknownProviderError,
    UnknownTierError,
)
from ._limiter import Limiter, LimiterStatistics, Permit
from ._limits import Limits, Rate, TokenCounting
from .backends import Backend, Demand, DimensionStatistics, MemoryBackend

__all__ = [
    "AcquireTimeout",
    "Backend",
    "Clock",
    "CostExceedsLimitError",
    "Demand",
    "DimensionStatistics",
    "FakeClock",
    "InvalidCostError",
    "Limiter",
    "LimiterStatistics",
    "Limits",
    "LimitsError",
    "MemoryBackend",
    "Permit",
    "PermitError",
    "ProfileError",
    "Rate",
    "RatekitError",
    "SystemClock",
    "TokenCounting",
    "UnknownModelError",
    "UnknownNameError",
    "UnknownProviderError",
    "UnknownTierError",
]

__version__ = "0.1.0"
