"""ratekit: a client-side rate limiter and quota-aware request scheduler for LLM APIs.

Start with `Account` (a provider's profile and your tier), `Scheduler` (calls
admitted within that tier, queued, retried) and `wrap` (an SDK client whose every
request is admitted); `Limiter` gives admissions for `Limits` of your own.

The top level holds what applications call. The rest has a public home of its own:

- `ratekit.errors`: every error type (the common ones are also here);
- `ratekit.events`: what hooks receive;
- `ratekit.pools`: the parts of a `Pool` of accounts (members, served calls, statistics);
- `ratekit.providers`: profiles, tiers, models, prices, relay billing;
- `ratekit.tokens`: token estimators and counts;
- `ratekit.statistics`: the statistics snapshots;
- `ratekit.clock`: clocks; `ratekit.backends`: the backend interface;
- `ratekit.testing`: test doubles (`FakeClock`, the strict mock provider, Redis servers);
- `ratekit.metrics`: Prometheus and OpenTelemetry exporters.

`RedisBackend` (the ``redis`` extra) and `RateLimitedTransport` (the ``httpx`` extra)
are imported on first use (``ratekit.RedisBackend``, ``from ratekit import
RedisBackend``) and are not in ``__all__``, so that ``from ratekit import *`` works
without the extras; without its extra, each raises `MissingExtraError` naming it.
"""

from typing import TYPE_CHECKING

# The public submodules, so that ``import ratekit`` gives ``ratekit.errors.X`` and the rest.
from . import backends as backends
from . import clock as clock
from . import errors as errors
from . import events as events
from . import pools as pools
from . import providers as providers
from . import statistics as statistics
from . import tokens as tokens
from ._account import Account
from ._admission import Admission
from ._errors import (
    AcquireTimeout,
    BackendUnavailableError,
    CostExceedsLimitError,
    InvalidArgumentError,
    MissingExtraError,
    QueueFullError,
    RatekitError,
)
from ._events import Event, Hook, LoggingHook
from ._limiter import Limiter
from ._limits import Limits, Rate, TokenCounting
from ._pool import Pool
from ._profiles import Profile, Tier, bundled_providers, load_profile
from ._scheduler import Scheduler, Slot
from ._signals import RateLimitSignal, classify
from ._tenants import Tenant, Tenants, tenant
from .backends import MemoryBackend
from .integrations._counts import TokenCounts
from .integrations._sync_scheduler import SyncScheduler
from .integrations._wrap import wrap

if TYPE_CHECKING:  # for type checkers; imported on first use (see `__getattr__`)
    from .backends.redis import RedisBackend as RedisBackend
    from .integrations._httpx import RateLimitedTransport as RateLimitedTransport

__all__ = [
    "Account",
    "AcquireTimeout",
    "Admission",
    "BackendUnavailableError",
    "CostExceedsLimitError",
    "Event",
    "Hook",
    "InvalidArgumentError",
    "Limiter",
    "Limits",
    "LoggingHook",
    "MemoryBackend",
    "MissingExtraError",
    "Pool",
    "Profile",
    "QueueFullError",
    "Rate",
    "RateLimitSignal",
    "RatekitError",
    "Scheduler",
    "Slot",
    "SyncScheduler",
    "Tenant",
    "Tenants",
    "Tier",
    "TokenCounting",
    "TokenCounts",
    "bundled_providers",
    "classify",
    "load_profile",
    "tenant",
    "wrap",
]

__version__ = "0.1.0"


def _warn_if_shadowed() -> None:
    """A compiled build compiles in place (README, "Install"): in a source checkout, its
    modules are imported instead of the .py files beside them, and edits are ignored."""
    from pathlib import Path

    from . import _limiter

    module = Path(_limiter.__file__ or "")
    if module.suffix != ".py" and (module.parent.parent / "pyproject.toml").is_file():
        import warnings

        warnings.warn(
            f"ratekit: compiled modules in the source checkout {module.parent} are imported "
            "instead of its .py files; delete them: rm ratekit/*.so ratekit/backends/*.so",
            RuntimeWarning,
            stacklevel=2,
        )


_warn_if_shadowed()


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
