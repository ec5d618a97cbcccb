"""Loading profiles, choosing tiers, resolving limits, and rejecting bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratekit._errors import (
    InvalidArgumentError,
    InvalidCostError,
    LimitsError,
    ProfileError,
    UnknownModelError,
    UnknownNameError,
    UnknownProviderError,
    UnknownTierError,
)
from ratekit._limits import DEFAULT_MARGIN_S, Limits, TokenCounting
from ratekit._profiles import (
    Profile,
    ProviderApi,
    bundled_providers,
    load_profile,
    parse_profile,
)

GOOD = """\
provider = "acme"
display_name = "Acme AI"
currency = "USD"
time_zone = "Asia/Shanghai"
source = "acme.md"
token_counting = "usage"

[[tiers]]
name = "Basic"
top_up = 0
concurrency = 2
rpm = 10
tpm = 1000

[[tiers]]
name = "Pro"
top_up = 50
concurrency = 8
rpm = 100
tpm = 10000
tpd = 500000
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acme.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return str(info.value).removeprefix(f"{path}: ")


# --- bundled profiles ----------------------------------------------------------------


def test_bundled_providers_are_the_five_pages() -> None:
    """bundled_providers() names every bundled TOML, sorted."""
    assert bundled_providers() == ("infly", "minimax", "moonshot", "relay", "stepfun")


def test_load_is_case_insensitive_and_cached() -> None:
    """A bundled name loads whatever its case, and the same immutable profile comes back."""
    assert load_profile("MoonShot") is load_profile("moonshot")
    assert load_profile("moonshot").provider == "moonshot"


def test_unknown_provider_lists_bundled() -> None:
    """An unknown provider name raises UnknownProviderError listing the bundled ones."""
    with pytest.raises(UnknownProviderError) as info:
        load_profile("OpenAI")
    assert str(info.value) == (
        "unknown provider 'OpenAI'; known: infly, minimax, moonshot, relay, stepfun"
    )


@pytest.mark.parametrize(
    ("top_up", "tier"),
    [
        (1, "Tier0"),
        (9.99, "Tier0"),
        (10, "Tier1"),
        (19.99, "Tier1"),
        (20, "Tier2"),
        (25, "Tier2"),
        (99.99, "Tier2"),
        (100, "Tier3"),
        (2999.99, "Tier4"),
        (3000, "Tier5"),
        (1e9, "Tier5"),
    ],
)
def test_moonshot_tier_for_top_up_boundaries(top_up: float, tier: str) -> None:
    """A tier is reached at exactly its cumulative top-up, not a cent before."""
    found = load_profile("moonshot").tier_for_top_up(top_up)
    assert found is not None
    assert found.name == tier


@pytest.mark.parametrize("top_up", [0, 0.99])
def test_moonshot_below_one_dollar_reaches_no_tier(top_up: float) -> None:
    """Below Moonshot's $1 minimum the account is unusable: no tier."""
    profile = load_profile("moonshot")
    assert profile.tier_for_top_up(top_up) is None
    assert profile.minimum_top_up == 1


@pytest.mark.parametrize("top_up", [-1, float("nan"), float("inf"), "20"])
def test_tier_for_top_up_rejects_bad_amounts(top_up: object) -> None:
    """A negative, non-finite or non-numeric top-up is an InvalidCostError."""
    with pytest.raises(InvalidCostError):
        load_profile("moonshot").tier_for_top_up(top_up)  # type: ignore[arg-type]


def test_moonshot_tier2_limits_for_any_model() -> None:
    """Moonshot lists no models, so kimi-k2 gets Tier2's own limits."""
    profile = load_profile("moonshot")
    tier = profile.tier_for_top_up(25)
    assert tier is not None
    assert tier is profile.tier("TIER2")
    limits = tier.limits(model="kimi-k2")
    assert limits == Limits(
        concurrency=100,
        rpm=500,
        tpm=3_000_000,
        token_counting=TokenCounting.SAFE,
        tpd_calendar_tz=None,
        margin_s=DEFAULT_MARGIN_S,
    )
    assert (limits.rpm, limits.tpm, limits.tpd) == (500, 3_000_000, None)


def test_moonshot_tier0_has_a_rolling_tpd() -> None:
    """Tier0's 1,500,000 TPD is enforced over a rolling day (the page names no calendar)."""
    limits = load_profile("moonshot").tier("tier0").limits()
    assert (limits.concurrency, limits.rpm, limits.tpm, limits.tpd) == (1, 3, 500_000, 1_500_000)
    assert limits.tpd_calendar_tz is None


def test_profile_tiers_are_in_order() -> None:
    """profile.tiers is a tuple of Tier in the page's order."""
    tiers = load_profile("stepfun").tiers
    assert isinstance(tiers, tuple)
    assert [t.name for t in tiers] == ["V0", "V1", "V2", "V3", "V4", "V5"]


def test_unknown_tier_lists_tiers() -> None:
    """An unknown tier name raises UnknownTierError listing the profile's tiers."""
    with pytest.raises(UnknownTierError) as info:
        load_profile("moonshot").tier("Tier9")
    assert str(info.value) == (
        "unknown tier 'Tier9' in profile 'moonshot'; "
        "known: Tier0, Tier1, Tier2, Tier3, Tier4, Tier5"
    )


def test_a_tier_or_model_named_by_something_else_than_a_string_is_a_typed_error() -> None:
    profile = load_profile("moonshot")
    with pytest.raises(InvalidArgumentError, match=r"^tier must be a name \(a str\), got 3$"):
        profile.tier(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^model must be a name \(a str\), got None$"):
        profile.model(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("top_up", "tier"), [(0, "free"), (0.01, "paid"), (1000, "paid")])
def test_minimax_free_and_paid(top_up: float, tier: str) -> None:
    """MiniMax: a top-up of 0 is free, anything above 0 is paid."""
    found = load_profile("minimax").tier_for_top_up(top_up)
    assert found is not None
    assert found.name == tier


@pytest.mark.parametrize(
    ("tier", "model", "rpm", "tpm"),
    [
        ("free", "MiniMax-M2", 20, 1_000_000),
        ("paid", "MiniMax-M2", 20, 1_000_000),
        ("free", "MiniMax-M2-Stable", 20, 1_000_000),
        ("paid", "MiniMax-M2-Stable", 500, 20_000_000),
        ("PAID", "minimax-m2-stable", 500, 20_000_000),
    ],
)
def test_minimax_model_limits(tier: str, model: str, rpm: int, tpm: int) -> None:
    """MiniMax's per-model limits: M2 is 20 / 1M for all, M2-Stable rises when paid."""
    limits = load_profile("minimax").tier(tier).limits(model=model)
    assert (limits.rpm, limits.tpm, limits.tpd, limits.concurrency) == (rpm, tpm, None, None)


def test_minimax_unknown_model_lists_models() -> None:
    """MiniMax lists its models with limits, so an unlisted model is an error."""
    with pytest.raises(UnknownModelError) as info:
        load_profile("minimax").tier("paid").limits(model="abab6.5s")
    assert str(info.value) == (
        "unknown model 'abab6.5s' in profile 'minimax'; known: MiniMax-M2, MiniMax-M2-Stable, "
        "speech-2.6-hd, speech-02-hd, speech-2.6-turbo, speech-02-turbo, "
        "MiniMax-Hailuo-2.3-Fast, MiniMax-Hailuo-2.3, MiniMax-Hailuo-02, Music-2.0, "
        "image-01, image-01-live"
    )


def test_minimax_tier_without_model_takes_the_strictest_models_limits() -> None:
    """MiniMax publishes limits per model only: a tier without `model` carries, for each
    number, the smallest any model has at that tier, so that a call that does not name
    its model is never let through where its model would refuse it."""
    profile = load_profile("minimax")
    for tier in profile.tiers:
        limits = tier.limits()
        per_model = [limits_of for m in profile.models if (limits_of := m.limits_for(tier.name))]
        assert per_model
        for key in ("concurrency", "rpm", "tpm", "tpd"):
            known = [getattr(numbers, key) for numbers in per_model if getattr(numbers, key)]
            assert getattr(limits, key) == (min(known) if known else None), (tier.name, key)
        for model in profile.models:
            if model.limits_for(tier.name) is None:
                continue
            own = tier.limits(model=model.name)
            assert own.rpm is None or limits.rpm is None or limits.rpm <= own.rpm
            assert own.tpm is None or limits.tpm is None or limits.tpm <= own.tpm


def test_profile_model_lookup() -> None:
    """profile.model is case-insensitive and lists the models when the name is unknown."""
    profile = load_profile("infly")
    assert profile.model("INF-CHAT-V1").name == "inf-chat-v1"
    with pytest.raises(UnknownModelError) as info:
        profile.model("gpt-4")
    assert str(info.value) == (
        "unknown model 'gpt-4' in profile 'infly'; known: "
        "inf-chat-v1, inf-chat-fin-v1, inf-med-chat-v1, inf-chat-int-v1"
    )


def test_limits_overrides_in_code() -> None:
    """Any Limits field can be overridden in code, over the model's own limits."""
    tier = load_profile("minimax").tier("paid")
    limits = tier.limits(
        model="MiniMax-M2-Stable", rpm=400, concurrency=3, margin_s=0.5, pacing=True
    )
    assert (limits.rpm, limits.tpm, limits.concurrency) == (400, 20_000_000, 3)
    assert limits.margin_s == 0.5
    assert limits.pacing is True
    unlimited = load_profile("moonshot").tier("Tier0").limits(tpd=None)
    assert unlimited.tpd is None


def test_limits_override_tpd_calendar() -> None:
    """A user can switch TPD to the provider's calendar day in code."""
    profile = load_profile("moonshot")
    limits = profile.tier("Tier0").limits(tpd_calendar_tz=profile.time_zone)
    assert limits.tpd_calendar_tz == "Asia/Shanghai"


def test_limits_unknown_override_is_an_error() -> None:
    """A misspelt override is a LimitsError naming the known fields."""
    with pytest.raises(LimitsError, match=r"^unknown Limits field 'rmp'; known: concurrency, "):
        load_profile("moonshot").tier("Tier1").limits(rmp=5)


def test_limits_bad_override_value_is_an_error() -> None:
    """A bad override value is rejected by Limits itself."""
    with pytest.raises(LimitsError):
        load_profile("moonshot").tier("Tier1").limits(rpm=-5)


def test_with_overrides_changes_one_tier() -> None:
    """with_overrides gives a new profile with one tier's numbers replaced."""
    profile = load_profile("relay")
    mine = profile.with_overrides("DEFAULT", rpm=60, tpm=100_000, concurrency=4)
    assert mine.tier("default").limits() == Limits(
        concurrency=4,
        rpm=60,
        tpm=100_000,
        token_counting=TokenCounting.SAFE,
        margin_s=DEFAULT_MARGIN_S,
    )
    assert profile.tier("default").rpm is None
    with pytest.raises(LimitsError):
        profile.with_overrides("default", rpm=0)
    with pytest.raises(LimitsError, match=r"^unknown tier limit 'rmp'; known: "):
        profile.with_overrides("default", rmp=1)


def test_relay_has_one_unlimited_tier() -> None:
    """The relay page has no tier table: one tier from 0 with no limits."""
    profile = load_profile("relay")
    assert profile.tier_names == ("default",)
    tier = profile.tier_for_top_up(0)
    assert tier is not None
    assert tier.limits() == Limits(margin_s=DEFAULT_MARGIN_S)
    assert tier.limits(model="gpt-4o").rpm is None


def test_user_file_by_path_and_string(tmp_path: Path) -> None:
    """A user's own TOML loads from a Path or a string path."""
    path = _write(tmp_path, GOOD)
    for given in (path, str(path)):
        profile = load_profile(given)
        assert isinstance(profile, Profile)
        assert profile.provider == "acme"
        assert profile.path == str(path)
        pro = profile.tier_for_top_up(50)
        assert pro is not None
        limits = pro.limits()
        assert limits.token_counting is TokenCounting.USAGE
        assert (limits.concurrency, limits.rpm, limits.tpm, limits.tpd) == (8, 100, 10000, 500000)


def test_calendar_tpd_window_uses_time_zone(tmp_path: Path) -> None:
    """tpd_window = "calendar" makes TPD reset at midnight in the profile's zone."""
    path = _write(
        tmp_path, GOOD.replace('source = "acme.md"', 'source = "acme.md"\ntpd_window = "calendar"')
    )
    limits = load_profile(path).tier("pro").limits()
    assert limits.tpd_calendar_tz == "Asia/Shanghai"
    assert load_profile(path).tier("basic").limits().tpd_calendar_tz is None


# --- APIs and base URLs ---------------------------------------------------------------

APIS = """
[apis.openai]
base_url = "https://api.acme.test/v1"

[apis.anthropic]
base_url = "https://api.acme.test/anthropic"
note = "Chat models only"
"""


def _with_apis(apis: str) -> str:
    """GOOD with `apis` inserted before its first tier (top-level keys stay above)."""
    return GOOD.replace("[[tiers]]", apis + "\n[[tiers]]", 1)


def test_apis_load_as_typed_values() -> None:
    """Each [apis.NAME] table becomes a ProviderApi, in file order."""
    profile = parse_profile(_with_apis(APIS))
    assert profile.api_names == ("openai", "anthropic")
    assert profile.api("anthropic") == ProviderApi(
        "anthropic", "https://api.acme.test/anthropic", "Chat models only"
    )
    assert profile.base_url("openai") == "https://api.acme.test/v1"
    assert profile.base_url("OpenAI") == "https://api.acme.test/v1"


def test_a_profile_without_apis_serves_none() -> None:
    """No [apis] table: no API is listed, and asking for one names none."""
    profile = parse_profile(GOOD)
    assert profile.apis == {}
    with pytest.raises(UnknownNameError) as info:
        profile.base_url("openai")
    assert str(info.value) == (
        "unknown name 'openai' in the APIs of profile 'acme' (its page names no host: give "
        "yours with profile.with_base_url); known: none"
    )
    # A host of the user's own: https, or plain http on loopback (a local provider).
    local = profile.with_base_url("openai", "http://127.0.0.1:8000/v1")
    assert local.base_url("openai") == "http://127.0.0.1:8000/v1"


def test_an_api_the_provider_does_not_serve_lists_those_it_does() -> None:
    """StepFun lists only its OpenAI-compatible API: asking for Anthropic's names it."""
    with pytest.raises(UnknownNameError) as info:
        load_profile("stepfun").base_url("anthropic")
    assert str(info.value) == (
        "unknown name 'anthropic' in the APIs of profile 'stepfun'; known: openai"
    )
    assert info.value.known == ("openai",)


def test_bundled_base_urls() -> None:
    """The bundled profiles' base URLs, for the accounts their pages describe."""
    moonshot = load_profile("moonshot")
    assert moonshot.base_url("openai") == "https://api.moonshot.ai/v1"
    assert moonshot.base_url("anthropic") == "https://api.moonshot.ai/anthropic"
    minimax = load_profile("minimax")
    assert minimax.base_url("openai") == "https://api.minimaxi.com/v1"
    assert minimax.base_url("anthropic") == "https://api.minimaxi.com/anthropic"
    assert "MiniMax-M2" in minimax.api("anthropic").note
    assert load_profile("stepfun").base_url("openai") == "https://api.stepfun.ai/v1"
    assert load_profile("infly").base_url("openai") == "https://api.infly.cn/v1"
    assert load_profile("relay").api_names == ()


def test_with_base_url_adds_or_replaces_one_api() -> None:
    """with_base_url gives a copy: the relay gets the user's host, others a new URL."""
    relay = load_profile("relay")
    mine = relay.with_base_url("OPENAI", "https://relay.example.test/v1")
    assert mine.api("openai") == ProviderApi("openai", "https://relay.example.test/v1")
    assert relay.api_names == ()
    minimax = load_profile("minimax").with_base_url("anthropic", "https://proxy.test/anthropic")
    assert minimax.base_url("anthropic") == "https://proxy.test/anthropic"
    assert "MiniMax-M2" in minimax.api("anthropic").note  # the note stays
    assert minimax.base_url("openai") == "https://api.minimaxi.com/v1"
    assert load_profile("minimax").base_url("anthropic") == "https://api.minimaxi.com/anthropic"


def test_with_base_url_rejects_unknown_apis_and_bad_urls() -> None:
    """An API ratekit does not know, or a URL that is not https, is a typed error."""
    profile = load_profile("relay")
    with pytest.raises(UnknownNameError) as info:
        profile.with_base_url("grpc", "https://relay.example.test")
    assert (
        str(info.value) == "unknown name 'grpc' in the APIs ratekit knows; known: openai, anthropic"
    )
    with pytest.raises(InvalidArgumentError) as bad:
        profile.with_base_url("openai", "http://relay.example.test/v1")
    assert str(bad.value) == (
        "with_base_url: base_url: expected an https URL, got 'http://relay.example.test/v1'"
    )
    with pytest.raises(InvalidArgumentError) as secret:
        profile.with_base_url("openai", "https://me:secret@relay.example.test/v1")
    assert str(secret.value) == "with_base_url: base_url: expected no user or password in the URL"


def test_profile_apis_cannot_be_changed_in_place() -> None:
    """A loaded profile's apis mapping is read-only: profiles are shared values."""
    apis = load_profile("moonshot").apis
    with pytest.raises(TypeError):
        apis["openai"] = ProviderApi("openai", "https://evil.test/v1")  # type: ignore[index]


@pytest.mark.parametrize(
    ("apis", "message"),
    [
        ('apis = "openai"\n', "apis: expected a table, got 'openai'"),
        (
            '[apis.grpc]\nbase_url = "https://api.acme.test"\n',
            "apis.grpc: unknown key 'grpc'; allowed: openai, anthropic",
        ),
        (
            '[apis]\nopenai = "https://api.acme.test/v1"\n',
            "apis.openai: expected a table, got 'https://api.acme.test/v1'",
        ),
        ("[apis.openai]\n", "apis.openai.base_url: required key is missing"),
        (
            '[apis.openai]\nbase_url = "https://api.acme.test/v1"\nmodels = "all"\n',
            "apis.openai.models: unknown key 'models'; allowed: base_url, note",
        ),
        (
            "[apis.openai]\nbase_url = 443\n",
            "apis.openai.base_url: expected an https URL, got 443",
        ),
        (
            '[apis.openai]\nbase_url = "http://api.acme.test/v1"\n',
            "apis.openai.base_url: expected an https URL, got 'http://api.acme.test/v1'",
        ),
        (
            '[apis.openai]\nbase_url = "api.acme.test/v1"\n',
            "apis.openai.base_url: expected an https URL, got 'api.acme.test/v1'",
        ),
        (
            '[apis.openai]\nbase_url = "https://"\n',
            "apis.openai.base_url: expected an https URL with a host and no spaces, got 'https://'",
        ),
        (
            '[apis.openai]\nbase_url = "https://api.acme.test/v1/"\n',
            "apis.openai.base_url: expected no trailing '/', got 'https://api.acme.test/v1/'",
        ),
        (
            '[apis.openai]\nbase_url = "https://api.acme.test/v1?key=1"\n',
            "apis.openai.base_url: expected no query or fragment, "
            "got 'https://api.acme.test/v1?key=1'",
        ),
        (
            '[apis.openai]\nbase_url = "https://me:pw@api.acme.test/v1"\n',
            "apis.openai.base_url: expected no user or password in the URL",
        ),
        (
            '[apis.anthropic]\nbase_url = "https://api.acme.test/anthropic"\nnote = 1\n',
            "apis.anthropic.note: expected a non-empty string, got 1",
        ),
    ],
)
def test_bad_apis_tables(tmp_path: Path, apis: str, message: str) -> None:
    """A malformed [apis] table names the file, the field and the value."""
    assert _error(tmp_path, _with_apis(apis)) == message


# --- cache reads -----------------------------------------------------------------------


def test_cache_reads_count_by_default() -> None:
    """A profile that does not say counts cache reads toward its token rates (the safe way)."""
    assert parse_profile(GOOD).cache_reads_count is True
    for name in bundled_providers():
        assert load_profile(name).cache_reads_count is True


def test_cache_reads_count_can_be_turned_off() -> None:
    """A provider whose page exempts cache reads says cache_reads_count = false."""
    text = GOOD.replace(
        'token_counting = "usage"', 'token_counting = "usage"\ncache_reads_count = false'
    )
    assert parse_profile(text).cache_reads_count is False


def test_cache_reads_count_must_be_a_boolean(tmp_path: Path) -> None:
    """A string or number is not a yes or no."""
    text = GOOD.replace(
        'token_counting = "usage"', 'token_counting = "usage"\ncache_reads_count = "yes"'
    )
    assert _error(tmp_path, text) == "cache_reads_count: expected true or false, got 'yes'"


def test_missing_file(tmp_path: Path) -> None:
    """A file that does not exist is a ProfileError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: file: cannot be read: No such file or directory"


# --- bad files: exact messages ---------------------------------------------------------


def test_wrong_type(tmp_path: Path) -> None:
    """A string where a number belongs names the field and the value."""
    assert _error(tmp_path, GOOD.replace("rpm = 100", 'rpm = "fast"')) == (
        "tiers[1].rpm: expected a positive number, got 'fast'"
    )


def test_negative_rpm(tmp_path: Path) -> None:
    """A negative rpm is rejected with its value."""
    assert _error(tmp_path, GOOD.replace("rpm = 10\n", "rpm = -10\n")) == (
        "tiers[0].rpm: expected a positive number, got -10"
    )


def test_an_rpm_too_large_to_count_exactly_is_rejected_at_load(tmp_path: Path) -> None:
    """A limit beyond 1e15 (where window sums stop being exact) names its field at load."""
    assert _error(tmp_path, GOOD.replace("rpm = 10\n", "rpm = 1e20\n")) == (
        "tiers[0].rpm: expected a number up to 1e+15, got 1e+20"
    )


def test_zero_tpm(tmp_path: Path) -> None:
    """A limit of zero is not a limit (leave the key out for unlimited)."""
    assert _error(tmp_path, GOOD.replace("tpm = 1000\n", "tpm = 0\n")) == (
        "tiers[0].tpm: expected a positive number, got 0"
    )


def test_fractional_concurrency(tmp_path: Path) -> None:
    """Concurrency must be a whole number of calls."""
    assert _error(tmp_path, GOOD.replace("concurrency = 2", "concurrency = 2.5")) == (
        "tiers[0].concurrency: expected a positive integer, got 2.5"
    )


def test_unknown_key(tmp_path: Path) -> None:
    """A typo in a key is an error listing the allowed keys."""
    assert _error(tmp_path, GOOD.replace("rpm = 100", "rmp = 100")) == (
        "tiers[1].rmp: unknown key 'rmp'; allowed: name, top_up, top_up_above, "
        "concurrency, rpm, tpm, tpd, note"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    """A typo at the top level is an error too."""
    assert _error(tmp_path, "currancy = 'USD'\n" + GOOD).startswith(
        "currancy: unknown key 'currancy'; allowed: provider, display_name, "
    )


def test_tiers_out_of_order(tmp_path: Path) -> None:
    """Tiers must be listed in strictly increasing top-up order."""
    assert _error(tmp_path, GOOD.replace("top_up = 50", "top_up = 0")) == (
        "tiers[1].top_up: 0 does not come after tiers[0] (top_up 0); "
        "list tiers in strictly increasing top-up order"
    )


def test_duplicate_tier_name(tmp_path: Path) -> None:
    """Two tiers whose names differ only in case are duplicates."""
    assert _error(tmp_path, GOOD.replace('name = "Pro"', 'name = "BASIC"')) == (
        "tiers[1].name: 'BASIC' duplicates tiers[0].name 'Basic' (tier names are case-insensitive)"
    )


def test_bad_token_counting(tmp_path: Path) -> None:
    """token_counting must be reserve, usage or safe."""
    assert _error(tmp_path, GOOD.replace('"usage"', '"lazy"')) == (
        "token_counting: expected one of 'reserve', 'usage', 'safe', got 'lazy'"
    )


def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line."""
    assert _error(tmp_path, GOOD.replace("rpm = 100", "rpm 100")) == (
        "line 19: invalid TOML: Expected '=' after a key in a key/value pair (at line 19, column 5)"
    )


def test_missing_required_field(tmp_path: Path) -> None:
    """A profile without its currency is rejected, naming the key."""
    assert _error(tmp_path, GOOD.replace('currency = "USD"\n', "")) == (
        "currency: required key is missing"
    )


def test_missing_tier_top_up(tmp_path: Path) -> None:
    """A tier must say what unlocks it."""
    assert _error(tmp_path, GOOD.replace("top_up = 50\n", "")) == (
        "tiers[1].top_up: required key is missing"
    )


def test_bad_currency_and_time_zone(tmp_path: Path) -> None:
    """Currency and time zone are checked."""
    assert _error(tmp_path, GOOD.replace('"USD"', '"EUR"')) == (
        "currency: expected one of 'USD', 'CNY', got 'EUR'"
    )
    assert _error(tmp_path, GOOD.replace("Asia/Shanghai", "Mars/Base")) == (
        "time_zone: unknown time zone 'Mars/Base'"
    )


def test_negative_price(tmp_path: Path) -> None:
    """Prices may be zero but never negative."""
    text = GOOD + '\n[[models]]\nname = "m"\n[models.prices]\noutput_per_1m_tokens = -0.5\n'
    assert _error(tmp_path, text) == (
        "models[0].prices.output_per_1m_tokens: expected a non-negative number, got -0.5"
    )


def test_model_limits_for_unknown_tier(tmp_path: Path) -> None:
    """A model's override must name a tier of the profile."""
    text = GOOD + '\n[[models]]\nname = "m"\n[models.limits.gold]\nrpm = 5\n'
    assert _error(tmp_path, text) == (
        "models[0].limits.gold: unknown tier 'gold'; tiers: Basic, Pro"
    )


def test_duplicate_model(tmp_path: Path) -> None:
    """Model names are unique, case-insensitively."""
    text = GOOD + '\n[[models]]\nname = "m1"\n\n[[models]]\nname = "M1"\n'
    assert _error(tmp_path, text) == (
        "models[1].name: 'M1' duplicates models[0].name 'm1' (model names are case-insensitive)"
    )


def test_parse_profile_names_its_source() -> None:
    """parse_profile is pure and names whatever source it is given."""
    with pytest.raises(ProfileError) as info:
        parse_profile(GOOD.replace("tpm = 10000", "tpm = true"), "inline")
    assert str(info.value) == "inline: tiers[1].tpm: expected a positive number, got True"
    assert info.value.field == "tiers[1].tpm"
    assert info.value.source == "inline"
