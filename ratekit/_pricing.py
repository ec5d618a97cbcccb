"""What a call costs, from a profile's prices: pure functions, no I/O.

Every amount returned is in the profile's currency (the `currency` of the profile the
prices came from) as a float. Counts (tokens, characters, images, ...) must be
non-negative numbers; anything else raises `InvalidCostError`.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypedDict, Unpack

from ._errors import InvalidCostError, MissingPriceError, UnknownBillingItemError
from ._limits import check_amount, show

TOKENS_PER_MILLION = 1_000_000
CHARACTERS_PER_PRICE_UNIT = 10_000
PIXELS_PER_MEGAPIXEL = 1_000_000

CharacterClass = Literal["chinese", "letter", "punctuation", "other"]
Side = Literal["input", "output"]


def _price(label: str, value: float | None, model: str) -> float:
    if value is None:
        raise MissingPriceError(f"{model}: no {label} price in the profile")
    return value


# --- characters ----------------------------------------------------------------------


def character_class(char: str) -> CharacterClass:
    """The billing class of one character: Chinese (a CJK ideograph), letter, punctuation, other.

    Letters are any Unicode letter that is not a CJK ideograph (English and Greek letters
    alike); punctuation is any Unicode punctuation (Chinese "，。" included); digits,
    spaces, newlines and symbols are "other".
    """
    name = unicodedata.name(char, "")
    if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return "chinese"
    category = unicodedata.category(char)
    if category.startswith("L"):
        return "letter"
    if category.startswith("P"):
        return "punctuation"
    return "other"


@dataclass(frozen=True, slots=True)
class CharacterRules:
    """How a provider counts billable characters for speech: a weight per character class.

    Each weight is the billable characters one character of that class counts for (0.5
    means two count as one). The weighted sum of a text is rounded up to a whole number.
    """

    chinese: float = 1.0
    letter: float = 1.0
    punctuation: float = 1.0
    other: float = 1.0

    def __post_init__(self) -> None:
        for name in ("chinese", "letter", "punctuation", "other"):
            check_amount(f"CharacterRules.{name}", getattr(self, name))

    def weight(self, kind: CharacterClass) -> float:
        """The billable characters one character of class `kind` counts for."""
        weight: float = getattr(self, kind)
        return weight


def count_billable_characters(text: str, rules: CharacterRules) -> int:
    """Billable characters in `text` under `rules`: the weighted count, rounded up."""
    counts: dict[CharacterClass, int] = {}
    for char in text:
        kind = character_class(char)
        counts[kind] = counts.get(kind, 0) + 1
    total = sum(rules.weight(kind) * n for kind, n in counts.items())
    return math.ceil(total)


# --- per-model prices ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prices:
    """A model's published prices, each in the profile's currency; `None` means not priced.

    Token prices are per 1,000,000 tokens: `input_per_1m_tokens` on a cache miss,
    `cached_input_per_1m_tokens` on a cache hit, `output_per_1m_tokens`, and
    `cache_write_per_1m_tokens`. Then per 10,000 billable characters (speech), per voice
    (voice cloning or design), per hour of audio (speech recognition), per request,
    per song, per image, per second, per megapixel, and per video by variant name.
    `model` labels error messages.
    """

    model: str = ""
    input_per_1m_tokens: float | None = None
    cached_input_per_1m_tokens: float | None = None
    output_per_1m_tokens: float | None = None
    cache_write_per_1m_tokens: float | None = None
    per_10k_characters: float | None = None
    per_voice: float | None = None
    per_hour: float | None = None
    per_request: float | None = None
    per_song: float | None = None
    per_image: float | None = None
    per_second: float | None = None
    per_megapixel: float | None = None
    per_video: Mapping[str, float] = field(default_factory=dict)

    def cost_of_tokens(
        self,
        *,
        input_tokens: float = 0,
        cached_input_tokens: float = 0,
        output_tokens: float = 0,
        cache_write_tokens: float = 0,
    ) -> float:
        """Cost of one call's tokens.

        `input_tokens` are the cache-miss input tokens only, not counting
        `cached_input_tokens` (cache hits) or `cache_write_tokens`. A model without a
        cache-hit or cache-write price bills those tokens at the input price.
        """
        miss = check_amount("input_tokens", input_tokens)
        hit = check_amount("cached_input_tokens", cached_input_tokens)
        out = check_amount("output_tokens", output_tokens)
        write = check_amount("cache_write_tokens", cache_write_tokens)
        cost = 0.0
        if miss or hit or write:
            base = _price("input token", self.input_per_1m_tokens, self.model)
            hit_price = self.cached_input_per_1m_tokens
            write_price = self.cache_write_per_1m_tokens
            cost += miss * base
            cost += hit * (base if hit_price is None else hit_price)
            cost += write * (base if write_price is None else write_price)
        if out:
            cost += out * _price("output token", self.output_per_1m_tokens, self.model)
        return cost / TOKENS_PER_MILLION

    def cost_of_characters(self, characters: float) -> float:
        """Cost of `characters` billable characters (see `count_billable_characters`)."""
        amount = check_amount("characters", characters)
        price = _price("per-10,000-character", self.per_10k_characters, self.model)
        return amount * price / CHARACTERS_PER_PRICE_UNIT

    def cost_of_text(self, text: str, rules: CharacterRules) -> float:
        """Cost of synthesizing `text`, its characters counted by the provider's `rules`."""
        return self.cost_of_characters(count_billable_characters(text, rules))

    def cost_of_voices(self, voices: float = 1) -> float:
        """Cost of creating `voices` cloned or designed voices."""
        return check_amount("voices", voices) * _price("per-voice", self.per_voice, self.model)

    def cost_of_hours(self, hours: float) -> float:
        """Cost of `hours` hours of audio (speech recognition)."""
        return check_amount("hours", hours) * _price("per-hour", self.per_hour, self.model)

    def cost_of_requests(self, requests: float = 1) -> float:
        """Cost of `requests` requests billed per request."""
        price = _price("per-request", self.per_request, self.model)
        return check_amount("requests", requests) * price

    def cost_of_songs(self, songs: float = 1) -> float:
        """Cost of generating `songs` songs."""
        return check_amount("songs", songs) * _price("per-song", self.per_song, self.model)

    def cost_of_images(self, images: float = 1) -> float:
        """Cost of generating `images` images."""
        return check_amount("images", images) * _price("per-image", self.per_image, self.model)

    def cost_of_seconds(self, seconds: float) -> float:
        """Cost of `seconds` seconds of output billed per second."""
        price = _price("per-second", self.per_second, self.model)
        return check_amount("seconds", seconds) * price

    def cost_of_megapixels(self, width_px: float, height_px: float) -> float:
        """Cost of an image of `width_px` x `height_px` pixels billed per megapixel."""
        price = _price("per-megapixel", self.per_megapixel, self.model)
        pixels = check_amount("width_px", width_px) * check_amount("height_px", height_px)
        return pixels / PIXELS_PER_MEGAPIXEL * price

    def cost_of_videos(self, variant: str, videos: float = 1) -> float:
        """Cost of `videos` videos of `variant` (e.g. "768P-6s"; see `per_video`)."""
        count = check_amount("videos", videos)
        if variant not in self.per_video:
            known = ", ".join(self.per_video) or "none"
            raise MissingPriceError(
                f"{self.model}: no per-video price for variant {variant!r}; known: {known}"
            )
        return count * self.per_video[variant]


# --- currency ------------------------------------------------------------------------


def usd_to_cny(amount_usd: float, cny_per_usd: float) -> float:
    """`amount_usd` US dollars in yuan at `cny_per_usd` yuan per dollar (the relay's is 7.3)."""
    return check_amount("amount_usd", amount_usd) * check_amount(
        "cny_per_usd", cny_per_usd, allow_zero=False
    )


def cny_to_usd(amount_cny: float, cny_per_usd: float) -> float:
    """`amount_cny` yuan in US dollars at `cny_per_usd` yuan per dollar (the relay's is 7.3)."""
    return check_amount("amount_cny", amount_cny) / check_amount(
        "cny_per_usd", cny_per_usd, allow_zero=False
    )


# --- relay billing -------------------------------------------------------------------


def apply_rate_multiple(tokens: float, extra_tokens: float, multiple: float) -> float:
    """Tokens billed once `extra_tokens` are charged at `multiple` times the base price.

    The relay's rule: ``tokens + extra_tokens x (multiple - 1)``. A multiple below 1
    (a cheap cache read) lowers the count; the result is never below 0.
    """
    base = check_amount("tokens", tokens)
    extra = check_amount("extra_tokens", extra_tokens)
    factor = check_amount("multiple", multiple)
    return max(0.0, base + extra * (factor - 1))


@dataclass(frozen=True, slots=True)
class ExtraTokens:
    """Tokens of one relay billing item (`item`: cache, input_audio, reasoning, ...)
    billed at `multiple` times the input or output price."""

    item: str
    tokens: float
    multiple: float


# The relay's prompt-cache items, as the relay profile's `multiple_items` names them.
CACHE_WRITE_5M = "cache_write_5m"  # the page's "Cache Write 5M Tokens" (5-minute cache)
CACHE_WRITE_1H = "cache_write_1h"  # "Cache Write 1H Tokens" (1-hour cache)
CACHE_READ = "cache_read"  # "Cache Read Tokens"


@dataclass(frozen=True, slots=True)
class CacheMultiples:
    """A relay's rate multiples for one model's prompt-cache tokens, each times the
    input price: `write_5m` for 5-minute cache writes, `write_1h` for 1-hour cache
    writes, `read` for cache reads (the billing items "Cache Write 5M Tokens", "Cache
    Write 1H Tokens" and "Cache Read Tokens", which the relay's page says generally
    exist for Claude models). 1 bills a token at the input price, 0.5 at half of it.

    The billing page names the items and their side (input) but gives no numbers:
    they are per model, on the relay's pricing page, so they are always passed in.
    """

    write_5m: float
    write_1h: float
    read: float

    def __post_init__(self) -> None:
        for name in ("write_5m", "write_1h", "read"):
            check_amount(f"CacheMultiples.{name}", getattr(self, name))

    def extras(
        self, *, write_5m_tokens: float = 0, write_1h_tokens: float = 0, read_tokens: float = 0
    ) -> tuple[ExtraTokens, ...]:
        """The three items as `ExtraTokens` for `RelayBilling.token_cost`; a count of 0 is
        left out. Counts are checked when the cost is computed."""
        rows = (
            (CACHE_WRITE_5M, write_5m_tokens, self.write_5m),
            (CACHE_WRITE_1H, write_1h_tokens, self.write_1h),
            (CACHE_READ, read_tokens, self.read),
        )
        return tuple(
            ExtraTokens(item, tokens, multiple) for item, tokens, multiple in rows if tokens
        )


class Charge(TypedDict, total=False):
    """The keywords every relay billing verb takes after its own amounts and hands to
    `RelayBilling.final_charge`: `channel_discount` and `user_discount` (fractions, 1
    when left out) and `fields`, the request fields whose price multipliers apply."""

    channel_discount: float
    user_discount: float
    fields: Iterable[str]


@dataclass(frozen=True, slots=True)
class RelayBilling:
    """A relay platform's billing rules.

    Prices (model input/output prices) are in the relay's currency; token prices are per
    `tokens_per_price_unit` tokens. Every final charge is ``cost x channel discount x
    user discount x field multipliers``; discounts are fractions (0.8 = 20 % off) and
    default to 1 (no discount). `multiple_items` maps each rate-multiple billing item to
    the side (input or output) whose tokens it adjusts; `field_multipliers` maps a
    request field to its price multiplier. `cny_per_usd` is the platform's exchange rate.
    Every billing verb (`token_cost`, `cache_token_cost`, `request_cost`, `second_cost`,
    `megapixel_cost`, `image_cost`) takes the discounts and fields as `Charge` keywords.
    """

    cny_per_usd: float
    tokens_per_price_unit: int
    multiple_items: Mapping[str, Side] = field(default_factory=dict)
    field_multipliers: Mapping[str, float] = field(default_factory=dict)

    def field_multiplier(self, name: str) -> float:
        """The price multiplier of request field `name`; `UnknownBillingItemError` if unlisted."""
        if name not in self.field_multipliers:
            raise UnknownBillingItemError(name, self.field_multipliers, "relay field multipliers")
        return self.field_multipliers[name]

    def final_charge(
        self,
        cost: float,
        *,
        channel_discount: float = 1.0,
        user_discount: float = 1.0,
        fields: Iterable[str] = (),
    ) -> float:
        """``cost x channel_discount x user_discount``, times each named field's multiplier."""
        amount = check_amount("cost", cost)
        amount *= check_amount("channel_discount", channel_discount)
        amount *= check_amount("user_discount", user_discount)
        for name in fields:
            amount *= self.field_multiplier(name)
        return amount

    def adjusted_tokens(
        self, input_tokens: float, output_tokens: float, extras: Iterable[ExtraTokens] = ()
    ) -> tuple[float, float]:
        """Input and output tokens after applying each extra item's rate multiple."""
        totals = {
            "input": check_amount("input_tokens", input_tokens),
            "output": check_amount("output_tokens", output_tokens),
        }
        for extra in extras:
            if extra.item not in self.multiple_items:
                raise UnknownBillingItemError(extra.item, self.multiple_items, "relay billing")
            side = self.multiple_items[extra.item]
            totals[side] = apply_rate_multiple(totals[side], extra.tokens, extra.multiple)
        return totals["input"], totals["output"]

    def token_cost(
        self,
        *,
        input_tokens: float,
        output_tokens: float,
        input_price: float,
        output_price: float,
        extras: Iterable[ExtraTokens] = (),
        **charge: Unpack[Charge],
    ) -> float:
        """Token billing: ``(in / unit x input_price + out / unit x output_price)``, then
        discounts and field multipliers; `extras` adjust the token counts first."""
        billed_in, billed_out = self.adjusted_tokens(input_tokens, output_tokens, extras)
        unit = self.tokens_per_price_unit
        cost = billed_in / unit * check_amount("input_price", input_price)
        cost += billed_out / unit * check_amount("output_price", output_price)
        return self.final_charge(cost, **charge)

    def cache_token_cost(
        self,
        multiples: CacheMultiples,
        *,
        input_tokens: float,
        output_tokens: float,
        input_price: float,
        output_price: float,
        cache_write_5m_tokens: float = 0,
        cache_write_1h_tokens: float = 0,
        cache_read_tokens: float = 0,
        extras: Iterable[ExtraTokens] = (),
        **charge: Unpack[Charge],
    ) -> float:
        """Token billing of a call with prompt-cache tokens (Claude's, generally).

        `input_tokens` counts every input token, cache writes and reads included: the
        page's rule adds ``tokens x (multiple - 1)`` per cache token on top of them.
        (Anthropic's usage reports ``input_tokens`` without ``cache_creation_input_tokens``
        and ``cache_read_input_tokens``: add them first.) Each cache count is billed at
        its multiple in `multiples`; `extras` are any other items (input images, ...).
        Then as `token_cost`: prices per `tokens_per_price_unit` tokens, discounts, fields.
        Cache counts that add up to more than `input_tokens` raise `InvalidCostError`.
        """
        given = {
            "cache_write_5m_tokens": cache_write_5m_tokens,
            "cache_write_1h_tokens": cache_write_1h_tokens,
            "cache_read_tokens": cache_read_tokens,
        }
        cached = sum(check_amount(name, value) for name, value in given.items())
        if cached > check_amount("input_tokens", input_tokens):
            counts = " + ".join(f"{name} {show(value)}" for name, value in given.items() if value)
            raise InvalidCostError(
                f"cache tokens ({counts}) exceed input_tokens {show(input_tokens)}: "
                "input_tokens counts every input token, cache writes and reads included"
            )
        cache_extras = multiples.extras(
            write_5m_tokens=cache_write_5m_tokens,
            write_1h_tokens=cache_write_1h_tokens,
            read_tokens=cache_read_tokens,
        )
        return self.token_cost(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            input_price=input_price,
            output_price=output_price,
            extras=(*cache_extras, *extras),
            **charge,
        )

    def request_cost(
        self, *, input_price: float, requests: float = 1, **charge: Unpack[Charge]
    ) -> float:
        """Per-request billing: ``requests x input_price``, then discounts and multipliers."""
        cost = check_amount("requests", requests) * check_amount("input_price", input_price)
        return self.final_charge(cost, **charge)

    def second_cost(self, *, input_price: float, seconds: float, **charge: Unpack[Charge]) -> float:
        """Per-second billing (video): ``input_price x seconds``, then discounts and multipliers."""
        cost = check_amount("input_price", input_price) * check_amount("seconds", seconds)
        return self.final_charge(cost, **charge)

    def megapixel_cost(
        self, *, input_price: float, width_px: float, height_px: float, **charge: Unpack[Charge]
    ) -> float:
        """Per-megapixel billing: ``width x height / 1,000,000 x input_price``, then discounts."""
        pixels = check_amount("width_px", width_px) * check_amount("height_px", height_px)
        cost = pixels / PIXELS_PER_MEGAPIXEL * check_amount("input_price", input_price)
        return self.final_charge(cost, **charge)

    def image_cost(self, *, input_price: float, images: float, **charge: Unpack[Charge]) -> float:
        """Per-image billing: ``images x input_price``, then discounts and multipliers."""
        cost = check_amount("images", images) * check_amount("input_price", input_price)
        return self.final_charge(cost, **charge)

    def to_cny(self, amount_usd: float) -> float:
        """`amount_usd` in yuan at the platform's rate."""
        return usd_to_cny(amount_usd, self.cny_per_usd)

    def to_usd(self, amount_cny: float) -> float:
        """`amount_cny` in US dollars at the platform's rate."""
        return cny_to_usd(amount_cny, self.cny_per_usd)
