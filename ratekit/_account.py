"""An account: a provider profile, the tier the account is on now, and what changes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._errors import LimitsError, UnknownTierError
from ._limits import Limits, check_amount
from ._profiles import Profile, Tier, load_profile

# Limiter groups: calls of models with limits of their own are limited apart.
ACCOUNT_GROUP = "account"


class Account:
    """One provider account and its current tier.

    Give the tier by name (`tier=`) or by the cumulative top-up that unlocked it
    (`top_up=`, in the profile's currency); without either the first tier is
    used. `set_tier` and `add_top_up` change it at run time (a top-up never
    downgrades); a `Scheduler` applies the change to its next admission.
    `overrides` are `Limits` fields applied to every tier's limits (say
    ``margin_s=0.05`` or an ``rpm`` your contract differs on).

    An Account is a plain value holder for one event loop; share it among tasks.
    """

    def __init__(
        self,
        profile: Profile | str,
        *,
        tier: str | None = None,
        top_up: float | None = None,
        **overrides: Any,
    ) -> None:
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        if tier is not None and top_up is not None:
            raise LimitsError("Account: give tier= or top_up=, not both")
        self._overrides = overrides
        self._top_up: float | None = None
        self._tier = self.profile.tiers[0]
        if tier is not None:
            self._tier = self.profile.tier(tier)
        elif top_up is not None:
            self._tier = self._tier_for(check_amount("Account.top_up", top_up))
            self._top_up = float(top_up)
        # Bumped on every change, so users of the limits know to fetch them again.
        self.version = 0
        self._listeners: list[Callable[[Tier, Tier], None]] = []
        self.limits(None)  # validate the overrides now, not at the first call

    def __repr__(self) -> str:
        return f"Account({self.profile.provider!r}, tier={self._tier.name!r})"

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
        self._change(self.profile.tier(name))
        return self._tier

    def add_top_up(self, amount: float) -> Tier:
        """Add a top-up; moves up to the tier the new cumulative total unlocks, never down."""
        total = (self._top_up or 0.0) + check_amount("top_up", amount)
        self._top_up = total
        reached = self.profile.tier_for_top_up(total)
        tiers = self.profile.tiers
        if reached is not None and tiers.index(reached) > tiers.index(self._tier):
            self._change(reached)
        return self._tier

    def _change(self, tier: Tier) -> None:
        old, self._tier = self._tier, tier
        self.version += 1
        for listener in list(self._listeners):
            listener(old, tier)

    def on_change(self, listener: Callable[[Tier, Tier], None]) -> None:
        """Call `listener(old, new)` whenever the tier changes."""
        self._listeners.append(listener)

    def limits(self, model: str | None = None) -> Limits:
        """The limits of the current tier for `model`, with the account's overrides."""
        return self._tier.limits(model=model, **self._overrides)

    def group(self, model: str | None) -> str:
        """Which limiter a call of `model` goes through: the model's own when it has limits
        of its own in this profile (MiniMax), else the account's."""
        if model is None:
            return ACCOUNT_GROUP
        wanted = model.casefold()
        for candidate in self.profile.models:
            if candidate.name.casefold() == wanted and candidate.limits_by_tier:
                return candidate.name
        return ACCOUNT_GROUP
