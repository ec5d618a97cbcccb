"""Every error ratekit raises: all derive from `RatekitError`, and each also from the
built-in error a caller would expect (`ValueError`, `TimeoutError`, `LookupError`...).

The ones raised while calls run are also at the top level: `ratekit.AcquireTimeout`,
`ratekit.QueueFullError`, `ratekit.CostExceedsLimitError`,
`ratekit.BackendUnavailableError`, `ratekit.InvalidArgumentError`,
`ratekit.MissingExtraError` and `ratekit.RatekitError`.
"""

from ._errors import (
    AcquireTimeout,
    BackendUnavailableError,
    CostExceedsLimitError,
    InvalidArgumentError,
    InvalidCostError,
    LimitsError,
    LimitsTypeError,
    MissingExtraError,
    MissingPriceError,
    NoEventLoopError,
    PermitError,
    PoolExhaustedError,
    ProfileError,
    QueueFullError,
    RatekitError,
    UnknownBillingItemError,
    UnknownModelError,
    UnknownNameError,
    UnknownProviderError,
    UnknownTierError,
    WrongEventLoopError,
)
from ._tokens import RequestShapeError, TokenizerUnavailableError, UnknownRequestKindError

__all__ = [
    "AcquireTimeout",
    "BackendUnavailableError",
    "CostExceedsLimitError",
    "InvalidArgumentError",
    "InvalidCostError",
    "LimitsError",
    "LimitsTypeError",
    "MissingExtraError",
    "MissingPriceError",
    "NoEventLoopError",
    "PermitError",
    "PoolExhaustedError",
    "ProfileError",
    "QueueFullError",
    "RatekitError",
    "RequestShapeError",
    "TokenizerUnavailableError",
    "UnknownBillingItemError",
    "UnknownModelError",
    "UnknownNameError",
    "UnknownProviderError",
    "UnknownRequestKindError",
    "UnknownTierError",
    "WrongEventLoopError",
]
