"""Provider profiles: tiers, per-model limits and prices, loaded from TOML files.

A profile is one provider's published table: the tiers in order with the cumulative
top-up (in the profile's currency) that unlocks each, the tier's concurrency, RPM, TPM
and TPD, per-model overrides of those per tier, per-model prices, hints for counting
speech characters and estimating tokens, and the HTTP APIs the provider serves with
their base URLs. Bundled profiles ship inside the package (``ratekit/profiles/*.toml``);
`load_profile` also reads a user's own file.

`parse_profile` is pure (text in, `Profile` out); only `load_profile` and
`bundled_providers` touch the file system. Every object here is an immutable value
that may be shared across tasks, threads and event loops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import types
import urllib.parse
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

from ._errors import (
    InvalidArgumentError,
    LimitsError,
    ProfileError,
    UnknownModelError,
    UnknownNameError,
    UnknownProviderError,
    UnknownTierError,
)
from ._estimate import SCRIPTS, TokenEstimate
from ._limits import DEFAULT_MARGIN_S, MAX_AMOUNT, Limits, TokenCounting, check_amount, show
from ._pricing import CharacterRules, Prices, RelayBilling, Side

CURRENCIES = ("USD", "CNY")
# "openai": OpenAI-compatible chat completions; "anthropic": the Anthropic Messages API.
API_NAMES = ("openai", "anthropic")
TPD_WINDOWS = ("rolling", "calendar")
LIMIT_KEYS = ("concurrency", "rpm", "tpm", "tpd")
LIMITS_FIELDS = tuple(f.name for f in dataclasses.fields(Limits) if f.init)

_TOP_KEYS = (
    "provider",
    "display_name",
    "currency",
    "time_zone",
    "source",
    "token_counting",
    "cache_reads_count",
    "tpd_window",
    "minimum_top_up",
    "notes",
    "apis",
    "tiers",
    "models",
    "character_counting",
    "token_estimate",
    "relay",
)
_TOP_REQUIRED = (
    "provider",
    "display_name",
    "currency",
    "time_zone",
    "source",
    "token_counting",
    "tiers",
)
_TIER_KEYS = ("name", "top_up", "top_up_above", *LIMIT_KEYS, "note")
_MODEL_KEYS = ("name", "note", "prices", "limits")
_PRICE_KEYS = (
    "input_per_1m_tokens",
    "cached_input_per_1m_tokens",
    "output_per_1m_tokens",
    "cache_write_per_1m_tokens",
    "per_10k_characters",
    "per_voice",
    "per_hour",
    "per_request",
    "per_song",
    "per_image",
    "per_second",
    "per_megapixel",
    "per_video",
)
_CHARACTER_KEYS = ("chinese", "letter", "punctuation", "other")
_ESTIMATE_KEYS = ("script", "characters", "tokens")
_RELAY_KEYS = ("cny_per_usd", "tokens_per_price_unit", "multiple_items", "field_multipliers")
_API_KEYS = ("base_url", "note")
_SIDES = ("input", "output")


@dataclass(frozen=True, slots=True)
class LimitNumbers:
    """Concurrency (calls in flight), RPM (requests / 60 s), TPM (tokens / 60 s) and
    TPD (tokens / day). On a `Tier`, `None` means unlimited; in a model's per-tier
    override, `None` means "the tier's own value"."""

    concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    tpd: float | None = None

    def merged_over(self, base: LimitNumbers) -> LimitNumbers:
        """`base` with every number this one sets replacing it."""
        changes = {k: getattr(self, k) for k in LIMIT_KEYS if getattr(self, k) is not None}
        return dataclasses.replace(base, **changes)

    def as_dict(self) -> dict[str, float | None]:
        """The four numbers by name (`None` kept)."""
        return {key: getattr(self, key) for key in LIMIT_KEYS}


@dataclass(frozen=True, slots=True)
class Model:
    """One model a profile lists: its `prices` and its per-tier limit overrides.

    `limits_by_tier` maps a tier name (as the profile spells it) to the numbers that
    replace the tier's for this model; a tier it does not name keeps the tier's limits.
    """

    name: str
    prices: Prices
    limits_by_tier: Mapping[str, LimitNumbers] = field(default_factory=dict)
    note: str = ""

    def limits_for(self, tier_name: str) -> LimitNumbers | None:
        """This model's override for `tier_name` (case-insensitive), or `None` if it has none."""
        wanted = tier_name.casefold()
        for name, numbers in self.limits_by_tier.items():
            if name.casefold() == wanted:
                return numbers
        return None


@dataclass(frozen=True, slots=True)
class Tier:
    """One rung of a provider's table.

    The tier is reached when the account's cumulative top-up (in the profile's
    currency) is at least `top_up`, or strictly above it when `top_up_inclusive` is
    false (MiniMax: "paid" is any top-up above 0). `numbers` are the tier-level limits
    (`None` = unlimited). Use `limits` to get the `Limits` a limiter enforces.
    """

    name: str
    top_up: float
    numbers: LimitNumbers
    top_up_inclusive: bool = True
    token_counting: TokenCounting = TokenCounting.SAFE
    tpd_calendar_tz: str | None = None
    provider: str = ""
    models: tuple[Model, ...] = ()
    note: str = ""

    @property
    def concurrency(self) -> int | None:
        """Tier-level cap on calls in flight; `None` means unlimited."""
        return self.numbers.concurrency

    @property
    def rpm(self) -> float | None:
        """Tier-level requests per 60 s; `None` means unlimited."""
        return self.numbers.rpm

    @property
    def tpm(self) -> float | None:
        """Tier-level tokens per 60 s; `None` means unlimited."""
        return self.numbers.tpm

    @property
    def tpd(self) -> float | None:
        """Tier-level tokens per day; `None` means unlimited."""
        return self.numbers.tpd

    def unlocked_by(self, top_up: float) -> bool:
        """Whether a cumulative top-up of `top_up` (profile currency) reaches this tier."""
        amount = check_amount("top_up", top_up)
        return amount >= self.top_up if self.top_up_inclusive else amount > self.top_up

    def limits(self, model: str | None = None, **overrides: Any) -> Limits:
        """The `Limits` of this tier, for `model` if given, with `overrides` applied last.

        With `model`, the model's per-tier overrides replace the tier's numbers. A model
        the profile does not list gets the tier's limits, unless some model of the
        profile has limit overrides (then the list is taken as complete and
        `UnknownModelError` is raised). `overrides` are any `Limits` fields (rpm=...,
        tpm=..., concurrency=..., margin_s=..., pacing=..., ...); `None` for a number
        means unlimited; `margin_s` is `DEFAULT_MARGIN_S` (50 ms) unless overridden. A
        profile whose limits are all per model (MiniMax) has no tier-level limits:
        without `model`, each number is the strictest any of its models has at this
        tier, so that a call that does not say its model is never let through where
        its model's limits would refuse it (pass `model` for that model's own).
        """
        numbers = self.numbers
        if model is not None:
            override = self._model_override(model)
            if override is not None:
                numbers = override.merged_over(numbers)
        elif numbers == LimitNumbers():
            numbers = self._strictest_model_numbers()
        unknown = [name for name in overrides if name not in LIMITS_FIELDS]
        if unknown:
            raise LimitsError(
                f"unknown Limits field {unknown[0]!r}; known: {', '.join(LIMITS_FIELDS)}"
            )
        fields: dict[str, Any] = {
            **numbers.as_dict(),
            "margin_s": DEFAULT_MARGIN_S,
            "token_counting": self.token_counting,
            "tpd_calendar_tz": self.tpd_calendar_tz if numbers.tpd is not None else None,
        }
        fields.update(overrides)
        return Limits(**fields)

    def _strictest_model_numbers(self) -> LimitNumbers:
        """Per number, the smallest any model sets at this tier (None where none does)."""
        overrides = [
            numbers
            for candidate in self.models
            if (numbers := candidate.limits_for(self.name)) is not None
        ]
        strictest: dict[str, Any] = {}
        for key in LIMIT_KEYS:
            values = [getattr(numbers, key) for numbers in overrides]
            known = [value for value in values if value is not None]
            strictest[key] = min(known) if known else None
        return LimitNumbers(**strictest)

    def _model_override(self, model: str) -> LimitNumbers | None:
        found = _named(self.models, model, "model")
        if found is not None:
            return found.limits_for(self.name)
        if any(candidate.limits_by_tier for candidate in self.models):
            names = [candidate.name for candidate in self.models]
            raise UnknownModelError(model, names, f"profile {self.provider!r}")
        return None


# What a profile finds by name: a tier or a model.
_Entry = TypeVar("_Entry", Tier, Model)


def _named(entries: Iterable[_Entry], name: str, what: str) -> _Entry | None:
    """The first of `entries` called `name`, names compared case-insensitively; `what`
    names the argument (`InvalidArgumentError` when `name` is not a string)."""
    if not isinstance(name, str):
        raise InvalidArgumentError(f"{what} must be a name (a str), got {name!r}")
    wanted = name.casefold()
    return next((entry for entry in entries if entry.name.casefold() == wanted), None)


# Hosts that never leave the machine: a base URL there may be plain http.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def base_url_problem(value: object) -> str | None:
    """Why `value` cannot be an API base URL, or `None` when it can.

    A base URL is an https URL with a host (or an http one on this machine's loopback: a
    local provider or a relay beside the client), no user or password, no query or
    fragment and no trailing "/", so that ``f"{base_url}/chat/completions"`` is the
    endpoint.
    """
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        return f"expected an https URL, got {show(value)}"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        return f"expected an https URL, got {show(value)}"
    if "@" in parts.netloc:
        return "expected no user or password in the URL"  # never echo a credential
    if not parts.hostname or any(char.isspace() for char in value):
        return f"expected an https URL with a host and no spaces, got {show(value)}"
    if parts.query or parts.fragment or "?" in value or "#" in value:
        return f"expected no query or fragment, got {show(value)}"
    if value.endswith("/"):
        return f"expected no trailing '/', got {show(value)}"
    return None


@dataclass(frozen=True, slots=True)
class ProviderApi:
    """One HTTP API the provider serves for the account, and where.

    `name` is the wire format: "openai" (OpenAI-compatible chat completions; `base_url`
    is what the OpenAI SDK's ``base_url`` takes, the endpoint is
    ``{base_url}/chat/completions``) or "anthropic" (the Anthropic Messages API;
    `base_url` is what the Anthropic SDK's ``base_url`` takes, the SDK adds
    ``/v1/messages``). `note` says what the provider's docs restrict (which models).
    """

    name: str
    base_url: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Profile:
    """A provider's published limits and prices.

    `currency` ("USD" or "CNY") is the unit of every top-up and price. `time_zone` is
    the provider's IANA zone, used for TPD when `tpd_window` is "calendar" (TPD resets
    at local midnight); with "rolling", TPD is any 24 hours. `token_counting` says when
    tokens count (see `TokenCounting`). `cache_reads_count` says whether input tokens
    read from the provider's prompt cache count toward its token rates (TPM, TPD):
    true (the default, and the safe choice) unless the provider's page says they do
    not; cache writes are input tokens and always count. `minimum_top_up` is what the
    provider requires before any use (`None`: the page names none). `apis` maps each API
    the provider serves (`API_NAMES`: "openai", "anthropic") to its `ProviderApi`; an
    API the profile does not list is one whose URL the docs do not give or that the
    provider does not serve (`with_base_url` adds yours). `source` names the provider
    page the numbers came from and when it was read; `path` is the file this profile
    was read from.
    """

    provider: str
    display_name: str
    currency: str
    time_zone: str
    source: str
    token_counting: TokenCounting
    tiers: tuple[Tier, ...]
    models: tuple[Model, ...] = ()
    tpd_window: str = "rolling"
    cache_reads_count: bool = True
    minimum_top_up: float | None = None
    apis: Mapping[str, ProviderApi] = field(default_factory=lambda: types.MappingProxyType({}))
    character_rules: CharacterRules | None = None
    token_estimate: TokenEstimate | None = None
    relay: RelayBilling | None = None
    notes: tuple[str, ...] = ()
    path: str = ""

    @property
    def tier_names(self) -> tuple[str, ...]:
        """The tier names in order, as the profile spells them."""
        return tuple(tier.name for tier in self.tiers)

    @property
    def model_names(self) -> tuple[str, ...]:
        """The listed model names in file order."""
        return tuple(model.name for model in self.models)

    @property
    def api_names(self) -> tuple[str, ...]:
        """The names of the APIs the profile lists, in file order."""
        return tuple(self.apis)

    def api(self, name: str) -> ProviderApi:
        """The API `name` ("openai", "anthropic"; case-insensitive) the provider serves.

        An API the profile does not list raises `UnknownNameError` naming those it does.
        """
        found = self.apis.get(name.casefold()) if isinstance(name, str) else None
        if found is None:
            where = f"the APIs of profile {self.provider!r}"
            if not self.api_names:
                where += " (its page names no host: give yours with profile.with_base_url)"
            raise UnknownNameError(name, self.api_names, where)
        return found

    def base_url(self, api: str) -> str:
        """The base URL of API `api` (see `ProviderApi`); `UnknownNameError` if not listed."""
        return self.api(api).base_url

    def with_base_url(self, api: str, base_url: str) -> Profile:
        """A copy whose API `api` ("openai" or "anthropic") is served at `base_url`.

        Adds the API when the profile does not list it (a relay's host is the user's
        own), else replaces its URL and keeps its note. `base_url` must be an https URL
        without a trailing "/" (`InvalidArgumentError` otherwise).
        """
        wanted = api.casefold() if isinstance(api, str) else api
        if wanted not in API_NAMES:
            raise UnknownNameError(api, API_NAMES, "the APIs ratekit knows")
        problem = base_url_problem(base_url)
        if problem is not None:
            raise InvalidArgumentError(f"with_base_url: base_url: {problem}")
        old = self.apis.get(wanted)
        new = ProviderApi(wanted, base_url, old.note if old is not None else "")
        apis = types.MappingProxyType({**self.apis, wanted: new})
        return dataclasses.replace(self, apis=apis)

    def tier(self, name: str) -> Tier:
        """The tier called `name` (case-insensitive); `UnknownTierError` lists the others."""
        found = _named(self.tiers, name, "tier")
        if found is None:
            raise UnknownTierError(name, self.tier_names, f"profile {self.provider!r}")
        return found

    def tier_for_top_up(self, top_up: float) -> Tier | None:
        """The highest tier a cumulative top-up of `top_up` (profile currency) reaches.

        `None` means the amount reaches no tier: the account cannot be used yet
        (Moonshot needs at least 1 USD). A negative or non-finite amount raises
        `InvalidCostError`.
        """
        check_amount("top_up", top_up)
        reached = [tier for tier in self.tiers if tier.unlocked_by(top_up)]
        return reached[-1] if reached else None

    def model(self, name: str) -> Model:
        """The listed model `name` (case-insensitive); `UnknownModelError` lists the others."""
        found = _named(self.models, name, "model")
        if found is None:
            raise UnknownModelError(name, self.model_names, f"profile {self.provider!r}")
        return found

    def with_overrides(self, tier: str, **numbers: int | float | None) -> Profile:
        """A copy whose tier `tier` has some tier-level numbers replaced.

        `numbers` are concurrency, rpm, tpm and tpd; `None` makes that one unlimited.
        Use it when an account has limits other than the published ones.
        """
        target = self.tier(tier)
        unknown = [key for key in numbers if key not in LIMIT_KEYS]
        if unknown:
            raise LimitsError(f"unknown tier limit {unknown[0]!r}; known: {', '.join(LIMIT_KEYS)}")
        new_numbers = dataclasses.replace(target.numbers, **numbers)  # type: ignore[arg-type]
        Limits(**new_numbers.as_dict())  # type: ignore[arg-type]  # validates the values
        new_tier = dataclasses.replace(target, numbers=new_numbers)
        tiers = tuple(new_tier if t is target else t for t in self.tiers)
        return dataclasses.replace(self, tiers=tiers)


# --- validation ----------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _choices(values: Iterable[str]) -> str:
    return ", ".join(repr(value) for value in values)


@dataclass(frozen=True, slots=True)
class _Reader:
    """Reads typed values out of parsed TOML, raising `ProfileError` naming `source`."""

    source: str

    def fail(self, path: str, message: str) -> NoReturn:
        raise ProfileError(self.source, path, message)

    def table(self, value: object, path: str, allowed: Iterable[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {value!r}")
        allowed = tuple(allowed)
        for key in value:
            if key not in allowed:
                self.fail(_join(path, key), f"unknown key {key!r}; allowed: {', '.join(allowed)}")
        return cast(dict[str, Any], value)

    def require(self, data: Mapping[str, Any], path: str, keys: Iterable[str]) -> None:
        for key in keys:
            if key not in data:
                self.fail(_join(path, key), "required key is missing")

    def unique_name(
        self, seen: dict[str, tuple[str, str]], name: str, path: str, what: str
    ) -> None:
        """Fail when `name`, of the entry at `path`, repeats the name of an earlier entry
        (names are case-insensitive), else remember it in `seen` (folded name: the entry's
        path and name). `what` is whose names they are ("tier", "model")."""
        first_path, first_name = seen.setdefault(name.casefold(), (path, name))
        if first_path != path:
            self.fail(
                _join(path, "name"),
                f"{name!r} duplicates {first_path}.name {first_name!r} "
                f"({what} names are case-insensitive)",
            )

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, value: object, path: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        if value not in choices:
            self.fail(path, f"expected one of {_choices(choices)}, got {value!r}")
        return str(value)

    def number(self, value: object, path: str, *, positive: bool) -> float:
        bad = isinstance(value, bool) or not isinstance(value, int | float)
        if not bad:
            try:
                amount = float(cast(float, value))
            except OverflowError:
                amount = math.inf
            bad = not math.isfinite(amount) or amount < 0 or (positive and amount == 0)
            if not bad and amount > MAX_AMOUNT:
                self.fail(path, f"expected a number up to {MAX_AMOUNT:g}, got {show(value)}")
        if bad:
            kind = "a positive" if positive else "a non-negative"
            self.fail(path, f"expected {kind} number, got {show(value)}")
        return cast(float, value)  # an int stays an int, so 500 reads back as 500

    def integer(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(path, f"expected a positive integer, got {value!r}")
        if value > MAX_AMOUNT:
            self.fail(path, f"expected an integer up to {MAX_AMOUNT:g}, got {show(value)}")
        return value

    def array(self, value: object, path: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected an array, got {value!r}")
        return value

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {value!r}")
        return value


def _read_numbers(reader: _Reader, data: Mapping[str, Any], path: str) -> LimitNumbers:
    def limit(key: str) -> float | None:
        if key not in data:
            return None
        return reader.number(data[key], _join(path, key), positive=True)

    concurrency = data.get("concurrency")
    return LimitNumbers(
        concurrency=None
        if concurrency is None
        else reader.integer(concurrency, _join(path, "concurrency")),
        rpm=limit("rpm"),
        tpm=limit("tpm"),
        tpd=limit("tpd"),
    )


def _read_threshold(reader: _Reader, data: Mapping[str, Any], path: str) -> tuple[float, bool]:
    if "top_up" in data and "top_up_above" in data:
        reader.fail(path, "give top_up or top_up_above, not both")
    if "top_up_above" in data:
        above = reader.number(data["top_up_above"], _join(path, "top_up_above"), positive=False)
        return above, False
    reader.require(data, path, ["top_up"])
    return reader.number(data["top_up"], _join(path, "top_up"), positive=False), True


def _threshold_label(tier: Tier) -> str:
    key = "top_up" if tier.top_up_inclusive else "top_up_above"
    return f"{key} {tier.top_up:g}"


def _check_tier_order(reader: _Reader, tiers: list[Tier]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for index, tier in enumerate(tiers):
        path = _join("tiers", index)
        reader.unique_name(seen, tier.name, path, "tier")
        if index == 0:
            continue
        previous = tiers[index - 1]
        key = "top_up" if tier.top_up_inclusive else "top_up_above"
        order = (tier.top_up, not tier.top_up_inclusive)
        if order <= (previous.top_up, not previous.top_up_inclusive):
            reader.fail(
                _join(path, key),
                f"{tier.top_up:g} does not come after tiers[{index - 1}] "
                f"({_threshold_label(previous)}); list tiers in strictly increasing top-up order",
            )


def _read_tiers(reader: _Reader, value: object) -> list[tuple[str, float, bool, LimitNumbers, str]]:
    rows = reader.array(value, "tiers")
    if not rows:
        reader.fail("tiers", "expected at least one tier, got []")
    tiers = []
    for index, row in enumerate(rows):
        path = _join("tiers", index)
        data = reader.table(row, path, _TIER_KEYS)
        reader.require(data, path, ["name"])
        name = reader.string(data["name"], _join(path, "name"))
        top_up, inclusive = _read_threshold(reader, data, path)
        numbers = _read_numbers(reader, data, path)
        note = reader.string(data["note"], _join(path, "note")) if "note" in data else ""
        tiers.append((name, top_up, inclusive, numbers, note))
    return tiers


def _read_prices(reader: _Reader, value: object, path: str, model: str) -> Prices:
    data = reader.table(value, path, _PRICE_KEYS)
    amounts: dict[str, Any] = {}
    for key, raw in data.items():
        if key == "per_video":
            video_path = _join(path, key)
            if not isinstance(raw, dict) or not raw:
                reader.fail(video_path, f"expected a table of variant = price, got {raw!r}")
            amounts[key] = {
                variant: reader.number(price, _join(video_path, variant), positive=False)
                for variant, price in raw.items()
            }
        else:
            amounts[key] = reader.number(raw, _join(path, key), positive=False)
    return Prices(model=model, **amounts)


def _read_model_limits(
    reader: _Reader, value: object, path: str, tier_names: tuple[str, ...]
) -> dict[str, LimitNumbers]:
    if not isinstance(value, dict):
        reader.fail(path, f"expected a table of tier = limits, got {value!r}")
    by_folded = {name.casefold(): name for name in tier_names}
    limits: dict[str, LimitNumbers] = {}
    for tier_name, row in value.items():
        tier_path = _join(path, tier_name)
        if tier_name.casefold() not in by_folded:
            reader.fail(tier_path, f"unknown tier {tier_name!r}; tiers: {', '.join(tier_names)}")
        data = reader.table(row, tier_path, LIMIT_KEYS)
        limits[by_folded[tier_name.casefold()]] = _read_numbers(reader, data, tier_path)
    return limits


def _read_models(reader: _Reader, value: object, tier_names: tuple[str, ...]) -> list[Model]:
    models: list[Model] = []
    seen: dict[str, tuple[str, str]] = {}
    for index, row in enumerate(reader.array(value, "models")):
        path = _join("models", index)
        data = reader.table(row, path, _MODEL_KEYS)
        reader.require(data, path, ["name"])
        name = reader.string(data["name"], _join(path, "name"))
        reader.unique_name(seen, name, path, "model")
        prices = _read_prices(reader, data.get("prices", {}), _join(path, "prices"), name)
        limits = {}
        if "limits" in data:
            limits = _read_model_limits(reader, data["limits"], _join(path, "limits"), tier_names)
        note = reader.string(data["note"], _join(path, "note")) if "note" in data else ""
        models.append(Model(name=name, prices=prices, limits_by_tier=limits, note=note))
    return models


def _read_character_rules(reader: _Reader, value: object) -> CharacterRules:
    data = reader.table(value, "character_counting", _CHARACTER_KEYS)
    weights = {
        key: reader.number(raw, _join("character_counting", key), positive=False)
        for key, raw in data.items()
    }
    return CharacterRules(**weights)


def _read_token_estimate(reader: _Reader, value: object) -> TokenEstimate:
    path = "token_estimate"
    data = reader.table(value, path, _ESTIMATE_KEYS)
    reader.require(data, path, _ESTIMATE_KEYS)
    script = reader.choice(data["script"], _join(path, "script"), SCRIPTS)
    characters = reader.integer(data["characters"], _join(path, "characters"))
    tokens = reader.integer(data["tokens"], _join(path, "tokens"))
    return TokenEstimate(script=script, characters=characters, tokens=tokens)  # type: ignore[arg-type]


def _read_relay(reader: _Reader, value: object) -> RelayBilling:
    path = "relay"
    data = reader.table(value, path, _RELAY_KEYS)
    reader.require(data, path, ["cny_per_usd", "tokens_per_price_unit"])
    items_path = _join(path, "multiple_items")
    items_raw = data.get("multiple_items", {})
    if not isinstance(items_raw, dict):
        reader.fail(items_path, f"expected a table of item = side, got {items_raw!r}")
    items = {
        item: cast(Side, reader.choice(side, _join(items_path, item), _SIDES))
        for item, side in items_raw.items()
    }
    fields_path = _join(path, "field_multipliers")
    fields_raw = data.get("field_multipliers", {})
    if not isinstance(fields_raw, dict):
        reader.fail(fields_path, f"expected a table of field = multiplier, got {fields_raw!r}")
    fields = {
        name: reader.number(raw, _join(fields_path, name), positive=True)
        for name, raw in fields_raw.items()
    }
    return RelayBilling(
        cny_per_usd=reader.number(data["cny_per_usd"], _join(path, "cny_per_usd"), positive=True),
        tokens_per_price_unit=reader.integer(
            data["tokens_per_price_unit"], _join(path, "tokens_per_price_unit")
        ),
        multiple_items=items,
        field_multipliers=fields,
    )


def _read_apis(reader: _Reader, value: object) -> Mapping[str, ProviderApi]:
    apis: dict[str, ProviderApi] = {}
    for name, row in reader.table(value, "apis", API_NAMES).items():
        path = _join("apis", name)
        data = reader.table(row, path, _API_KEYS)
        reader.require(data, path, ["base_url"])
        problem = base_url_problem(data["base_url"])
        if problem is not None:
            reader.fail(_join(path, "base_url"), problem)
        note = reader.string(data["note"], _join(path, "note")) if "note" in data else ""
        apis[name] = ProviderApi(name=name, base_url=data["base_url"], note=note)
    return types.MappingProxyType(apis)


def _read_time_zone(reader: _Reader, value: object) -> str:
    zone = reader.string(value, "time_zone")
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        reader.fail("time_zone", f"unknown time zone {zone!r}")
    return zone


def _read_notes(reader: _Reader, value: object) -> tuple[str, ...]:
    return tuple(
        reader.string(note, _join("notes", index))
        for index, note in enumerate(reader.array(value, "notes"))
    )


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        where = f"line {found.group(1)}" if found else "toml"
        raise ProfileError(source, where, f"invalid TOML: {exc}") from None


def parse_profile(text: str, source: str = "<string>") -> Profile:
    """Parse and validate a profile from TOML `text`; `source` names it in errors.

    Pure: no I/O. Every problem raises `ProfileError` naming `source`, the field path
    (``tiers[2].rpm``) and the offending value.
    """
    reader = _Reader(source)
    data = reader.table(_parse_toml(text, source), "", _TOP_KEYS)
    reader.require(data, "", _TOP_REQUIRED)
    provider = reader.string(data["provider"], "provider")
    counting = TokenCounting(
        reader.choice(data["token_counting"], "token_counting", [m.value for m in TokenCounting])
    )
    window = reader.choice(data.get("tpd_window", "rolling"), "tpd_window", TPD_WINDOWS)
    time_zone = _read_time_zone(reader, data["time_zone"])
    raw_tiers = _read_tiers(reader, data["tiers"])
    tier_names = tuple(row[0] for row in raw_tiers)
    models = tuple(_read_models(reader, data.get("models", []), tier_names))
    tiers = [
        Tier(
            name=name,
            top_up=top_up,
            top_up_inclusive=inclusive,
            numbers=numbers,
            token_counting=counting,
            tpd_calendar_tz=time_zone if window == "calendar" else None,
            provider=provider,
            models=models,
            note=note,
        )
        for name, top_up, inclusive, numbers, note in raw_tiers
    ]
    _check_tier_order(reader, tiers)
    minimum = data.get("minimum_top_up")
    return Profile(
        provider=provider,
        display_name=reader.string(data["display_name"], "display_name"),
        currency=reader.choice(data["currency"], "currency", CURRENCIES),
        time_zone=time_zone,
        source=reader.string(data["source"], "source"),
        token_counting=counting,
        tiers=tuple(tiers),
        models=models,
        tpd_window=window,
        cache_reads_count=reader.boolean(data.get("cache_reads_count", True), "cache_reads_count"),
        minimum_top_up=None
        if minimum is None
        else reader.number(minimum, "minimum_top_up", positive=False),
        apis=_read_apis(reader, data["apis"]) if "apis" in data else types.MappingProxyType({}),
        character_rules=_read_character_rules(reader, data["character_counting"])
        if "character_counting" in data
        else None,
        token_estimate=_read_token_estimate(reader, data["token_estimate"])
        if "token_estimate" in data
        else None,
        relay=_read_relay(reader, data["relay"]) if "relay" in data else None,
        notes=_read_notes(reader, data["notes"]) if "notes" in data else (),
        path=source,
    )


# --- files ---------------------------------------------------------------------------


def _profile_dirs() -> tuple[Path, ...]:
    """Where bundled profiles live: inside the installed package, else the source checkout."""
    package = Path(__file__).parent
    candidates = (package / "profiles", package.parent / "profiles")
    return tuple(path for path in candidates if path.is_dir())


def _bundled_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for directory in _profile_dirs():
        for path in sorted(directory.glob("*.toml")):
            files.setdefault(path.stem.casefold(), path)
    return files


def bundled_providers() -> tuple[str, ...]:
    """The names of the bundled provider profiles, sorted."""
    return tuple(sorted(_bundled_files()))


def load_profile_file(path: str | Path) -> Profile:
    """Read and validate the profile in the TOML file at `path`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(source, "file", f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(source, "file", f"is not UTF-8: {exc.reason}") from None
    return parse_profile(text, source)


@functools.cache
def _load_bundled(name: str) -> Profile:
    files = _bundled_files()
    if name not in files:
        raise UnknownProviderError(name, sorted(files))
    return load_profile_file(files[name])


def _looks_like_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name or "\\" in name


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by provider name (case-insensitive), or the profile in a file.

    A `Path`, or a string ending in ``.toml`` or containing a path separator, is read
    as a file; any other string is a bundled name (`UnknownProviderError` lists them).
    Bundled profiles are read once and cached (they are immutable).
    """
    if isinstance(name_or_path, Path) or _looks_like_path(name_or_path):
        return load_profile_file(name_or_path)
    try:
        return _load_bundled(name_or_path.casefold())
    except UnknownProviderError as exc:
        raise UnknownProviderError(name_or_path, exc.known) from None
