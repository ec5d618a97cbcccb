"""ratekit: a client-side rate limiter and quota-aware request scheduler for LLM APIs.

Start with `load_profile` (a provider's tiers), `Tier.limits` (what a tier allows)
and `Limiter` (permits for calls within those limits).

`RedisBackend` (the ``redis`` extra) and `RateLimitedTransport` (the ``httpx`` extra)
are imported on first use (``ratekit.RedisBackend``, ``from ratekit import
RedisBackend``) and are not in ``__all__``, so that ``from ratekit import *`` works
without the extras; without its extra, each raises `MissingExtraError` naming it.
``__all__`` lists what applications use; what a backend of one's own needs (`Demand`,
`Instant`) and older names (`Permit`) are importable too.
"""

from typing import TYPE_CHECKING

from ._account import Account
from ._admission import Admission
from ._calibration import Calibration as Calibration
from ._calibration import EstimateStatistics
from ._clock import Clock, FakeClock, SystemClock
from ._clock import Instant as Instant
from ._errors import (
    AcquireTimeout,
    BackendUnavailableError,
    CostExceedsLimitError,
    InvalidArgumentError,
    InvalidCostError,
    LimitsError,
    MissingExtraError,
    MissingPriceError,
    NoEventLoopError,
    PermitError,
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
from ._estimate import TokenEstimate
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
from ._limiter import Limiter, LimiterStatistics
from ._limiter import Permit as Permit
from ._limits import DEFAULT_MARGIN_S, Limits, Rate, TokenCounting
from ._pricing import (
    CacheMultiples,
    CharacterRules,
    Prices,
    RelayBilling,
    count_billable_characters,
)
from ._profiles import (
    LimitNumbers,
    Model,
    Profile,
    ProviderApi,
    Tier,
    bundled_providers,
    load_profile,
)
from ._scheduler import PriorityStatistics, Scheduler, SchedulerStatistics, Slot
from ._signals import RateLimitSignal, classify
from ._tokens import (
    HeuristicEstimator,
    RequestShapeError,
    TiktokenEstimator,
    TokenEstimator,
    TokenizerUnavailableError,
    UnknownRequestKindError,
    default_estimator,
    estimate_prompt_tokens,
    estimate_request_tokens,
    tokens_to_reserve,
)
from .backends import Backend, DimensionStatistics, MemoryBackend
from .backends import Demand as Demand
from .integrations._counts import TokenCounts, TokenCountStatistics
from .integrations._sync_scheduler import SyncScheduler
from .integrations._wrap import wrap

if TYPE_CHECKING:  # for type checkers; imported on first use (see `__getattr__`)
    from .backends.redis import RedisBackend as RedisBackend
    from .integrations._httpx import RateLimitedTransport as RateLimitedTransport

__all__ = [
    "DEFAULT_MARGIN_S",
    "Account",
    "AcquireTimeout",
    "Admission",
    "Admitted",
    "Backend",
    "BackendUnavailableError",
    "CacheMultiples",
    "CharacterRules",
    "Clock",
    "Cooldown",
    "CostExceedsLimitError",
    "DimensionStatistics",
    "EstimateStatistics",
    "Event",
    "FakeClock",
    "HeuristicEstimator",
    "Hook",
    "InvalidArgumentError",
    "InvalidCostError",
    "LimitNumbers",
    "Limiter",
    "LimiterStatistics",
    "Limits",
    "LimitsAdapted",
    "LimitsError",
    "LoggingHook",
    "MemoryBackend",
    "MissingExtraError",
    "MissingPriceError",
    "Model",
    "NoEventLoopError",
    "PermitError",
    "Prices",
    "PriorityStatistics",
    "Profile",
    "ProfileError",
    "ProviderApi",
    "QueueFullError",
    "Queued",
    "Rate",
    "RateLimitSignal",
    "RateLimited",
    "RatekitError",
    "RelayBilling",
    "RequestShapeError",
    "Scheduler",
    "SchedulerStatistics",
    "Settled",
    "Slot",
    "SyncScheduler",
    "SystemClock",
    "Tier",
    "TierChanged",
    "TiktokenEstimator",
    "TokenCountStatistics",
    "TokenCounting",
    "TokenCounts",
    "TokenEstimate",
    "TokenEstimator",
    "TokenizerUnavailableError",
    "UnknownBillingItemError",
    "UnknownModelError",
    "UnknownNameError",
    "UnknownProviderError",
    "UnknownRequestKindError",
    "UnknownTierError",
    "WrongEventLoopError",
    "bundled_providers",
    "classify",
    "count_billable_characters",
    "default_estimator",
    "estimate_prompt_tokens",
    "estimate_request_tokens",
    "load_profile",
    "tokens_to_reserve",
    "wrap",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The parts that need an optional package are imported on first use, and say which
    # extra to install when it is missing.
    if name == "RedisBackend":
        try:
            from .backends.redis import RedisBackend
        except ModuleNotFoundError as error:
            if error.name is None or error.name.partition(".")[0] != "redis":
                raise
            raise MissingExtraError("ratekit.RedisBackend", "redis", "redis") from None
        return RedisBackend
    if name == "RateLimitedTransport":
        try:
            from .integrations._httpx import RateLimitedTransport
        except ModuleNotFoundError as error:
            if error.name is None or error.name.partition(".")[0] != "httpx":
                raise
            raise MissingExtraError("ratekit.RateLimitedTransport", "httpx", "httpx") from None
        return RateLimitedTransport
    raise AttributeError(f"module 'ratekit' has no attribute {name!r}")
