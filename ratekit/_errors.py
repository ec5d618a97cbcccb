"""The typed errors ratekit raises; each message says what is wrong and where."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path


class RatekitError(Exception):
    """Base class of every error ratekit raises on purpose."""


class InvalidCostError(RatekitError, ValueError):
    """A cost (requests, tokens, money) or a limit is negative, NaN, infinite or of a wrong type."""


class LimitsError(RatekitError, ValueError):
    """A `Rate`, `Limits`, limiter or backend was configured with values that cannot work."""


class CostExceedsLimitError(RatekitError, ValueError):
    """A single call costs more than a rate's whole limit, so no wait could ever admit it."""

    def __init__(self, dimension: str, cost: float, limit: float) -> None:
        self.dimension = dimension
        self.cost = cost
        self.limit = limit
        super().__init__(
            f"{dimension}: a cost of {cost:g} can never be admitted, the whole limit is {limit:g}"
        )


# The dimension of an `AcquireTimeout` whose deadline passed with a round trip to a
# shared backend still on its way (a hung or overloaded server).
NO_REPLY = "reply"


class AcquireTimeout(RatekitError, TimeoutError):
    """The permit could not be granted before the caller's deadline.

    Raised as soon as the predicted wait is known to be longer than the time left,
    not after sleeping until the deadline. `retry_after_s` is the predicted wait
    from the moment of refusal (a lower bound: other callers may take the capacity).
    A concurrency slot's wait is no prediction (a release may come any time): inf in
    process; on a shared backend, the time until the oldest lease lapses should its
    holder have died (it frees sooner when a call ends).
    """

    def __init__(self, timeout_s: float, retry_after_s: float, dimension: str) -> None:
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.dimension = dimension
        if dimension == NO_REPLY:
            reason = "the shared backend had not replied"
        elif dimension == "queue":
            if math.isinf(retry_after_s):
                reason = "still queued behind earlier callers"
            else:
                reason = f"the caller ahead in the queue is admitted in {retry_after_s:.3f} s"
        elif math.isinf(retry_after_s):
            reason = f"{dimension} frees up only when a call in flight ends"
        elif dimension.endswith("concurrency"):
            reason = (
                f"{dimension} frees up when a call in flight ends (at the latest in "
                f"{retry_after_s:.3f} s, when the oldest lease lapses if its holder died)"
            )
        else:
            reason = f"{dimension} frees up in {retry_after_s:.3f} s"
        super().__init__(f"no permit within {timeout_s:g} s: {reason}")


class BackendUnavailableError(RatekitError, ConnectionError):
    """The shared backend (Redis) cannot be reached and the policy is to fail closed."""


class QueueFullError(RatekitError):
    """The limiter's queue already holds its maximum number of waiting callers."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        super().__init__(f"the queue is full: {max_size} callers already wait")


class NoEventLoopError(RatekitError, RuntimeError):
    """A synchronous call site has no event loop to run the scheduler in."""


class PermitError(RatekitError, RuntimeError):
    """A permit was used the wrong way (settled twice, settled after release)."""


class ProfileError(RatekitError, ValueError):
    """A profile file is malformed; names the file, the field and the offending value."""

    def __init__(self, source: str | Path, field: str, message: str) -> None:
        self.source = str(source)
        self.field = field
        super().__init__(f"{self.source}: {field}: {message}")


class UnknownNameError(RatekitError, LookupError):
    """A provider, tier or model name that does not exist; the message lists those that do."""

    kind = "name"

    def __init__(self, name: str, known: Iterable[str], where: str = "") -> None:
        self.name = name
        self.known = tuple(known)
        place = f" in {where}" if where else ""
        listing = ", ".join(self.known) if self.known else "none"
        super().__init__(f"unknown {self.kind} {name!r}{place}; known: {listing}")

    def __str__(self) -> str:  # LookupError would quote the message otherwise
        return str(self.args[0])


class UnknownProviderError(UnknownNameError):
    """No bundled or given profile has this provider name."""

    kind = "provider"


class UnknownTierError(UnknownNameError):
    """The profile has no tier of this name."""

    kind = "tier"


class UnknownModelError(UnknownNameError):
    """The profile has no model of this name."""

    kind = "model"


class UnknownBillingItemError(UnknownNameError):
    """A relay rate-multiple item (cache, input_audio, ...) the relay profile does not list."""

    kind = "billing item"


class MissingPriceError(RatekitError, LookupError):
    """The model has no price for what was asked (no output price, no such video variant)."""


class WrongEventLoopError(RatekitError, RuntimeError):
    """A limiter, scheduler or shared backend used from an event loop other than its own.

    Each belongs to the loop it was first used in; build one per loop, or call
    from threads through `ratekit.SyncScheduler`.
    """


class InvalidArgumentError(RatekitError, TypeError, ValueError):
    """An argument of the wrong type or out of range, named with where it was given."""


class LimitsTypeError(InvalidArgumentError, LimitsError):
    """A `Rate` or `Limits` field (or a `Limits` method's argument) of the wrong type.

    Both an `InvalidArgumentError`, as every wrong type is, and a `LimitsError`, as
    every bad `Rate` or `Limits` value always was, so either ``except`` catches it.
    """


class MissingExtraError(RatekitError, ImportError):
    """A part of ratekit needs a package that is not installed; names the extra to install."""

    def __init__(self, what: str, package: str, extra: str) -> None:
        super().__init__(
            f"{what} needs the {package!r} package, which is not installed: "
            f"pip install 'ratekit[{extra}]'",
            name=package,
        )
        self.extra = extra


class PoolExhaustedError(RatekitError):
    """Every account of the pool that serves the model is out: its quota or balance is
    spent (the provider said so). `retry_after_s` is when the first of them is tried
    again; the last provider error is the `__cause__`."""

    def __init__(self, model: str | None, out: Mapping[str, str], retry_after_s: float) -> None:
        self.model = model
        self.out = dict(out)
        self.retry_after_s = retry_after_s
        reasons = "; ".join(f"{name}: {reason}" for name, reason in out.items())
        what = "the pool" if model is None else f"model {model!r}"
        super().__init__(
            f"every account of {what} is out ({reasons}); the first is tried again in "
            f"{retry_after_s:.0f} s"
        )
