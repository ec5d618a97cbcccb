"""What calls cost, checked by hand against the providers' pages."""

from __future__ import annotations

import pytest

from ratekit._errors import InvalidCostError
from ratekit._estimate import TokenEstimate, count_script_characters
from ratekit._pricing import (
    CacheMultiples,
    CharacterRules,
    ExtraTokens,
    MissingPriceError,
    Prices,
    RelayBilling,
    UnknownBillingItemError,
    apply_rate_multiple,
    character_class,
    cny_to_usd,
    count_billable_characters,
    usd_to_cny,
)
from ratekit._profiles import load_profile

M = 1_000_000


def _relay() -> RelayBilling:
    relay = load_profile("relay").relay
    assert relay is not None
    return relay


# --- tokens --------------------------------------------------------------------------


def test_stepfun_flash_miss_hit_output() -> None:
    """step-3.7-flash: 1M miss + 1M hit + 1M output = 0.20 + 0.04 + 1.15 USD."""
    prices = load_profile("stepfun").model("step-3.7-flash").prices
    cost = prices.cost_of_tokens(input_tokens=M, cached_input_tokens=M, output_tokens=M)
    assert cost == pytest.approx(0.20 + 0.04 + 1.15)


def test_stepfun_small_call() -> None:
    """step-3.5-flash: 2,000 miss + 8,000 hit + 500 output tokens, by hand."""
    prices = load_profile("stepfun").model("step-3.5-flash").prices
    cost = prices.cost_of_tokens(input_tokens=2_000, cached_input_tokens=8_000, output_tokens=500)
    assert cost == pytest.approx((2_000 * 0.10 + 8_000 * 0.02 + 500 * 0.30) / M)


def test_minimax_cache_write() -> None:
    """MiniMax-M2 prices all four: 2.1 + 0.21 + 8.4 + 2.625 CNY per 1M each."""
    prices = load_profile("minimax").model("MiniMax-M2").prices
    cost = prices.cost_of_tokens(
        input_tokens=M, cached_input_tokens=M, output_tokens=M, cache_write_tokens=M
    )
    assert cost == pytest.approx(2.1 + 0.21 + 8.4 + 2.625)
    assert prices.cost_of_tokens(cache_write_tokens=400_000) == pytest.approx(1.05)


def test_infly_one_price_for_input_and_output() -> None:
    """INF bills input and output alike: 10 CNY per 1M tokens for inf-chat-v1."""
    prices = load_profile("infly").model("inf-chat-v1").prices
    assert prices.cost_of_tokens(input_tokens=300_000, output_tokens=200_000) == pytest.approx(5.0)
    assert prices.cost_of_tokens(cached_input_tokens=M) == pytest.approx(10.0)


def test_missing_output_price_is_an_error() -> None:
    """Asking a speech model for token costs is a MissingPriceError naming the model."""
    prices = load_profile("stepfun").model("step-tts-2").prices
    assert prices.cost_of_tokens() == 0.0
    with pytest.raises(MissingPriceError, match=r"^step-tts-2: no output token price"):
        prices.cost_of_tokens(output_tokens=1)


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "10"])
def test_token_counts_are_checked(bad: object) -> None:
    """Negative, NaN, bool or string counts are InvalidCostError."""
    prices = load_profile("stepfun").model("step-3.5-flash").prices
    with pytest.raises(InvalidCostError):
        prices.cost_of_tokens(input_tokens=bad)  # type: ignore[arg-type]


# --- characters ----------------------------------------------------------------------


def test_character_classes() -> None:
    """Chinese ideographs, letters (Latin and Greek), punctuation (Chinese too), other."""
    assert [character_class(c) for c in "中aΩ，.1 \n"] == [
        "chinese",
        "letter",
        "letter",
        "punctuation",
        "punctuation",
        "other",
        "other",
        "other",
    ]


def test_minimax_counts_chinese_as_two() -> None:
    """MiniMax: "你好ab" counts 2 + 2 + 1 + 1 = 6 characters."""
    rules = load_profile("minimax").character_rules
    assert rules is not None
    assert count_billable_characters("你好ab", rules) == 6
    assert count_billable_characters("你好, world!\n", rules) == 2 + 2 + 1 + 1 + 5 + 1 + 1


def test_stepfun_counting_rule() -> None:
    """StepFun: a Chinese character 1, two letters 1, two punctuation marks 1; rounded up."""
    rules = load_profile("stepfun").character_rules
    assert rules is not None
    assert count_billable_characters("你好ab", rules) == 3
    assert count_billable_characters("你好，。", rules) == 3
    assert count_billable_characters("abc", rules) == 2
    assert count_billable_characters("", rules) == 0
    assert count_billable_characters("a b", rules) == 2  # a space counts 1 (page silent)


def test_speech_cost_per_10k_characters() -> None:
    """speech-2.6-hd at 3.5 CNY per 10,000 characters; 10,000 Chinese characters count 20,000."""
    profile = load_profile("minimax")
    assert profile.character_rules is not None
    prices = profile.model("speech-2.6-hd").prices
    assert prices.cost_of_characters(10_000) == pytest.approx(3.5)
    assert prices.cost_of_text("中" * 10_000, profile.character_rules) == pytest.approx(7.0)


def test_stepfun_tts_text_cost() -> None:
    """stepaudio-2.5-tts: 20,000 English letters count 10,000 characters = 0.85 USD."""
    profile = load_profile("stepfun")
    assert profile.character_rules is not None
    prices = profile.model("stepaudio-2.5-tts").prices
    assert prices.cost_of_text("a" * 20_000, profile.character_rules) == pytest.approx(0.85)


def test_character_rules_reject_negative_weight() -> None:
    """A negative weight is an InvalidCostError."""
    with pytest.raises(InvalidCostError):
        CharacterRules(chinese=-1)


# --- other units ---------------------------------------------------------------------


def test_per_voice_hour_song_image() -> None:
    """Voice cloning, ASR hours, songs and images cost their listed unit price."""
    stepfun = load_profile("stepfun")
    minimax = load_profile("minimax")
    assert stepfun.model("step-tts-2").prices.cost_of_voices(2) == pytest.approx(3.0)
    assert stepfun.model("stepaudio-2.5-asr").prices.cost_of_hours(10) == pytest.approx(0.22)
    assert minimax.model("speech-02-turbo").prices.cost_of_voices() == pytest.approx(9.9)
    assert minimax.model("Music-2.0").prices.cost_of_songs(4) == pytest.approx(1.0)
    assert minimax.model("image-01-live").prices.cost_of_images(8) == pytest.approx(0.2)


def test_per_video_variants() -> None:
    """Hailuo videos cost by variant; an unknown variant lists the known ones."""
    fast = load_profile("minimax").model("MiniMax-Hailuo-2.3-Fast").prices
    assert fast.cost_of_videos("1080P-6s") == pytest.approx(2.31)
    assert fast.cost_of_videos("768P-10s", 2) == pytest.approx(4.5)
    with pytest.raises(MissingPriceError) as info:
        fast.cost_of_videos("512P-6s")
    assert str(info.value) == (
        "MiniMax-Hailuo-2.3-Fast: no per-video price for variant '512P-6s'; "
        "known: 768P-6s, 768P-10s, 1080P-6s"
    )


def test_plain_prices_per_request_second_megapixel() -> None:
    """Prices built in code bill per request, per second and per megapixel."""
    prices = Prices(model="x", per_request=0.5, per_second=0.1, per_megapixel=0.02)
    assert prices.cost_of_requests(3) == pytest.approx(1.5)
    assert prices.cost_of_seconds(8) == pytest.approx(0.8)
    assert prices.cost_of_megapixels(2000, 1500) == pytest.approx(0.06)


# --- relay ---------------------------------------------------------------------------


def test_relay_token_billing_with_discounts() -> None:
    """(1,500 / 1000 x 0.002 + 500 / 1000 x 0.008) x 0.9 x 0.8."""
    cost = _relay().token_cost(
        input_tokens=1_500,
        output_tokens=500,
        input_price=0.002,
        output_price=0.008,
        channel_discount=0.9,
        user_discount=0.8,
    )
    assert cost == pytest.approx((1.5 * 0.002 + 0.5 * 0.008) * 0.9 * 0.8)


def test_relay_rate_multiple() -> None:
    """tokens + extra_tokens x (multiple - 1): cache on input, reasoning on output."""
    assert apply_rate_multiple(1_000, 400, 0.1) == pytest.approx(640)
    assert apply_rate_multiple(1_000, 200, 3) == pytest.approx(1_400)
    billed_in, billed_out = _relay().adjusted_tokens(
        1_000,
        500,
        [ExtraTokens("cache", 400, 0.1), ExtraTokens("reasoning", 300, 2)],
    )
    assert (billed_in, billed_out) == (pytest.approx(640), pytest.approx(800))
    cost = _relay().token_cost(
        input_tokens=1_000,
        output_tokens=500,
        input_price=1.0,
        output_price=2.0,
        extras=[ExtraTokens("cache", 400, 0.1), ExtraTokens("reasoning", 300, 2)],
        channel_discount=0.5,
        user_discount=1.0,
    )
    assert cost == pytest.approx((0.64 * 1.0 + 0.8 * 2.0) * 0.5)


def test_relay_unknown_item() -> None:
    """An extra-token item the relay does not list is an error listing the items."""
    with pytest.raises(UnknownBillingItemError) as info:
        _relay().adjusted_tokens(1, 1, [ExtraTokens("video", 1, 2)])
    assert str(info.value) == (
        "unknown billing item 'video' in relay billing; known: cache, input_audio, "
        "output_audio, input_image, output_image, cache_write_5m, cache_write_1h, "
        "cache_read, reasoning"
    )


# Multiples as a relay's pricing page might list them for a Claude model (Anthropic's
# own: 1.25x for 5-minute writes, 2x for 1-hour writes, 0.1x for reads). The billing
# page names the three items but gives no numbers, so they are arguments.
CLAUDE = CacheMultiples(write_5m=1.25, write_1h=2, read=0.1)


def test_relay_profile_bills_the_cache_items_on_the_input_side() -> None:
    """The page's "Cache Write 5M/1H Tokens" and "Cache Read Tokens" are input x rate."""
    items = _relay().multiple_items
    assert (items["cache_write_5m"], items["cache_write_1h"], items["cache_read"]) == (
        "input",
        "input",
        "input",
    )


def test_relay_claude_cache_writes_and_reads_by_hand() -> None:
    """10,000 input tokens, of which 2,000 written for 5 min, 1,000 for 1 h, 4,000 read.

    Input tokens = 10,000 + 2,000 x (1.25 - 1) + 1,000 x (2 - 1) + 4,000 x (0.1 - 1)
    = 10,000 + 500 + 1,000 - 3,600 = 7,900. Cost = 7,900 / 1000 x 0.003 + 500 / 1000
    x 0.015 = 0.0237 + 0.0075 = 0.0312, then x 0.8 (channel) x 0.9 (user) = 0.022464.
    """
    cost = _relay().cache_token_cost(
        CLAUDE,
        input_tokens=10_000,
        output_tokens=500,
        input_price=0.003,
        output_price=0.015,
        cache_write_5m_tokens=2_000,
        cache_write_1h_tokens=1_000,
        cache_read_tokens=4_000,
        channel_discount=0.8,
        user_discount=0.9,
    )
    assert cost == pytest.approx(0.022464)


@pytest.mark.parametrize(
    ("cache", "billed_input"),
    [
        ({"cache_write_5m_tokens": 1_000}, 1_250),  # 1,000 + 1,000 x 0.25
        ({"cache_write_1h_tokens": 1_000}, 2_000),  # 1,000 + 1,000 x 1
        ({"cache_read_tokens": 1_000}, 100),  # 1,000 - 1,000 x 0.9
        ({"cache_read_tokens": 600}, 460),  # 1,000 - 600 x 0.9
        ({}, 1_000),
    ],
)
def test_relay_each_cache_item_at_its_multiple(cache: dict[str, int], billed_input: int) -> None:
    """1,000 input tokens at 0.002 per 1,000: each cache item moves only its own tokens."""
    cost = _relay().cache_token_cost(
        CLAUDE, input_tokens=1_000, output_tokens=0, input_price=0.002, output_price=0.01, **cache
    )
    assert cost == pytest.approx(billed_input / 1_000 * 0.002)


def test_relay_cache_extras_are_the_profiles_items() -> None:
    """CacheMultiples.extras names the relay's items, leaving out zero counts."""
    assert CLAUDE.extras(write_1h_tokens=300, read_tokens=50) == (
        ExtraTokens("cache_write_1h", 300, 2),
        ExtraTokens("cache_read", 50, 0.1),
    )
    assert CLAUDE.extras() == ()


def test_relay_cache_cost_with_other_items_and_fields() -> None:
    """Cache items combine with other extras and field multipliers, all by the page's rule.

    Input 2,000 + 1,000 x (0.1 - 1) + 500 x (3 - 1) = 2,100; output 100.
    (2.1 x 0.004 + 0.1 x 0.02) x 1.8 = (0.0084 + 0.002) x 1.8 = 0.01872.
    """
    cost = _relay().cache_token_cost(
        CLAUDE,
        input_tokens=2_000,
        output_tokens=100,
        input_price=0.004,
        output_price=0.02,
        cache_read_tokens=1_000,
        extras=[ExtraTokens("input_image", 500, 3)],
        fields=["priority"],
    )
    assert cost == pytest.approx(0.01872)


def test_relay_cache_tokens_above_the_input_are_an_error() -> None:
    """input_tokens includes the cache tokens: Anthropic-style counts without them fail fast."""
    with pytest.raises(InvalidCostError) as info:
        _relay().cache_token_cost(
            CLAUDE,
            input_tokens=10,
            output_tokens=0,
            input_price=0.003,
            output_price=0.015,
            cache_write_5m_tokens=300,
            cache_read_tokens=5_000,
        )
    assert str(info.value) == (
        "cache tokens (cache_write_5m_tokens 300 + cache_read_tokens 5000) exceed input_tokens "
        "10: input_tokens counts every input token, cache writes and reads included"
    )


def test_relay_cache_counts_and_multiples_are_checked() -> None:
    """A negative count or multiple is an InvalidCostError naming it."""
    with pytest.raises(InvalidCostError, match=r"^cache_read_tokens must be non-negative"):
        _relay().cache_token_cost(
            CLAUDE,
            input_tokens=10,
            output_tokens=0,
            input_price=1,
            output_price=1,
            cache_read_tokens=-1,
        )
    with pytest.raises(InvalidCostError, match=r"^CacheMultiples\.read must be non-negative"):
        CacheMultiples(write_5m=1.25, write_1h=2, read=-0.1)


def test_a_relay_without_the_cache_items_says_so() -> None:
    """A user's relay profile that does not list the cache items cannot bill them."""
    relay = RelayBilling(cny_per_usd=7.3, tokens_per_price_unit=1_000, multiple_items={})
    with pytest.raises(UnknownBillingItemError, match=r"^unknown billing item 'cache_read'"):
        relay.cache_token_cost(
            CLAUDE,
            input_tokens=100,
            output_tokens=0,
            input_price=1,
            output_price=1,
            cache_read_tokens=10,
        )


def test_relay_priority_field_multiplier() -> None:
    """A priority request costs x1.8 on top of the discounts."""
    cost = _relay().request_cost(
        input_price=0.4, channel_discount=0.5, user_discount=0.9, fields=["priority"]
    )
    assert cost == pytest.approx(0.4 * 0.5 * 0.9 * 1.8)


def test_relay_second_megapixel_image() -> None:
    """Per-second, per-megapixel and per-image formulas, each times the discounts."""
    relay = _relay()
    assert relay.second_cost(input_price=0.1, seconds=8, user_discount=0.5) == pytest.approx(0.4)
    assert relay.megapixel_cost(
        input_price=0.05, width_px=1024, height_px=1024, channel_discount=0.8
    ) == pytest.approx(1024 * 1024 / M * 0.05 * 0.8)
    assert relay.image_cost(input_price=0.04, images=3) == pytest.approx(0.12)


def test_relay_currency_conversion() -> None:
    """1 USD = 7.3 CNY on the relay."""
    relay = _relay()
    assert relay.to_cny(10) == pytest.approx(73.0)
    assert relay.to_usd(73) == pytest.approx(10.0)
    assert usd_to_cny(2, 7.3) == pytest.approx(14.6)
    assert cny_to_usd(14.6, 7.3) == pytest.approx(2.0)
    with pytest.raises(InvalidCostError):
        cny_to_usd(1, 0)


# --- token estimates -----------------------------------------------------------------


def test_minimax_token_estimate() -> None:
    """MiniMax: 1,600 Chinese characters are about 1,000 tokens; rounded up."""
    estimate = load_profile("minimax").token_estimate
    assert estimate == TokenEstimate(script="chinese", characters=1_600, tokens=1_000)
    assert estimate.tokens_for(1_600) == 1_000
    assert estimate.tokens_for(1) == 1
    assert estimate.tokens_in("你好，world") == 2
    assert count_script_characters("你好，world", "chinese") == 2
