"""Bad values on the command line: each is refused before any work, in a few lines that
name the option and the value, with exit code 2 (click's usage errors), never a
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ratekit.cli import main as cli

PLAN = ["plan", "--provider", "moonshot", "--tier", "tier1"]
UNIFORM = ["--requests", "10", "--prompt-tokens", "100", "--output-tokens", "10"]
SIMULATE = ["simulate", "--calls", "10"]
MOCK = ["mock-provider"]

CASES = [
    (["simulate", "--speed", "0"], "--speed", "0 is not above 0"),
    (["simulate", "--speed", "nan"], "--speed", "'nan' is not a finite number"),
    (["simulate", "--speed", "inf"], "--speed", "'inf' is not a finite number"),
    (["simulate", "--margin-ms", "-50"], "--margin-ms", "-50 is not at least 0"),
    (["simulate", "--calls", "-5"], "--calls", "-5 is not in the range 1<=x<=10000000"),
    (["simulate", "--workers", "0"], "--workers", "0 is not in the range x>=1"),
    (["simulate", "--processes", "0"], "--processes", "0 is not in the range 1<=x<=64"),
    (["simulate", "--api", "gemini"], "--api", "'gemini' is not one of"),
    (["simulate", "--redis", "nonsense", "--processes", "2"], "--redis", "is not a Redis URL"),
    (["simulate", "--plot", "/no/such/dir/x.png"], "--plot", "/no/such/dir is not a directory"),
    ([*PLAN, *UNIFORM, "--input-price", "-1"], "--input-price", "-1 is not at least 0"),
    ([*PLAN, *UNIFORM, "--input-price", "nan"], "--input-price", "'nan' is not a finite"),
    ([*PLAN, *UNIFORM, "--user-discount", "inf"], "--user-discount", "'inf' is not a finite"),
    ([*PLAN, *UNIFORM, "--channel-discount", "0"], "--channel-discount", "0 is not above 0"),
    ([*PLAN, *UNIFORM, "--rpm", "-3"], "--rpm", "-3 is not above 0"),
    ([*PLAN, *UNIFORM, "--cache-hit-share", "nan"], "--cache-hit-share", "not a finite"),
    (
        [*PLAN, "--requests", "1" + "0" * 30, "--prompt-tokens", "1", "--output-tokens", "1"],
        "--requests",
        "is not in the range 0<=x<=1000000000000000",
    ),
    ([*MOCK, "--speed", "0"], "--speed", "0 is not above 0"),
    ([*MOCK, "--speed", "nan"], "--speed", "'nan' is not a finite number"),
    ([*MOCK, "--port", "99999"], "--port", "99999 is not in the range 0<=x<=65535"),
    ([*MOCK, "--port", "http"], "--port", "'http' is not a valid integer"),
    ([*MOCK, "--counting", "safe"], "--counting", "'safe' is not one of 'reserve', 'usage'"),
    ([*MOCK, "--latency-ms", "-5"], "--latency-ms", "-5 is not at least 0"),
    ([*MOCK, "--ms-per-token", "inf"], "--ms-per-token", "'inf' is not a finite number"),
    ([*MOCK, "--completion-tokens", "0"], "--completion-tokens", "0 is not in the range 1<="),
    ([*MOCK, "--tokenizer-factor", "0"], "--tokenizer-factor", "0 is not at least 0.01"),
    ([*MOCK, "--tokenizer-factor", "500"], "--tokenizer-factor", "500 is above 100"),
    ([*MOCK, "--limits", "{rpm: 3}"], "--limits", "'{rpm: 3}' is not JSON"),
    ([*MOCK, "--limits", '{"rpd": 3}'], "--limits", "is not a JSON object of concurrency, rpm"),
    ([*MOCK, "--limits", '{"rpm": -1}'], "--limits", "Limits.rpm must be positive, got -1"),
]


@pytest.mark.parametrize(("args", "option", "message"), CASES)
def test_a_bad_value_is_one_short_usage_error(args: list[str], option: str, message: str) -> None:
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)
    assert "Traceback" not in done.output
    assert option in done.output
    assert message in done.output
    assert len(done.output.strip().splitlines()) <= 4  # usage line, hint, error


RUN_OPTIONS = [
    ("--base-url", "api.moonshot.ai/v1", "'api.moonshot.ai/v1' is not an http(s) URL"),
    ("--base-url", "ftp://host/v1", "'ftp://host/v1' is not an http(s) URL"),
    ("--timeout", "nan", "'nan' is not a finite number"),
    ("--connect-timeout", "nan", "'nan' is not a finite number"),
    ("--grace", "inf", "'inf' is not a finite number"),
    ("--speed", "-1", "-1 is not above 0"),
    ("--margin-ms", "nan", "'nan' is not a finite number"),
    ("--tenants", "/no/such/tenants.toml", "'/no/such/tenants.toml' does not exist"),
]


@pytest.mark.parametrize(("option", "value", "message"), RUN_OPTIONS)
def test_run_refuses_a_bad_number_before_reading_anything(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"model": "m", "messages": [{"role": "user", "content": "x"}]}\n')
    args = ["run", str(requests), "--provider", "moonshot", "--tier", "tier1"]
    args += ["--base-url", "http://127.0.0.1:9/v1", option, value]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert option in done.output
    assert message in done.output
    assert not (tmp_path / "in.out.jsonl").exists()


TENANTS_FILES = [
    ("[gold]\nrpm = -1\n", "[gold] Limits.rpm must be positive, got -1"),
    ('[gold]\nrpm = "100"\n', "[gold] Limits.rpm must be a number, got '100'"),
    ("[gold]\nconcurrency = 2.5\n", "[gold] Limits.concurrency must be a positive int"),
    ("[gold]\nweight = 0\n", "[gold] Tenant.weight must be a number in (0, 1e6], got 0"),
    ("[gold]\nrpd = 3\n", "[gold] unknown field 'rpd'; known: rpm, tpm, tpd, concurrency"),
    ("rpm = 5\n", "'rpm' must be a table of a tenant's limits and weight"),
    ('[""]\nrpm = 1\n', "a table's name: a tenant is named by a non-empty str"),
    ("[gold\n", "is not TOML: Expected ']' at the end of a table declaration"),
]


@pytest.mark.parametrize(("content", "message"), TENANTS_FILES)
def test_run_refuses_a_bad_tenants_file_before_reading_anything(
    tmp_path: Path, content: str, message: str
) -> None:
    """A tenants file that cannot be used is one error line naming the file, the tenant's
    table and the value, exit code 2, before any request is read or sent."""
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"model": "m", "messages": [{"role": "user", "content": "x"}]}\n')
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(content, encoding="utf-8")
    args = ["run", str(requests), "--provider", "moonshot", "--tier", "tier1"]
    args += ["--base-url", "http://127.0.0.1:9/v1", "--tenants", str(tenants)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert done.output.startswith(f"Error: {tenants}")
    assert message in done.output
    assert len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "in.out.jsonl").exists()


MODULE_CASES = [
    (["ratekit", "--calls", "-3"], "argument --calls: -3 is not in 1..10000000"),
    (["ratekit", "--workers", "0"], "argument --workers: 0 is not in 1..100000"),
    (["ratekit", "--speed", "nan"], "argument --speed: 'nan' is not a finite number"),
    (
        ["ratekit.testing.mock_provider", "--speed", "0"],
        "Error: Invalid value for '--speed': 0 is not above 0",
    ),
    (
        ["ratekit.testing.mock_provider", "--latency-ms", "inf"],
        "Error: Invalid value for '--latency-ms': 'inf' is not a finite number",
    ),
    (
        ["ratekit.testing.mock_provider", "--port", "99999"],
        "Error: Invalid value for '--port': 99999 is not in the range 0<=x<=65535.",
    ),
    (
        ["ratekit.testing.mock_provider", "--completion-tokens", "0"],
        "Error: Invalid value for '--completion-tokens': 0 is not in the range 1<=x<=1000000.",
    ),
]


@pytest.mark.parametrize(("args", "message"), MODULE_CASES)
def test_the_module_commands_refuse_bad_numbers(args: list[str], message: str) -> None:
    """``python -m ratekit`` (the offline demo) and ``python -m ratekit.testing.mock_provider``
    (``ratekit mock-provider`` under another name): a bad number is one error line and exit
    code 2, before anything runs."""
    done = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--provider", "nope", "--tier", "x", *UNIFORM],
        ["simulate", "--provider", "nope"],
        ["profiles", "nope"],
        ["mock-provider", "--provider", "nope"],
    ],
)
def test_an_unknown_provider_reads_the_same_in_every_command(args: list[str]) -> None:
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert done.output.strip().splitlines()[-1] == (
        "Error: unknown provider 'nope'; known: infly, minimax, moonshot, relay, stepfun"
    )


def test_output_in_a_pipe_is_never_wrapped_or_cut() -> None:
    """Not a terminal: every line and table row is whole, however long."""
    done = CliRunner().invoke(cli, [*PLAN, "--requests", "1000", *UNIFORM[2:]])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert any("2,000,000 tokens / 1m" in line for line in lines)
    assert any(
        line.startswith("cost: not priced:") and line.endswith("(USD per 1,000,000 tokens)")
        for line in lines
    )
    assert "…" not in done.output
