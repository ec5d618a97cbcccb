"""An account: a provider profile, the tier the account is on now, and what changes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import InvalidArgumentError, LimitsError, UnknownTierError
from ._limits import MAX_AMOUNT, Limits, check_number, show
from ._profiles import Profile, Tier, load_profile

# Limiter groups: calls of models with limits of their own are limited apart.
ACCOUNT_GROUP = "account"


def _check_top_up(where: str, value: object) -> float:
    """A top-up in the profile's currency, in [0, 1e15]: wrong types are
    `InvalidArgumentError`, numbers out of range `LimitsError`."""
    return check_number(
        where, value, positive=False, high=MAX_AMOUNT, type_error=InvalidArgumentError
    )


def _model_error(where: str, model: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where} must be a model name (a str) or None, got {show(model)}")


class Account:
    """One provider account and its current tier.

    `profile` is a `Profile`, a bundled provider's name or the path of a profile
    file. Give the tier by name (`tier=`) or by the cumulative top-up that unlocked
    it (`top_up=`, in the profile's currency, in [0, 1e15]); without either the first
    tier is used. `set_tier` and `add_top_up` change it at run time (a top-up never
    downgrades); a `Scheduler` applies the change to its next admission.
    `overrides` are `Limits` fields applied to every tier's limits (say
    ``margin_s=0.05`` or an ``rpm`` your contract differs on); they are checked at
    once against every tier and every model with limits of its own.

    Every argument is checked where it is given: a wrong type raises
    `InvalidArgumentError`, a number out of range `LimitsError`, an unknown tier
    `UnknownTierError`; each names the argument and the value.

    An Account is a plain value holder for one event loop; share it among tasks.
    """

    def __init__(
        self,
        profile: Profile | str | Path,
        *,
        tier: str | None = None,
        top_up: float | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(profile, Profile | str | Path):
            raise InvalidArgumentError(
                "Account.profile must be a Profile, a provider name or a profile file's "
                f"path, got {show(profile)}"
            )
        if tier is not None and not isinstance(tier, str):
            raise InvalidArgumentError(
                f"Account.tier must be a tier name (a str) or None, got {show(tier)}"
            )
        amount = None if top_up is None else _check_top_up("Account.top_up", top_up)
        if tier is not None and amount is not None:
            raise LimitsError("Account: give tier= or top_up=, not both")
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self._overrides = overrides
        self._top_up: float | None = None
        self._tier = self.profile.tiers[0]
        if tier is not None:
            self._tier = self.profile.tier(tier)
        elif amount is not None:
            self._tier = self._tier_for(amount)
            self._top_up = amount
        # Bumped on every change, so users of the limits know to fetch them again.
        self.version = 0
        self._listeners: list[Callable[[Tier, Tier], None]] = []
        self._check_overrides()

    def __repr__(self) -> str:
        return f"Account({self.profile.provider!r}, tier={self._tier.name!r})"

    def _check_overrides(self) -> None:
        """Validate the overrides now, not at the first call or the next tier change."""
        self.limits(None)  # the limits in force first: their errors read as before
        for tier in self.profile.tiers:
            models = [m.name for m in self.profile.models if m.limits_for(tier.name)]
            for model in (None, *models):
                try:
                    tier.limits(model=model, **self._overrides)
                except LimitsError as exc:
                    what = f"tier {tier.name!r}" + (f", model {model!r}" if model else "")
                    raise LimitsError(f"Account overrides with {what}: {exc}") from None

    @property
    def tier(self) -> Tier:
        """The tier in force."""
        return self._tier

    @property
    def top_up(self) -> float | None:
        """The cumulative top-up, when the account was given one."""
        return self._top_up

    def _tier_for(self, top_up: float) -> Tier:
        tier = self.profile.tier_for_top_up(top_up)
        if tier is None:
            first = self.profile.tiers[0]
            raise UnknownTierError(
                f"top-up {top_up:g} {self.profile.currency}",
                [f"{first.name} from {first.top_up:g}"],
                f"profile {self.profile.provider!r}",
            )
        return tier

    def set_tier(self, name: str) -> Tier:
        """Move to the tier called `name` (case-insensitive); returns it."""
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"Account.set_tier(name) must be a tier name (a str), got {show(name)}"
            )
        self._change(self.profile.tier(name))
        return self._tier

    def add_top_up(self, amount: float) -> Tier:
        """Add a top-up (in [0, 1e15]); moves up to the tier the new cumulative total
        unlocks, never down. A total above 1e15 raises `LimitsError` and changes nothing."""
        added = _check_top_up("Account.add_top_up(amount)", amount)
        total = (self._top_up or 0.0) + added
        if total > MAX_AMOUNT:
            raise LimitsError(
                f"Account.add_top_up(amount) {show(amount)} would bring the cumulative "
                f"top-up to {show(total)}, above {MAX_AMOUNT:g}"
            )
        self._top_up = total
        reached = self.profile.tier_for_top_up(total)
        tiers = self.profile.tiers
        if reached is not None and tiers.index(reached) > tiers.index(self._tier):
            self._change(reached)
        return self._tier

    def _change(self, tier: Tier) -> None:
        if tier is self._tier:
            return  # the tier in force already: nothing changes, nobody is told
        old, self._tier = self._tier, tier
        self.version += 1
        for listener in list(self._listeners):
            listener(old, tier)

    def on_change(self, listener: Callable[[Tier, Tier], None]) -> None:
        """Call `listener(old, new)` whenever the tier changes."""
        if not callable(listener):
            raise InvalidArgumentError(
                f"Account.on_change(listener) must be callable, got {show(listener)}"
            )
        self._listeners.append(listener)

    def limits(self, model: str | None = None) -> Limits:
        """The limits of the current tier for `model`, with the account's overrides."""
        if model is not None and not isinstance(model, str):
            raise _model_error("Account.limits(model)", model)
        return self._tier.limits(model=model, **self._overrides)

    def group(self, model: str | None) -> str:
        """Which limiter a call of `model` goes through: the model's own when it has limits
        of its own in this profile (MiniMax), else the account's."""
        if model is None:
            return ACCOUNT_GROUP
        try:
            wanted = model.casefold()
        except AttributeError:  # checked only on failure: this runs on every call
            raise _model_error("Account.group(model)", model) from None
        for candidate in self.profile.models:
            if candidate.name.casefold() == wanted and candidate.limits_by_tier:
                return candidate.name
        return ACCOUNT_GROUP
