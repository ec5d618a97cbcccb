"""ratekit: a client-side rate limiter and quota-aware request scheduler for LLM APIs."""

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
from ._limits import Limits, Rate, TokenCounting

__all__ = [
    "AcquireTimeout",
    "CostExceedsLimitError",
    "InvalidCostError",
    "Limits",
    "LimitsError",
    "PermitError",
    "ProfileError",
    "Rate",
    "RatekitError",
    "TokenCounting",
    "UnknownModelError",
    "UnknownNameError",
    "UnknownProviderError",
    "UnknownTierError",
]

__version__ = "0.1.0"
