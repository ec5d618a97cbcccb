"""Planning a batch before running it: how long a workload takes at a tier, what it costs.

Pure functions, no I/O and no clock: a workload (requests and their tokens) and a
profile in, numbers out. ``ratekit plan`` prints them.

Time. For each limit the plan computes the least time the workload needs under that
limit alone, by the window contract every ratekit backend implements (see DESIGN.md):
a rate of ``N`` per ``P`` seconds admits ``N`` at once and ``N`` more each ``P``, so an
amount ``T`` needs at least ``ceil(T / N - 1) x P`` seconds before its last admission,
and the last call then runs for the mean call duration. Requests are indivisible: a
window admits whole requests, in order (ratekit's queue is FIFO), so tokens are packed
next-fit (for equal requests, ``floor(N / tokens_each)`` a window; with one-token or
one-request amounts this is exactly the formula above). A request larger than ``N`` can
never be admitted. A concurrency cap ``C`` with calls of ``D`` seconds needs
``ceil(requests / C) x D``. The workload takes at least the longest of these: that
limit is the *binding* one. Each number is a lower bound: limits interact, and
ratekit's own enforcement is a little more conservative than the provider's window (an
admission counts until the end of its slice plus ``P``, one slice being ``P / 60``, and
under ``usage`` or ``safe`` token counting a call's tokens are held while it runs).

Cost. Prompt tokens are split by a cache-hit share into cached and uncached input;
output tokens are the requests' maximum output (the most the batch can cost). Profile
prices are per 1,000,000 tokens in the profile's currency; a relay profile bills per
``tokens_per_price_unit`` tokens (1,000) in USD, with rate multiples, channel and user
discounts and field multipliers, and the plan converts its total to CNY at the relay's
rate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from .._errors import MissingPriceError, RatekitError
from .._limits import Limits, Rate, check_amount
from .._pricing import TOKENS_PER_MILLION, ExtraTokens, Prices, RelayBilling
from .._profiles import Profile, Tier
from .._tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    TokenEstimator,
    chat_message_problem,
    estimate_request_tokens,
)

DEFAULT_CALL_S = 10.0
"""Mean call duration (seconds) assumed when none is given."""

CHAT_KIND = "chat.completions.create"
CACHE_ITEM = "cache"
"""The relay billing item that cache-hit input tokens are billed under."""

_DURATION_UNITS_S = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


class PlanError(RatekitError, ValueError):
    """A plan cannot be made from these inputs (no limits to plan with, no tier reached)."""


# --- workloads -------------------------------------------------------------------------


def _check_count(name: str, value: object) -> int:
    """`value`, a count of requests or tokens: an int >= 0, else `PlanError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PlanError(f"{name} must be an int >= 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class RequestTokens:
    """One request's estimated `prompt_tokens` and maximum `output_tokens` (tokens, >= 0)."""

    prompt_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        """Prompt + maximum output tokens: what a token rate counts for this request."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Workload:
    """A batch of `requests` calls with `prompt_tokens` and `output_tokens` in total.

    `sizes` are each request's prompt + output tokens in order, when the requests differ
    (from a JSONL file); empty means every request is the same size (the totals divided
    by `requests`). Build one with `uniform` or `of_requests`.
    """

    requests: int
    prompt_tokens: int
    output_tokens: int
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_tokens", "output_tokens"):
            _check_count(f"Workload.{name}", getattr(self, name))
        if self.sizes:
            if len(self.sizes) != self.requests or sum(self.sizes) != self.total_tokens:
                raise PlanError(
                    "Workload.sizes must hold one size per request, summing to the total"
                )
        elif self.requests and self.total_tokens % self.requests:
            raise PlanError("Workload without sizes: the tokens must divide evenly by requests")

    @classmethod
    def uniform(cls, requests: int, prompt_tokens: int, output_tokens: int) -> Workload:
        """`requests` equal calls, each of `prompt_tokens` prompt and `output_tokens` output."""
        _check_count("requests", requests)
        _check_count("prompt_tokens", prompt_tokens)
        _check_count("output_tokens", output_tokens)
        return cls(requests, requests * prompt_tokens, requests * output_tokens)

    @classmethod
    def of_requests(cls, requests: Iterable[RequestTokens]) -> Workload:
        """The workload of these requests, in order."""
        items = tuple(requests)
        return cls(
            requests=len(items),
            prompt_tokens=sum(item.prompt_tokens for item in items),
            output_tokens=sum(item.output_tokens for item in items),
            sizes=tuple(item.tokens for item in items),
        )

    @property
    def total_tokens(self) -> int:
        """Prompt + maximum output tokens of the whole batch."""
        return self.prompt_tokens + self.output_tokens

    def amount(self, unit: str) -> int:
        """The batch's total in `unit` ("requests" or "tokens")."""
        return self.requests if unit == "requests" else self.total_tokens


# --- time ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitTime:
    """The least time a workload needs under one limit alone.

    `name` is "concurrency" or the rate's name ("rpm", "tpm", "tpd"); `limit` is the
    amount per `period_s` seconds (calls in flight for concurrency, whose `period_s` is
    `None`); `unit` is "calls", "requests" or "tokens"; `amount` is the workload's total
    in that unit. `batches` is the number of windows (or waves of calls) the workload
    fills; `last_admission_s` is the least time from the start to the last admission and
    `finish_s` adds the last call's duration (seconds). A request larger than the whole
    limit can never be admitted: `batches` is `None` and both times are infinite.
    """

    name: str
    limit: float
    period_s: float | None
    unit: str
    amount: float
    batches: int | None
    last_admission_s: float
    finish_s: float

    @property
    def possible(self) -> bool:
        """Whether every request of the workload fits this limit at all."""
        return self.batches is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields; an infinite time is `None`."""
        return {
            **asdict(self),
            "last_admission_s": _finite_or_none(self.last_admission_s),
            "finish_s": _finite_or_none(self.finish_s),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _check_call_s(call_s: float) -> float:
    return check_amount("call_s", call_s, allow_zero=False)


def concurrency_time(workload: Workload, concurrency: int, call_s: float) -> LimitTime:
    """At most `concurrency` calls of `call_s` seconds in flight: ``ceil(requests / C)`` waves."""
    duration = _check_call_s(call_s)
    waves = -(-workload.requests // concurrency)
    return LimitTime(
        name="concurrency",
        limit=concurrency,
        period_s=None,
        unit="calls",
        amount=workload.requests,
        batches=waves,
        last_admission_s=max(0, waves - 1) * duration,
        finish_s=waves * duration,
    )


def _next_fit(sizes: Sequence[int], limit: float) -> int | None:
    """Windows filled by admitting `sizes` in order, each window up to `limit`."""
    windows = 0
    room = Fraction(0)
    cap = Fraction(limit)
    for size in sizes:
        if size > cap:
            return None
        if windows == 0 or size > room:
            windows += 1
            room = cap
        room -= size
    return windows


def _windows(workload: Workload, rate: Rate) -> int | None:
    """Windows of `rate` the workload fills, whole requests in order; `None`: impossible."""
    if workload.requests == 0:
        return 0
    if rate.unit == "tokens" and workload.sizes:
        return _next_fit(workload.sizes, rate.limit)
    each = 1 if rate.unit == "requests" else workload.total_tokens // workload.requests
    if each == 0:
        return 1
    per_window = math.floor(Fraction(rate.limit) / each)
    if per_window == 0:
        return None
    return -(-workload.requests // per_window)


def rate_time(workload: Workload, rate: Rate, call_s: float) -> LimitTime:
    """The least time `workload` needs under `rate` alone (requests or tokens per period).

    ``(windows - 1) x period_s`` before the last admission, then `call_s` for the last
    call. A calendar-day rate (``calendar_tz``) may start just before midnight, so one
    window fewer is counted. A money rate is not planned (`PlanError`).
    """
    duration = _check_call_s(call_s)
    if rate.unit not in ("requests", "tokens"):
        raise PlanError(f"{rate.name}: only request and token rates can be planned")
    windows = _windows(workload, rate)
    if windows is None:
        last = math.inf
    else:
        waits = windows - (2 if rate.calendar_tz is not None else 1)
        last = max(0, waits) * rate.period_s
    return LimitTime(
        name=rate.name,
        limit=rate.limit,
        period_s=rate.period_s,
        unit=rate.unit,
        amount=workload.amount(rate.unit),
        batches=windows,
        last_admission_s=last,
        finish_s=last + duration if workload.requests else 0.0,
    )


@dataclass(frozen=True, slots=True)
class TierTime:
    """How long a workload takes at one tier: every limit's time and the binding one.

    `top_up` is the cumulative top-up (profile currency) that unlocks the tier, reached
    at that amount or, when `top_up_inclusive` is false, above it. `binding` is the limit
    with the longest time (`None` when the tier sets no limit); `finish_s` is its finish
    time in seconds (infinite when a request can never be admitted; one call's duration
    when nothing limits the batch; 0 for an empty batch).
    """

    tier: str
    top_up: float
    top_up_inclusive: bool
    limits: tuple[LimitTime, ...]
    binding: LimitTime | None
    finish_s: float

    def meets(self, deadline_s: float) -> bool:
        """Whether the workload can finish within `deadline_s` seconds at this tier."""
        return self.finish_s <= deadline_s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields; an infinite time is `None`."""
        return {
            "tier": self.tier,
            "top_up": self.top_up,
            "top_up_inclusive": self.top_up_inclusive,
            "binding": None if self.binding is None else self.binding.name,
            "finish_s": _finite_or_none(self.finish_s),
            "limits": [limit.as_dict() for limit in self.limits],
        }


def limit_times(workload: Workload, limits: Limits, call_s: float) -> tuple[LimitTime, ...]:
    """The time of each limit in `limits`: concurrency first, then every rate."""
    times: list[LimitTime] = []
    if limits.concurrency is not None:
        times.append(concurrency_time(workload, limits.concurrency, call_s))
    times.extend(rate_time(workload, rate, call_s) for rate in limits.all_rates)
    return tuple(times)


def tier_time(
    tier: Tier,
    workload: Workload,
    *,
    model: str | None = None,
    call_s: float = DEFAULT_CALL_S,
    overrides: Mapping[str, float | int | None] | None = None,
) -> TierTime:
    """How long `workload` takes at `tier` for `model`, calls lasting `call_s` seconds.

    `overrides` replace limit numbers (concurrency, rpm, tpm, tpd; see `Tier.limits`).
    Raises `UnknownModelError` for a model the tier's profile does not list when the
    profile sets limits per model.
    """
    limits = tier.limits(model, **dict(overrides or {}))
    times = limit_times(workload, limits, call_s)
    binding = max(times, key=lambda t: t.finish_s, default=None)
    if workload.requests == 0:
        finish = 0.0
    elif binding is None:
        finish = _check_call_s(call_s)
    else:
        finish = binding.finish_s
    return TierTime(
        tier=tier.name,
        top_up=tier.top_up,
        top_up_inclusive=tier.top_up_inclusive,
        limits=times,
        binding=binding,
        finish_s=finish,
    )


def all_tier_times(
    profile: Profile,
    workload: Workload,
    *,
    model: str | None = None,
    call_s: float = DEFAULT_CALL_S,
    overrides: Mapping[str, float | int | None] | None = None,
) -> tuple[TierTime, ...]:
    """`tier_time` of every tier of `profile`, in order of increasing top-up."""
    return tuple(
        tier_time(tier, workload, model=model, call_s=call_s, overrides=overrides)
        for tier in profile.tiers
    )


def cheapest_tier(times: Iterable[TierTime], deadline_s: float) -> TierTime | None:
    """The first of `times` (tiers in order of increasing top-up) that finishes within
    `deadline_s` seconds: the lowest cumulative top-up that meets the deadline. `None`
    when no tier does."""
    deadline = check_amount("deadline_s", deadline_s)
    return next((time for time in times if time.meets(deadline)), None)


def parse_deadline(text: str) -> float:
    """Seconds in a duration such as ``"2h"``, ``"1h30m"``, ``"90s"``, ``"1.5d"`` or ``"600"``
    (a bare number is seconds). Raises `PlanError` for anything else or a zero duration."""
    spec = text.strip().lower().replace(" ", "")
    try:
        seconds = float(spec)
    except ValueError:
        parts = _DURATION_PART.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise PlanError(
                f"invalid duration {text!r}: use a number of seconds or parts like 2h, 30m, 1d"
            ) from None
        seconds = sum(float(number) * _DURATION_UNITS_S[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise PlanError(f"invalid duration {text!r}: must be positive")
    return seconds


# --- cost ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CostLine:
    """One item of a bill.

    `tokens` of `item` in the batch, `billed_tokens` after the relay's rate multiple
    (equal to `tokens` elsewhere), `price` per `CostEstimate.tokens_per_price_unit`
    tokens, and `cost` in the estimate's currency after discounts and multipliers.
    """

    item: str
    tokens: float
    billed_tokens: float
    price: float
    cost: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """What a batch costs at most (every request writing its maximum output).

    `total` is in `currency`; prices are per `tokens_per_price_unit` tokens. `factor` is
    the product of the relay's discounts and field multipliers (1 elsewhere), already
    applied to every line. `converted` is the total in another currency (the relay's
    USD total in CNY), as ``(currency, amount)``, or `None`.
    """

    currency: str
    tokens_per_price_unit: int
    lines: tuple[CostLine, ...]
    total: float
    factor: float = 1.0
    converted: tuple[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "currency": self.currency,
            "tokens_per_price_unit": self.tokens_per_price_unit,
            "factor": self.factor,
            "total": self.total,
            "converted": None
            if self.converted is None
            else {"currency": self.converted[0], "total": self.converted[1]},
            "lines": [line.as_dict() for line in self.lines],
        }


def _split_prompt(workload: Workload, cache_hit_share: float) -> tuple[float, float]:
    """(uncached, cached) prompt tokens for a cache-hit share in [0, 1]."""
    share = check_amount("cache_hit_share", cache_hit_share)
    if share > 1:
        raise PlanError(f"cache_hit_share must be between 0 and 1, got {cache_hit_share!r}")
    cached = workload.prompt_tokens * share
    return workload.prompt_tokens - cached, cached


def profile_cost(
    workload: Workload, prices: Prices, currency: str, *, cache_hit_share: float = 0.0
) -> CostEstimate:
    """The batch's token cost at `prices` (per 1,000,000 tokens, in `currency`).

    A share `cache_hit_share` of the prompt tokens is billed at the cached-input price
    (the input price when the model has none). Raises `MissingPriceError` when a needed
    price is missing.
    """
    uncached, cached = _split_prompt(workload, cache_hit_share)
    output = float(workload.output_tokens)
    hit_price = prices.cached_input_per_1m_tokens
    if hit_price is None:
        hit_price = prices.input_per_1m_tokens
    rows = (
        ("input", uncached, prices.input_per_1m_tokens, {"input_tokens": uncached}),
        ("cached input", cached, hit_price, {"cached_input_tokens": cached}),
        ("output", output, prices.output_per_1m_tokens, {"output_tokens": output}),
    )
    lines = tuple(
        CostLine(item, tokens, tokens, price or 0.0, prices.cost_of_tokens(**counts))
        for item, tokens, price, counts in rows
        if tokens
    )
    return CostEstimate(
        currency=currency,
        tokens_per_price_unit=TOKENS_PER_MILLION,
        lines=lines,
        total=sum(line.cost for line in lines),
    )


def relay_cost(
    workload: Workload,
    relay: RelayBilling,
    *,
    input_price: float,
    output_price: float,
    cache_hit_share: float = 0.0,
    cache_multiple: float = 1.0,
    extras_per_request: Sequence[ExtraTokens] = (),
    channel_discount: float = 1.0,
    user_discount: float = 1.0,
    fields: Sequence[str] = (),
    currency: str = "USD",
) -> CostEstimate:
    """The batch's token cost on a relay platform, prices per 1,000 tokens in `currency`.

    Cache-hit prompt tokens (a `cache_hit_share` of the prompt) are the relay's "cache"
    item at `cache_multiple` times the input price; each of `extras_per_request` adds its
    tokens (per request) at its multiple: billed tokens are ``tokens + extra x (multiple
    - 1)``. Every line is then times ``channel_discount x user_discount`` and each
    field's multiplier (``priority``: 1.8). The total is `RelayBilling.token_cost` and is
    converted to CNY at the relay's rate.
    """
    uncached, cached = _split_prompt(workload, cache_hit_share)
    extras = [ExtraTokens(CACHE_ITEM, cached, cache_multiple)] if cached else []
    extras += [
        ExtraTokens(e.item, e.tokens * workload.requests, e.multiple) for e in extras_per_request
    ]
    total = relay.token_cost(
        input_tokens=workload.prompt_tokens,
        output_tokens=workload.output_tokens,
        input_price=input_price,
        output_price=output_price,
        extras=extras,
        channel_discount=channel_discount,
        user_discount=user_discount,
        fields=fields,
    )
    factor = relay.final_charge(
        1.0, channel_discount=channel_discount, user_discount=user_discount, fields=fields
    )
    unit = relay.tokens_per_price_unit
    price_of = {"input": input_price, "output": output_price}

    def line(item: str, tokens: float, billed: float, side: str) -> CostLine:
        price = price_of[side]
        return CostLine(item, tokens, billed, price, billed / unit * price * factor)

    lines = [line("input", uncached, uncached, "input")]
    if cached:
        lines.append(line("cached input", cached, cached * cache_multiple, "input"))
    for extra in extras[1 if cached else 0 :]:
        side = relay.multiple_items[extra.item]
        extra_billed = extra.tokens * (extra.multiple - 1)
        lines.append(line(f"{extra.item} x{extra.multiple:g}", extra.tokens, extra_billed, side))
    lines.append(line("output", workload.output_tokens, workload.output_tokens, "output"))
    return CostEstimate(
        currency=currency,
        tokens_per_price_unit=unit,
        lines=tuple(row for row in lines if row.tokens),
        total=total,
        factor=factor,
        converted=("CNY", relay.to_cny(total)) if currency == "USD" else None,
    )


# --- the plan --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pricing:
    """How to price a plan.

    `cache_hit_share` (0 to 1) of prompt tokens hit the cache. `input_price`,
    `output_price` and `cached_input_price` replace the model's prices: per 1,000,000
    tokens in the profile's currency, or per the relay's price unit (1,000 tokens) for
    a relay profile, which lists no model prices. For a relay only: `cache_multiple`
    (the cache item's rate multiple), `extras_per_request` (other rate-multiple items,
    tokens per request), `channel_discount` and `user_discount` (fractions: 0.8 is 20 %
    off) and `fields` (request fields with a price multiplier).
    """

    cache_hit_share: float = 0.0
    input_price: float | None = None
    output_price: float | None = None
    cached_input_price: float | None = None
    cache_multiple: float = 1.0
    extras_per_request: tuple[ExtraTokens, ...] = ()
    channel_discount: float = 1.0
    user_discount: float = 1.0
    fields: tuple[str, ...] = ()

    @property
    def relay_only(self) -> bool:
        """Whether a relay-only setting differs from its default."""
        return bool(
            self.cache_multiple != 1.0
            or self.extras_per_request
            or self.channel_discount != 1.0
            or self.user_discount != 1.0
            or self.fields
        )


def estimate_cost(
    profile: Profile, workload: Workload, model: str | None, pricing: Pricing
) -> CostEstimate:
    """The batch's cost under `profile` for `model` (see `Pricing`).

    Raises `MissingPriceError` saying what to pass when no price is known, and
    `UnknownModelError` for a model a profile with model prices does not list (unless
    both prices are given).
    """
    relay = profile.relay
    if relay is None and pricing.relay_only:
        raise PlanError(
            f"profile {profile.provider!r} is not a relay: discounts, rate multiples "
            "and field multipliers apply only to relay profiles"
        )
    if relay is not None:
        if pricing.input_price is None or pricing.output_price is None:
            raise MissingPriceError(
                f"profile {profile.provider!r} lists no model prices: give the input and "
                f"output prices ({profile.currency} per {relay.tokens_per_price_unit:,} tokens)"
            )
        return relay_cost(
            workload,
            relay,
            input_price=pricing.input_price,
            output_price=pricing.output_price,
            cache_hit_share=pricing.cache_hit_share,
            cache_multiple=pricing.cache_multiple,
            extras_per_request=pricing.extras_per_request,
            channel_discount=pricing.channel_discount,
            user_discount=pricing.user_discount,
            fields=pricing.fields,
            currency=profile.currency,
        )
    return profile_cost(
        workload,
        _prices(profile, model, pricing),
        profile.currency,
        cache_hit_share=pricing.cache_hit_share,
    )


def _prices(profile: Profile, model: str | None, pricing: Pricing) -> Prices:
    given = pricing.input_price is not None and pricing.output_price is not None
    listed = model is not None and any(
        m.name.casefold() == model.casefold() for m in profile.models
    )
    if model is not None and listed:
        base = profile.model(model).prices
    elif given:
        base = Prices(model=model or "")
    elif model is not None and profile.models:
        profile.model(model)  # raises UnknownModelError naming the listed models
        raise AssertionError("unreachable")
    else:
        what = f"no prices for model {model!r}" if model else "no model to price"
        raise MissingPriceError(
            f"profile {profile.provider!r}: {what}; give the input and output prices "
            f"({profile.currency} per 1,000,000 tokens)"
        )
    changes = {
        "input_per_1m_tokens": pricing.input_price,
        "output_per_1m_tokens": pricing.output_price,
        "cached_input_per_1m_tokens": pricing.cached_input_price,
    }
    values = {key: getattr(base, key) for key in changes}
    values.update({key: value for key, value in changes.items() if value is not None})
    return Prices(
        model=base.model,
        input_per_1m_tokens=values["input_per_1m_tokens"],
        output_per_1m_tokens=values["output_per_1m_tokens"],
        cached_input_per_1m_tokens=values["cached_input_per_1m_tokens"],
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """A workload planned at one tier of a profile.

    `time` is the chosen tier's; `cost` is `None` when it cannot be priced, with the
    reason in `cost_note`. With a deadline (`deadline_s`, seconds), `tiers` holds every
    tier's time and `cheapest` the lowest-top-up tier that meets it (`None`: none does).
    """

    provider: str
    currency: str
    model: str | None
    workload: Workload
    call_s: float
    time: TierTime
    cost: CostEstimate | None
    cost_note: str = ""
    deadline_s: float | None = None
    tiers: tuple[TierTime, ...] = ()
    cheapest: TierTime | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (infinite times are `None`)."""
        return {
            "provider": self.provider,
            "currency": self.currency,
            "model": self.model,
            "workload": {
                "requests": self.workload.requests,
                "prompt_tokens": self.workload.prompt_tokens,
                "output_tokens": self.workload.output_tokens,
                "total_tokens": self.workload.total_tokens,
            },
            "call_s": self.call_s,
            "time": self.time.as_dict(),
            "cost": None if self.cost is None else self.cost.as_dict(),
            "cost_note": self.cost_note,
            "deadline": None
            if self.deadline_s is None
            else {
                "deadline_s": self.deadline_s,
                "cheapest_tier": None if self.cheapest is None else self.cheapest.tier,
                "cheapest_top_up": None if self.cheapest is None else self.cheapest.top_up,
                "tiers": [t.as_dict() for t in self.tiers],
            },
        }


def _check_model_given(profile: Profile, model: str | None) -> None:
    if model is None and any(m.limits_by_tier for m in profile.models):
        limited = [m.name for m in profile.models if m.limits_by_tier]
        raise PlanError(
            f"profile {profile.provider!r} sets limits per model: name a model "
            f"({', '.join(limited)})"
        )


def make_plan(
    profile: Profile,
    tier: Tier,
    workload: Workload,
    *,
    model: str | None = None,
    call_s: float = DEFAULT_CALL_S,
    deadline_s: float | None = None,
    pricing: Pricing | None = None,
    overrides: Mapping[str, float | int | None] | None = None,
) -> Plan:
    """Plan `workload` at `tier` of `profile`: time per limit, cost, cheapest tier.

    `call_s` is the mean call duration (seconds); `deadline_s` (seconds) asks for the
    cheapest tier that finishes in time; `overrides` replace limit numbers at every tier
    (an account with other limits, or a relay whose tiers the profile does not list).
    Raises `PlanError` when the profile sets limits per model and no `model` is given,
    and `UnknownModelError` for a model it does not list. A cost that cannot be priced
    is reported in `Plan.cost_note`, not raised (timing needs no prices).
    """
    _check_model_given(profile, model)
    chosen = tier_time(tier, workload, model=model, call_s=call_s, overrides=overrides)
    pricing = pricing or Pricing()
    cost: CostEstimate | None = None
    note = ""
    try:
        cost = estimate_cost(profile, workload, model, pricing)
    except MissingPriceError as exc:
        note = str(exc)
    tiers: tuple[TierTime, ...] = ()
    cheapest = None
    if deadline_s is not None:
        tiers = all_tier_times(profile, workload, model=model, call_s=call_s, overrides=overrides)
        cheapest = cheapest_tier(tiers, deadline_s)
    return Plan(
        provider=profile.provider,
        currency=profile.currency,
        model=model,
        workload=workload,
        call_s=call_s,
        time=chosen,
        cost=cost,
        cost_note=note,
        deadline_s=deadline_s,
        tiers=tiers,
        cheapest=cheapest,
    )


# --- JSONL -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineProblem:
    """A JSONL line that could not be read: its 1-based `line` number and why."""

    line: int
    message: str


@dataclass(frozen=True, slots=True)
class JsonlRequests:
    """The requests read from a JSONL file, in order, and the lines that were skipped."""

    requests: tuple[RequestTokens, ...]
    problems: tuple[LineProblem, ...] = field(default=())


def _count_field(data: Mapping[str, Any], key: str, default: int | None = None) -> int:
    return _check_count(key, data.get(key, default))


def request_tokens_of(data: object, estimator: TokenEstimator) -> RequestTokens:
    """Tokens of one JSONL record: an OpenAI chat request body (or a batch-file line whose
    ``body`` is one), or ``{"prompt_tokens": .., "max_tokens": ..}``. A missing output cap
    reserves `DEFAULT_MAX_OUTPUT_TOKENS`. Raises `RatekitError` for anything else."""
    if not isinstance(data, dict):
        raise PlanError(f"expected a JSON object, got {type(data).__name__}")
    record: dict[str, Any] = data
    if "messages" not in record and isinstance(record.get("body"), dict):
        record = record["body"]
    if "prompt_tokens" in record and "messages" not in record:
        return RequestTokens(
            _count_field(record, "prompt_tokens"),
            _count_field(record, "max_tokens", DEFAULT_MAX_OUTPUT_TOKENS),
        )
    if "messages" not in record:
        raise PlanError('expected a chat request ("messages") or "prompt_tokens"')
    messages = record["messages"]
    if isinstance(messages, list):
        # The same rules as `ratekit run`: a line plan counts is a line run would send.
        for index, message in enumerate(messages):
            problem = chat_message_problem(message)
            if problem is not None:
                raise PlanError(f"messages[{index}]: {problem}")
    prompt, output = estimate_request_tokens(CHAT_KIND, record, estimator)
    return RequestTokens(prompt, output)


def read_jsonl(lines: Iterable[str], estimator: TokenEstimator) -> JsonlRequests:
    """Every request in `lines` (one JSON object a line; blank lines skipped).

    A line that is not JSON, or not a request ratekit can estimate, becomes a
    `LineProblem` with its line number; the other lines are still read.
    """
    requests: list[RequestTokens] = []
    problems: list[LineProblem] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(LineProblem(number, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except RecursionError:
            problems.append(LineProblem(number, "JSON nested too deeply to read"))
            continue
        try:
            requests.append(request_tokens_of(data, estimator))
        except RatekitError as exc:
            problems.append(LineProblem(number, str(exc)))
    return JsonlRequests(tuple(requests), tuple(problems))


# --- a pool of accounts ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountShare:
    """One account's part of a batch spread over a pool: its `requests`, its time
    (`time`, at its tier and limits) and what they cost at its prices times its
    discount (`cost`, `None` with the reason in `cost_note` when it cannot be priced)."""

    account: str
    provider: str
    currency: str
    requests: int
    time: TierTime
    cost: float | None
    cost_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "provider": self.provider,
            "currency": self.currency,
            "requests": self.requests,
            "time": self.time.as_dict(),
            "cost": self.cost,
            "cost_note": self.cost_note,
        }


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """A batch spread over a pool's accounts so that it ends as early as it can: every
    account kept busy, each taking what its limits let it finish by `finish_s`."""

    workload: Workload
    call_s: float
    shares: tuple[AccountShare, ...]
    finish_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": {
                "requests": self.workload.requests,
                "prompt_tokens": self.workload.prompt_tokens,
                "output_tokens": self.workload.output_tokens,
            },
            "call_s": self.call_s,
            "finish_s": _finite_or_none(self.finish_s),
            "accounts": [share.as_dict() for share in self.shares],
        }


def _part(workload: Workload, requests: int) -> Workload:
    """`requests` calls of `workload`'s mean size (prompt and output, rounded up)."""
    if workload.requests == 0:
        return Workload(0, 0, 0)
    prompt = -(-workload.prompt_tokens // workload.requests)
    output = -(-workload.output_tokens // workload.requests)
    return Workload.uniform(requests, prompt, output)


def _most_by(
    tier: Tier,
    workload: Workload,
    model: str | None,
    call_s: float,
    overrides: Mapping[str, Any],
    deadline_s: float,
    most: int,
) -> int:
    """The most calls of `workload`'s mean size (up to `most`) that `tier` finishes
    within `deadline_s`."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        time = tier_time(
            tier, _part(workload, middle), model=model, call_s=call_s, overrides=overrides
        )
        if time.finish_s <= deadline_s:
            low = middle
        else:
            high = middle - 1
    return low


def plan_pool(
    accounts: Sequence[tuple[str, Profile, Tier, Mapping[str, Any], str | None, float]],
    workload: Workload,
    *,
    call_s: float = DEFAULT_CALL_S,
    pricing: Pricing | None = None,
) -> PoolPlan:
    """Spread `workload` (calls of its mean size) over `accounts`: each is (name, profile,
    tier, limit overrides, its name for the model, price discount). The earliest finish
    at which the accounts together can have finished every call, found by halving; each
    account takes what it finishes by then (the first ones in order take any rest)."""
    duration = _check_call_s(call_s)
    pricing = pricing or Pricing()
    total = workload.requests
    alone = [
        tier_time(tier, _part(workload, total), model=model, call_s=duration, overrides=extra)
        for _, _, tier, extra, model, _ in accounts
    ]
    high = min((time.finish_s for time in alone), default=math.inf)
    if total == 0:
        high = 0.0
    if not math.isfinite(high):
        raise PlanError("no account of the pool can ever admit these requests")
    low = 0.0
    for _ in range(60):
        if high - low <= max(duration / 100, 1e-6):
            break
        middle = (low + high) / 2
        done = sum(
            _most_by(tier, workload, model, duration, extra, middle, total)
            for _, _, tier, extra, model, _ in accounts
        )
        if done >= total:
            high = middle
        else:
            low = middle
    left = total
    shares = []
    for name, profile, tier, extra, model, discount in accounts:
        count = min(_most_by(tier, workload, model, duration, extra, high, total), left)
        left -= count
        part = _part(workload, count)
        time = tier_time(tier, part, model=model, call_s=duration, overrides=extra)
        cost: float | None = None
        note = ""
        try:
            cost = estimate_cost(profile, part, model, pricing).total * discount
        except RatekitError as exc:  # a missing price, or a model it does not list
            note = str(exc)
        shares.append(
            AccountShare(name, profile.provider, profile.currency, count, time, cost, note)
        )
    finish = max((share.time.finish_s for share in shares if share.requests), default=0.0)
    return PoolPlan(workload, duration, tuple(shares), finish)
