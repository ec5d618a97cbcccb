"""The bundled profiles say exactly what the providers' pages say.

`PAGES` below was typed by hand from the seed pages (`SEED_FILES`, in the seeds folder
of the project's shared files), not generated from the TOML files; the base URLs under
"apis" come from each provider's API docs, named in the TOML beside each one. Every
scalar in every bundled TOML (except free-text notes) must appear here with the same
value, and nothing here may be missing from it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ratekit._profiles import bundled_providers, load_profile

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "profiles"
# Where the project's shared files sit beside a checkout (the tests that read the
# seed pages skip when they are not there).
SEEDS_DIR = ROOT.parent / "shared" / "seeds"
FREE_TEXT = {"notes", "note", "display_name"}
BOOLEAN_KEYS = {"cache_reads_count"}

SEED_FILES = {
    "moonshot": "moonshot-kimi-recharge-and-rate-limits.md",
    "stepfun": "stepfun-pricing-and-rate-limits.md",
    "minimax": "minimax-pay-as-you-go-pricing.md",
    "infly": "infly-pricing-and-rate-limits.md",
    "relay": "relay-platform-billing-rules.md",
}


def _tier(top_up: float, concurrency: int, rpm: int, tpm: int, tpd: int | None = None) -> Any:
    row = {"top_up": top_up, "concurrency": concurrency, "rpm": rpm, "tpm": tpm}
    if tpd is not None:
        row["tpd"] = tpd
    return row


def _tokens(miss: float, hit: float | None, out: float, write: float | None = None) -> Any:
    prices = {"input_per_1m_tokens": miss, "output_per_1m_tokens": out}
    if hit is not None:
        prices["cached_input_per_1m_tokens"] = hit
    if write is not None:
        prices["cache_write_per_1m_tokens"] = write
    return {"prices": prices}


PAGES: dict[str, dict[str, Any]] = {
    # moonshot-kimi-recharge-and-rate-limits.md (README decodes the table)
    "moonshot": {
        "provider": "moonshot",
        "currency": "USD",
        "time_zone": "Asia/Shanghai",
        "source": '"Recharge and Rate Limits", Moonshot AI (Kimi) API docs '
        "(the page gives no address), as read for ratekit, 2026-11",
        "token_counting": "safe",
        "cache_reads_count": True,
        "tpd_window": "rolling",
        "minimum_top_up": 1,
        # The page is the global platform's (dollars): api.moonshot.ai, not .cn.
        "apis": {
            "openai": {"base_url": "https://api.moonshot.ai/v1"},
            "anthropic": {"base_url": "https://api.moonshot.ai/anthropic"},
        },
        "tiers": {
            "Tier0": _tier(1, 1, 3, 500_000, 1_500_000),
            "Tier1": _tier(10, 50, 200, 2_000_000),
            "Tier2": _tier(20, 100, 500, 3_000_000),
            "Tier3": _tier(100, 200, 5_000, 3_000_000),
            "Tier4": _tier(1_000, 400, 5_000, 4_000_000),
            "Tier5": _tier(3_000, 1_000, 10_000, 5_000_000),
        },
        "models": {},
    },
    # stepfun-pricing-and-rate-limits.md
    "stepfun": {
        "provider": "stepfun",
        "currency": "USD",
        "time_zone": "Asia/Shanghai",
        "source": '"Pricing and Rate Limits", StepFun platform docs (the page names their '
        "index, https://platform.stepfun.ai/docs/llms.txt), as read for ratekit, 2026-11",
        "token_counting": "safe",
        "cache_reads_count": True,
        "tpd_window": "rolling",
        # The page is the international platform's (dollars): api.stepfun.ai, not .com.
        "apis": {"openai": {"base_url": "https://api.stepfun.ai/v1"}},
        "character_counting": {"chinese": 1, "letter": 0.5, "punctuation": 0.5, "other": 1},
        "tiers": {
            "V0": _tier(0, 5, 10, 5_000_000),
            "V1": _tier(15, 100, 1_000, 20_000_000),
            "V2": _tier(70, 200, 5_000, 30_000_000),
            "V3": _tier(300, 400, 10_000, 40_000_000),
            "V4": _tier(700, 1_000, 20_000, 50_000_000),
            "V5": _tier(1_500, 10_000, 200_000, 100_000_000),
        },
        "models": {
            "step-3.7-flash": _tokens(0.20, 0.04, 1.15),
            "step-3.5-flash-2603": _tokens(0.10, 0.02, 0.30),
            "step-3.5-flash": _tokens(0.10, 0.02, 0.30),
            "stepaudio-2.5-tts": {"prices": {"per_10k_characters": 0.85, "per_voice": 1.50}},
            "step-tts-2": {"prices": {"per_10k_characters": 0.40, "per_voice": 1.50}},
            "stepaudio-2.5-asr": {"prices": {"per_hour": 0.022}},
        },
    },
    # minimax-pay-as-you-go-pricing.md
    "minimax": {
        "provider": "minimax",
        "currency": "CNY",
        "time_zone": "Asia/Shanghai",
        "source": '"按量计费" (pay-as-you-go pricing), MiniMax open platform docs (the page '
        "names their index, https://platform.minimaxi.com/docs/llms.txt), as read for "
        "ratekit, 2026-11",
        "token_counting": "safe",
        "cache_reads_count": True,
        "tpd_window": "rolling",
        # The page is the China platform's (yuan): api.minimaxi.com.
        "apis": {
            "openai": {"base_url": "https://api.minimaxi.com/v1"},
            "anthropic": {"base_url": "https://api.minimaxi.com/anthropic"},
        },
        "character_counting": {"chinese": 2, "letter": 1, "punctuation": 1, "other": 1},
        "token_estimate": {"script": "chinese", "characters": 1_600, "tokens": 1_000},
        "tiers": {"free": {"top_up": 0}, "paid": {"top_up_above": 0}},
        "models": {
            "MiniMax-M2": {
                **_tokens(2.1, 0.21, 8.4, 2.625),
                "limits": {
                    "free": {"rpm": 20, "tpm": 1_000_000},
                    "paid": {"rpm": 20, "tpm": 1_000_000},
                },
            },
            "MiniMax-M2-Stable": {
                **_tokens(2.1, 0.21, 8.4, 2.625),
                "limits": {
                    "free": {"rpm": 20, "tpm": 1_000_000},
                    "paid": {"rpm": 500, "tpm": 20_000_000},
                },
            },
            "speech-2.6-hd": {"prices": {"per_10k_characters": 3.5, "per_voice": 9.9}},
            "speech-02-hd": {"prices": {"per_10k_characters": 3.5, "per_voice": 9.9}},
            "speech-2.6-turbo": {"prices": {"per_10k_characters": 2, "per_voice": 9.9}},
            "speech-02-turbo": {"prices": {"per_10k_characters": 2, "per_voice": 9.9}},
            "MiniMax-Hailuo-2.3-Fast": {
                "prices": {"per_video": {"768P-6s": 1.35, "768P-10s": 2.25, "1080P-6s": 2.31}}
            },
            "MiniMax-Hailuo-2.3": {
                "prices": {"per_video": {"768P-6s": 2.00, "768P-10s": 4.00, "1080P-6s": 3.50}}
            },
            "MiniMax-Hailuo-02": {
                "prices": {
                    "per_video": {
                        "768P-6s": 2.00,
                        "768P-10s": 4.00,
                        "1080P-6s": 3.50,
                        "512P-6s": 0.60,
                        "512P-10s": 1.00,
                    }
                }
            },
            "Music-2.0": {"prices": {"per_song": 0.25}},
            "image-01": {"prices": {"per_image": 0.025}},
            "image-01-live": {"prices": {"per_image": 0.025}},
        },
    },
    # infly-pricing-and-rate-limits.md (README decodes the table); one price in and out
    "infly": {
        "provider": "infly",
        "currency": "CNY",
        "time_zone": "Asia/Shanghai",
        "source": '"Product Pricing", INF (infly) open platform docs (the page gives no '
        "address), as read for ratekit, 2026-11",
        "token_counting": "safe",
        "cache_reads_count": True,
        "tpd_window": "rolling",
        "apis": {"openai": {"base_url": "https://api.infly.cn/v1"}},
        "tiers": {
            "Free": _tier(0, 1, 4, 32_000),
            "Tier1": _tier(500, 4, 20, 128_000),
            "Tier2": _tier(3_000, 8, 80, 256_000),
            "Tier3": _tier(10_000, 24, 240, 384_000),
            "Tier4": _tier(50_000, 32, 320, 512_000),
            "Tier5": _tier(100_000, 48, 480, 768_000),
        },
        "models": {
            "inf-chat-v1": _tokens(10, None, 10),
            "inf-chat-fin-v1": _tokens(20, None, 20),
            "inf-med-chat-v1": _tokens(20, None, 20),
            "inf-chat-int-v1": _tokens(20, None, 20),
        },
    },
    # relay-platform-billing-rules.md: no tier table, so one unlimited tier
    "relay": {
        "provider": "relay",
        "currency": "USD",
        "time_zone": "Asia/Shanghai",
        "source": '"Currency and Billing Information", the relay platform\'s billing rules '
        "(the page gives no address), as read for ratekit, 2026-11",
        "token_counting": "safe",
        "cache_reads_count": True,
        "tpd_window": "rolling",
        # No "apis": the page names no host (each relay has its own).
        "tiers": {"default": {"top_up": 0}},
        "models": {},
        "relay": {
            "cny_per_usd": 7.3,
            "tokens_per_price_unit": 1_000,
            "multiple_items": {
                "cache": "input",
                "input_audio": "input",
                "output_audio": "output",
                "input_image": "input",
                "output_image": "output",
                "cache_write_5m": "input",
                "cache_write_1h": "input",
                "cache_read": "input",
                "reasoning": "output",
            },
            "field_multipliers": {"priority": 1.8},
        },
    },
}


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    """Scalar leaves by dotted path; tiers and models keyed by name, free text dropped."""
    if isinstance(value, dict):
        leaves: dict[str, Any] = {}
        for key, item in value.items():
            if key not in FREE_TEXT:
                leaves.update(_flatten(item, f"{path}.{key}" if path else key))
        return leaves
    return {path: value}


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: {k: v for k, v in row.items() if k != "name"} for row in rows}


def _toml_as_table(provider: str) -> dict[str, Any]:
    data = tomllib.loads((PROFILES_DIR / f"{provider}.toml").read_text(encoding="utf-8"))
    data["tiers"] = _by_name(data["tiers"])
    data["models"] = _by_name(data.get("models", []))
    return data


def test_every_page_has_a_bundled_profile() -> None:
    """The bundled providers are exactly the pages in the table."""
    assert set(bundled_providers()) == set(PAGES)


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_toml_numbers_equal_the_page(provider: str) -> None:
    """Every tier, model and price number in the TOML equals the hand-typed page table."""
    expected = PAGES[provider]
    actual = _toml_as_table(provider)
    if "models" not in expected:
        expected = {**expected, "models": {}}
    assert _flatten(actual) == _flatten(expected)
    for leaf_path, value in _flatten(actual).items():
        assert (type(value) is bool) == (leaf_path in BOOLEAN_KEYS), leaf_path


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_toml_has_no_tier_or_model_the_page_lacks(provider: str) -> None:
    """The TOML lists the page's tiers in the page's order, and only its models."""
    actual = _toml_as_table(provider)
    assert list(actual["tiers"]) == list(PAGES[provider]["tiers"])
    assert set(actual["models"]) == set(PAGES[provider].get("models", {}))


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_toml_names_its_page_and_seed_file_in_comments(provider: str) -> None:
    """The `# Source:` line names the page as `source` does; `# Seed file:` names the seed."""
    text = (PROFILES_DIR / f"{provider}.toml").read_text(encoding="utf-8")
    source_lines = [line for line in text.splitlines() if line.startswith("# Source:")]
    assert source_lines == [f"# Source: {PAGES[provider]['source']}"]
    assert f"\n# Seed file: {SEED_FILES[provider]}" in text


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_toml_names_no_path_on_a_machine(provider: str) -> None:
    """No bundled profile names a file by an absolute path: no user has it."""
    text = (PROFILES_DIR / f"{provider}.toml").read_text(encoding="utf-8")
    assert re.search(r"(?<![\w.:/])/(work|home|root|tmp|Users|mnt)/", text) is None
    assert "/shared/seeds" not in text


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_source_names_the_seed_pages_title_and_address(provider: str) -> None:
    """`source` quotes the seed page's title, dates the reading, and any address it gives."""
    seed = SEEDS_DIR / SEED_FILES[provider]
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"the seed pages are not beside this checkout ({SEEDS_DIR})")
    page = seed.read_text(encoding="utf-8")
    source = PAGES[provider]["source"]
    title = re.match(r'"([^"]+)"', source)
    assert title is not None, source
    assert title.group(1) in page
    for address in re.findall(r"https://\S+?(?=[,)]|$)", source):
        assert address in page
    assert source.endswith("as read for ratekit, 2026-11")


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_loaded_profile_matches_the_page(provider: str) -> None:
    """The loader keeps the numbers: tier limits and thresholds survive loading."""
    profile = load_profile(provider)
    page_tiers = PAGES[provider]["tiers"]
    assert profile.tier_names == tuple(page_tiers)
    for tier in profile.tiers:
        row = page_tiers[tier.name]
        threshold = row.get("top_up", row.get("top_up_above"))
        assert tier.top_up == threshold
        assert tier.top_up_inclusive == ("top_up" in row)
        for key in ("concurrency", "rpm", "tpm", "tpd"):
            assert getattr(tier, key) == row.get(key), (tier.name, key)


@pytest.mark.parametrize("provider", sorted(PAGES))
def test_loaded_profile_serves_the_apis_and_counts_cache_reads(provider: str) -> None:
    """The loader keeps the APIs and their base URLs, and says cache reads count."""
    profile = load_profile(provider)
    apis = PAGES[provider].get("apis", {})
    assert profile.api_names == tuple(apis)
    for name, row in apis.items():
        assert profile.base_url(name) == row["base_url"]
        assert profile.api(name).name == name
    assert profile.cache_reads_count is PAGES[provider]["cache_reads_count"]
