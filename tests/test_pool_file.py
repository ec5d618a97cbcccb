"""Pool files (``--pool pool.toml``): read, checked field by field, and simulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ratekit import Limits
from ratekit._pool_file import load_pool, parse_pool
from ratekit.cli import main
from ratekit.cli._batch import BatchConfig, run_batch
from ratekit.errors import ProfileError
from ratekit.testing.mock_provider import MockProvider

from .redis_server import RedisServer

POOL = """
prefer = "order"
out_s = 120

[accounts.kimi-a]
provider = "moonshot"
tier = "tier1"
rpm = 60
api_key_env = "KIMI_KEY_A"

[accounts.kimi-b]
provider = "moonshot"
top_up = 1
rpm = 120
models = ["kimi-k2"]

[accounts.relay]
provider = "relay"
base_url = "http://127.0.0.1:9/v1"
models = {"kimi-k2" = "moonshot/kimi-k2"}
discount = 0.8
namespace = "relay-7"
"""


def test_a_pool_file_gives_its_accounts_in_order(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(POOL)
    pool = load_pool(path)
    assert (pool.prefer, pool.out_s) == ("order", 120)
    assert [a.name for a in pool.accounts] == ["kimi-a", "kimi-b", "relay"]
    kimi_a, kimi_b, relay = pool.accounts
    assert kimi_a.account.limits(None).rpm == 60
    assert kimi_a.account.tier.name == "Tier1"
    assert kimi_a.api_key_env == "KIMI_KEY_A"
    assert kimi_a.url() == kimi_a.account.profile.base_url("openai")
    assert kimi_b.account.tier.name == "Tier0"
    assert kimi_b.models == ["kimi-k2"]
    assert relay.models == {"kimi-k2": "moonshot/kimi-k2"}
    assert (relay.discount, relay.namespace, relay.url()) == (
        0.8,
        "relay-7",
        "http://127.0.0.1:9/v1",
    )
    assert kimi_a.namespace == "kimi-a"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"pool: accounts: needs at least one \[accounts.<name>\] table"),
        ({"accounts": {"a": {"provider": "moonshot"}}, "speed": 1}, "pool: speed: unknown key"),
        ({"accounts": {"a": {}}}, "pool: accounts.a.provider: is required"),
        ({"accounts": {"a": {"provider": "nope"}}}, "pool: accounts.a: unknown provider 'nope'"),
        (
            {"accounts": {"a": {"provider": "moonshot", "tier": "gold"}}},
            "pool: accounts.a: unknown tier 'gold'",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "rpm": -1}}},
            "pool: accounts.a: ",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "api_key": "sk-..."}}},
            "pool: accounts.a.api_key: unknown key",
        ),
        (
            {"accounts": {"a": {"provider": "relay"}}},
            "pool: accounts.a.base_url: is required: the relay profile names no",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "base_url": "ftp://x"}}},
            "pool: accounts.a.base_url: must be an http",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "models": "kimi"}}},
            "pool: accounts.a.models: must be a non-empty list of model names",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "models": []}}},
            "pool: accounts.a.models: must be a non-empty list of model names",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "models": {"": "kimi-k2"}}}},
            "pool: accounts.a.models: must be a non-empty list of model names",
        ),
        (
            {"accounts": {"a": {"provider": "moonshot", "discount": 0}}},
            r"pool: accounts.a.discount: must be in \(0, 1e6\]",
        ),
        (
            {"prefer": "fast", "accounts": {"a": {"provider": "moonshot"}}},
            "pool: prefer: must be one of order, cheapest, headroom",
        ),
        (
            {
                "prefer": "cheapest",
                "accounts": {"a": {"provider": "moonshot"}, "b": {"provider": "minimax"}},
            },
            "pool: prefer: cheapest compares prices in one currency; the accounts price in "
            "CNY, USD",
        ),
        (
            {"out_s": -5, "accounts": {"a": {"provider": "moonshot"}}},
            r"pool: out_s: must be in \[0, 86400\]",
        ),
    ],
)
def test_a_bad_pool_file_names_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_pool(data, "pool")


def test_an_unreadable_pool_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot be read"):
        load_pool(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[accounts]\n")
    with pytest.raises(ProfileError, match="is not UTF-8 text"):
        load_pool(binary)
    broken = tmp_path / "broken.toml"
    broken.write_text("[accounts.a\n")
    with pytest.raises(ProfileError, match="is not valid TOML"):
        load_pool(broken)


SIMULATED = """
[accounts.small]
provider = "moonshot"
tier = "tier1"
rpm = 100

[accounts.large]
provider = "moonshot"
tier = "tier1"
rpm = 200
"""


def _simulate(tmp_path: Path, *args: str) -> tuple[int, str]:
    path = tmp_path / "pool.toml"
    path.write_text(SIMULATED)
    result = CliRunner().invoke(main, ["simulate", "--pool", str(path), *args])
    return result.exit_code, result.output


def test_simulate_a_pool_against_one_strict_provider_per_account(tmp_path: Path) -> None:
    """`ratekit simulate --pool`: each account's provider enforces its own limits; the
    pool's calls reach both with no 429, each at its own rate."""
    # 300 a minute at x10: 50 calls a second, well within one SDK process on a busy
    # machine (at x30 the client's CPU binds, and the account asked last is starved).
    code, output = _simulate(tmp_path, "--calls", "600", "--workers", "60", "--speed", "10")
    assert code == 0, output
    assert "600 ok, 0 failed; 429s at the providers: 0" in output
    rows = {line.split()[1]: line for line in output.splitlines() if line.startswith("│")}
    assert set(rows) == {"small", "large"}
    # Each served at its own rate: the larger account took more, both took some.
    calls = {name: int(row.split("│")[3].replace(",", "")) for name, row in rows.items()}
    assert sum(calls.values()) == 600
    assert 0 < calls["small"] < calls["large"]


def test_simulate_a_pool_in_processes_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    code, output = _simulate(
        tmp_path,
        "--calls", "600",
        "--workers", "60",
        "--speed", "10",
        "--processes", "2",
        "--redis", redis_server.url,
    )  # fmt: skip
    assert code == 0, output
    assert "600 ok, 0 failed; 429s at the providers: 0" in output


def test_simulate_a_bad_pool_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text('[accounts.a]\nprovider = "moonshot"\ntier = "gold"\n')
    result = CliRunner().invoke(main, ["simulate", "--pool", str(path)])
    assert result.exit_code == 2
    assert "accounts.a: unknown tier 'gold'" in result.output
    result = CliRunner().invoke(main, ["simulate", "--pool", str(path), "--api", "anthropic"])
    assert result.exit_code == 2
    assert "--pool sends through the OpenAI API" in result.output


PLANNED = """
[accounts.small]
provider = "moonshot"
tier = "tier1"
rpm = 10

[accounts.large]
provider = "stepfun"
tier = "v1"
rpm = 20
concurrency = 1000
"""


def _plan(tmp_path: Path, *args: str) -> tuple[int, str]:
    path = tmp_path / "pool.toml"
    path.write_text(PLANNED)
    result = CliRunner().invoke(main, ["plan", "--pool", str(path), *args])
    return result.exit_code, result.output


def test_plan_spreads_a_batch_over_the_pool_to_end_it_earliest(tmp_path: Path) -> None:
    """300 requests at 10 and 20 rpm: 100 and 200 of them, both done after ten windows
    (nine minutes and one call), priced where the profile prices the model."""
    code, output = _plan(
        tmp_path,
        "--requests", "300",
        "--prompt-tokens", "100",
        "--output-tokens", "10",
        "--model", "step-3.5-flash",
        "--call-seconds", "5",
        "--json",
    )  # fmt: skip
    assert code == 0, output
    document = json.loads(output)
    shares = {share["account"]: share for share in document["accounts"]}
    assert {name: share["requests"] for name, share in shares.items()} == {
        "small": 100,
        "large": 200,
    }
    assert document["finish_s"] == 9 * 60 + 5
    assert shares["large"]["time"]["binding"] == "rpm"
    # step-3.5-flash: 0.10 in and 0.30 out per 1M tokens (the profile's prices).
    assert shares["large"]["cost"] == pytest.approx(200 * (100 * 0.10 + 10 * 0.30) / 1e6)
    assert shares["small"]["cost"] is None
    assert shares["small"]["cost_note"].startswith(
        "profile 'moonshot': no prices for model 'step-3.5-flash'"
    )


def test_plan_a_pool_as_a_table(tmp_path: Path) -> None:
    code, output = _plan(
        tmp_path,
        "--requests",
        "300",
        "--prompt-tokens",
        "100",
        "--output-tokens",
        "10",
        "--call-seconds",
        "5",
    )
    assert code == 0, output
    assert "Spread over the pool, the batch takes at least 9m 5s." in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--provider", "moonshot"), "give --provider or --pool (one of them)"),
        (("--tier", "tier1"), "--tier: a pool file gives each account its tier"),
    ],
)
def test_plan_a_pool_refuses_options_it_would_ignore(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, output = _plan(
        tmp_path, "--requests", "10", "--prompt-tokens", "1", "--output-tokens", "1", *args
    )
    assert code == 2
    assert message in output


def _pool_file(tmp_path: Path, providers: dict[str, tuple[str, int]]) -> Path:
    path = tmp_path / "pool.toml"
    path.write_text(
        "".join(
            f'[accounts.{name}]\nprovider = "moonshot"\ntier = "tier1"\nrpm = {rpm}\n'
            f'base_url = "{url}"\n\n'
            for name, (url, rpm) in providers.items()
        )
    )
    return path


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_run_a_batch_through_a_pool(tmp_path: Path, anyio_backend: str) -> None:
    """`ratekit run --pool`: 300 requests go to two accounts of 100 and 200 rpm, each
    within its own rpm at its strict provider (no 429): one window's worth of each, as
    the summary says. (At x10 a window lasts 6 s: the client's CPU never binds.)"""
    requests = tmp_path / "batch.jsonl"
    with requests.open("w") as out:
        for n in range(300):
            body = {"custom_id": f"r{n}", "messages": [{"role": "user", "content": "Hi."}]}
            out.write(json.dumps({**body, "max_tokens": 8}) + "\n")
    async with (
        MockProvider(Limits(rpm=100), speed=10) as small,
        MockProvider(Limits(rpm=200), speed=10) as large,
    ):
        path = _pool_file(
            tmp_path, {"small": (small.base_url, 100), "large": (large.base_url, 200)}
        )
        pool = load_pool(path)
        first = pool.accounts[0]
        config = BatchConfig(
            first.provider, "tier1", first.url(), "x", speed=10, model="kimi-k2", pool=pool
        )
        summary = await run_batch(config, requests)
        served = {"small": small.statistics(), "large": large.statistics()}
    assert summary.ok == 300
    assert summary.rate_limited == 0
    assert {name: stats.rejected for name, stats in served.items()} == {"small": {}, "large": {}}
    assert summary.accounts == {name: stats.served for name, stats in served.items()}
    assert summary.accounts == {"small": 100, "large": 200}
    assert any(line.startswith("accounts: small ") for line in summary.lines())


def test_run_with_a_pool_refuses_a_single_accounts_options(tmp_path: Path) -> None:
    requests = tmp_path / "batch.jsonl"
    requests.write_text('{"messages": [{"role": "user", "content": "Hi."}]}\n')
    path = _pool_file(tmp_path, {"a": ("http://127.0.0.1:9/v1", 10)})
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(requests), "--pool", str(path), "--tier", "tier1"])
    assert result.exit_code == 2
    assert "--tier: a pool file names each account's" in result.output
    result = runner.invoke(main, ["run", str(requests), "--tier", "tier1"])
    assert result.exit_code == 2
    assert "missing --provider, --base-url (or give --pool)" in result.output
    remote = tmp_path / "remote.toml"
    remote.write_text(
        '[accounts.a]\nprovider = "moonshot"\napi_key_env = "RATEKIT_TEST_UNSET_KEY"\n'
    )
    result = runner.invoke(main, ["run", str(requests), "--pool", str(remote)])
    assert result.exit_code == 2
    assert "the environment variable RATEKIT_TEST_UNSET_KEY holding its API key is not set" in (
        result.output
    )
