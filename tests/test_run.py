"""``ratekit run``: a resumable batch through the scheduler into the strict mock provider.

Time is compressed 60 times on both sides (a minute lasts 1 s). In-process runs use
`ratekit.cli._batch` directly; the crash and signal tests run the command and the mock
provider as subprocesses, as a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

import ratekit
from ratekit.cli import main as cli_main
from ratekit.cli._batch import (
    BatchConfig,
    BatchInputError,
    compact_results,
    default_output_path,
    load_tenants,
    open_batch,
    parse_request_line,
    read_requests,
    read_results,
    run_batch,
)
from ratekit.testing.mock_provider import MockProvider

SPEED = 60
PROVIDER = "moonshot"
MODEL = "kimi-k2"
# Run the command the way the console script does, without relying on PATH.
COMMAND = (sys.executable, "-c", "from ratekit.cli import main; main()", "run")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the mock provider and the openai client's transport run on asyncio


def write_requests(path: Path, count: int, *, start: int = 0) -> list[str]:
    """`count` small chat requests with ids ``r<n>``, no model (``--model`` fills it)."""
    ids = [f"r{n}" for n in range(start, start + count)]
    with path.open("w", encoding="utf-8") as out:
        for custom_id in ids:
            body = {
                "custom_id": custom_id,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 20,
            }
            out.write(json.dumps(body) + "\n")
    return ids


def output_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_each_once_ok(path: Path, ids: list[str]) -> None:
    records = output_records(path)
    seen = [record["custom_id"] for record in records]
    assert sorted(seen) == sorted(ids), "every request exactly once"
    bad = [record for record in records if record["status"] != "ok"]
    assert bad == []


def config_for(base_url: str, tier: str, **changes: Any) -> BatchConfig:
    return BatchConfig(PROVIDER, tier, base_url, "x", speed=SPEED, model=MODEL, **changes)


def tier_limits(tier: str) -> ratekit.Limits:
    return ratekit.load_profile(PROVIDER).tier(tier).limits()


# --- in process ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_thousand_requests_without_a_429(tmp_path: Path) -> None:
    """2,000 requests at Moonshot Tier2 (500 RPM, a minute a second) all end ok, each once,
    and the strict provider never answers 429."""
    requests = tmp_path / "batch.jsonl"
    ids = write_requests(requests, 2_000)
    async with MockProvider(tier_limits("tier2"), speed=SPEED) as server:
        started = time.monotonic()
        summary = await run_batch(config_for(server.base_url, "tier2"), requests)
        elapsed = time.monotonic() - started
        stats = server.statistics()
    assert stats.rejected == {}
    assert stats.served == 2_000
    assert summary.ok == 2_000
    assert summary.failed == 0
    assert summary.rate_limited == 0
    assert summary.complete
    # Four windows of 500: the limit binds (the upper bound only catches a stall).
    assert 3.0 < elapsed < 30.0
    assert summary.prompt_tokens + summary.completion_tokens > 0
    assert_each_once_ok(default_output_path(requests), ids)


@pytest.mark.anyio
async def test_bad_lines_are_reported_and_the_rest_goes_on(tmp_path: Path) -> None:
    """Malformed, empty, model-less and duplicate lines are reported with their line numbers
    and recorded failed (duplicates only reported); the other lines run."""
    requests = tmp_path / "batch.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    lines = [
        json.dumps({"custom_id": "a", **good}),
        '{"custom_id": "b", "messages": [',
        json.dumps({"custom_id": "c", **good}),
        "",
        json.dumps({"custom_id": "a", **good}),
        json.dumps({"custom_id": "e", **good, "model": 3}),
        json.dumps(good),  # no custom_id: line 7 is its id
    ]
    requests.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    notices: list[str] = []
    async with MockProvider(tier_limits("tier2"), speed=SPEED) as server:
        config = config_for(server.base_url, "tier2")
        summary = await run_batch(config, requests, notice=notices.append)
    assert summary.total == 6
    assert summary.ok == 3
    assert summary.failed == 3
    assert f"{requests}: line 2: not JSON: Expecting value at column 33" in notices
    assert f"{requests}: line 4: empty line" in notices
    assert f"{requests}: line 5: custom_id 'a' repeats line 1" in notices
    assert f"{requests}: line 6: model must be a non-empty string, got 3" in notices
    records = {r["custom_id"]: r for r in output_records(default_output_path(requests))}
    assert [r["line"] for r in records.values()] == [1, 2, 3, 4, 6, 7]
    assert records[2]["error"] == {  # not JSON: its line is its id
        "type": "InputLineError",
        "message": "not JSON: Expecting value at column 33",
    }
    assert records[4]["error"]["message"] == "empty line"
    assert {records[key]["status"] for key in ("a", "c", 7)} == {"ok"}
    assert records[7]["response"]["model"] == MODEL
    assert summary.duplicates[0].line == 5
    assert not summary.complete


def test_parse_request_line_messages() -> None:
    """Each kind of bad line gets its own exact reason."""
    cases = {
        "[1]": "a request must be a JSON object, got list",
        '{"messages": [{"role": "user"}]}': "no model: give one in the line or with --model",
        '{"model": "m", "messages": []}': "messages must be a non-empty list",
        '{"model": "m", "messages": [1], "custom_id": 1.5}': (
            "custom_id must be a string or an integer, got 1.5"
        ),
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}': (
            "stream is not supported in a batch"
        ),
        '{"model": "m", "messages": [1]}': (
            "messages[0]: a message must be a JSON object, got int"
        ),
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "tenant": 3}': (
            "tenant: a tenant is named by a non-empty str of at most 256 characters, got 3"
        ),
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "tenant": ""}': (
            "tenant: a tenant is named by a non-empty str of at most 256 characters, got ''"
        ),
    }
    for text, reason in cases.items():
        with pytest.raises(BatchInputError) as caught:
            parse_request_line(text, 9)
        assert str(caught.value) == f"line 9: {reason}"
    request = parse_request_line(
        '{"messages": [{"role": "user", "content": ""}]}', 4, default_model="k"
    )
    assert (request.custom_id, request.body["model"]) == (4, "k")
    request = parse_request_line(
        '{"model": "m", "messages": [{"role": "user", "content": ""}], "tenant": "acme"}', 5
    )
    assert (request.tenant, "tenant" in request.body) == ("acme", False)


@pytest.mark.anyio
async def test_each_line_is_admitted_as_its_tenant_within_the_tenants_file(
    tmp_path: Path,
) -> None:
    """A line's ``tenant`` (not sent) names the tenant whose share it takes; the tenants
    file's limits hold (compressed by the speed as the account's): ``capped`` at 2 RPM
    never has more than 2 calls in any compressed minute, while the others run at once."""
    requests = tmp_path / "batch.jsonl"
    lines = []
    for n in range(12):
        tenant = "capped" if n < 6 else ("gold" if n % 2 else None)
        body = {"custom_id": f"r{n}", "messages": [{"role": "user", "content": "hi"}]}
        lines.append(json.dumps(body if tenant is None else {**body, "tenant": tenant}))
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[capped]\nrpm = 2\n\n[gold]\nweight = 3\n", encoding="utf-8")
    admitted: list[tuple[float, str | None]] = []

    def hook(event: ratekit.Event) -> None:
        if isinstance(event, ratekit.events.Admitted):
            admitted.append((time.monotonic(), event.tenant))

    async with MockProvider(tier_limits("tier2"), speed=SPEED) as server:
        config = config_for(server.base_url, "tier2", tenants_file=tenants)
        async with open_batch(config, requests, hooks=[hook]) as runner:
            summary = await runner.run()
        assert server.statistics().served == 12
    assert summary.complete
    assert Counter(tenant for _, tenant in admitted) == {"capped": 6, "gold": 3, None: 3}
    capped = [at for at, tenant in admitted if tenant == "capped"]
    for i, at in enumerate(capped):  # a compressed minute is 1 s; 0.1 s spared for the hook
        assert sum(1 for later in capped[i:] if later - at < 0.9) <= 2
    assert capped[-1] - capped[0] > 1.8  # 6 calls at 2 a minute: the third minute
    others = [at for at, tenant in admitted if tenant != "capped"]
    assert max(others) - min(admitted)[0] < 1.0  # never held up behind the capped tenant


@pytest.mark.anyio
async def test_resume_skips_ok_retries_failed_and_compacts(tmp_path: Path) -> None:
    """A rerun skips ids recorded ok, tries failed ones again, ignores a line cut by a
    crash, and leaves one record per id, in input order."""
    requests = tmp_path / "batch.jsonl"
    ids = write_requests(requests, 30)
    output = tmp_path / "results.jsonl"
    earlier = [
        {"custom_id": "r1", "line": 2, "status": "ok", "response": {"id": "old"}, "usage": None},
        {"custom_id": "r2", "line": 3, "status": "failed", "error": {"type": "X", "message": ""}},
        {"custom_id": "r2", "line": 3, "status": "failed", "error": {"type": "X", "message": ""}},
        {"custom_id": "gone", "line": 99, "status": "ok", "response": {}, "usage": None},
    ]
    text = "".join(json.dumps(record) + "\n" for record in earlier)
    output.write_text(text + '{"custom_id": "r3", "li', encoding="utf-8")
    notices: list[str] = []
    async with MockProvider(tier_limits("tier2"), speed=SPEED) as server:
        config = config_for(server.base_url, "tier2", output=output)
        summary = await run_batch(config, requests, notice=notices.append)
        served = server.statistics().served
    assert (summary.skipped, summary.retried, summary.ok, served) == (1, 1, 30, 29)
    assert any(n.startswith(f"{output}: its last line was cut short") for n in notices)
    assert any("1 done already skipped, 1 that failed before will be retried" in n for n in notices)
    records = output_records(output)
    assert [r["custom_id"] for r in records] == [*ids, "gone"]
    assert records[1]["response"] == {"id": "old"}
    assert all(r["status"] == "ok" for r in records)


def test_compact_keeps_the_last_record(tmp_path: Path) -> None:
    """Compaction keeps each id once, the last written, ids in the given order first."""
    path = tmp_path / "out.jsonl"
    rows = [("a", "failed"), ("b", "ok"), ("a", "ok"), (1, "ok"), ("1", "failed")]
    path.write_text("".join(json.dumps({"custom_id": i, "status": s}) + "\n" for i, s in rows))
    assert compact_results(path, ["b", "a"]) == 4
    kept = [(r["custom_id"], r["status"]) for r in output_records(path)]
    assert kept == [("b", "ok"), ("a", "ok"), (1, "ok"), ("1", "failed")]
    assert read_results(tmp_path / "missing.jsonl") == ({}, 0)


@pytest.mark.anyio
async def test_stop_lets_calls_in_flight_end(tmp_path: Path) -> None:
    """`stop` admits nothing new; calls already sent end and are recorded; a rerun resumes."""
    requests = tmp_path / "batch.jsonl"
    ids = write_requests(requests, 400)
    # Tier1: 50 in flight; each call takes 3 provider s = 50 ms.
    async with MockProvider(tier_limits("tier1"), speed=SPEED, latency_s=3.0) as server:
        config = config_for(server.base_url, "tier1")
        async with open_batch(config, requests) as runner, anyio.create_task_group() as group:

            async def stop_soon() -> None:
                while runner.progress().done < 60:  # noqa: ASYNC110 - polls a snapshot
                    await anyio.sleep(0.01)
                runner.stop()

            group.start_soon(stop_soon)
            summary = await runner.run()
        served = server.statistics().served
        assert summary.interrupted
        assert 60 <= summary.ok < 400
        assert summary.ok == served, "every call sent was recorded"
        assert summary.not_run == 400 - summary.ok
        second = await run_batch(config, requests)
    assert second.skipped == summary.ok
    assert second.complete
    assert_each_once_ok(default_output_path(requests), ids)


@pytest.mark.anyio
async def test_spend_is_estimated_from_the_profile_prices(tmp_path: Path) -> None:
    """With a priced model (MiniMax-M2), spend is the profile's price of the real usage."""
    requests = tmp_path / "batch.jsonl"
    write_requests(requests, 10)
    model = "MiniMax-M2"
    async with MockProvider(ratekit.Limits(), speed=SPEED) as server:
        config = BatchConfig("minimax", "paid", server.base_url, "x", speed=SPEED, model=model)
        summary = await run_batch(config, requests)
    prices = ratekit.load_profile("minimax").model(model).prices
    expected = prices.cost_of_tokens(
        input_tokens=summary.prompt_tokens, output_tokens=summary.completion_tokens
    )
    assert summary.ok == 10
    assert summary.currency == "CNY"
    assert summary.spend == pytest.approx(expected)
    assert expected > 0
    assert any(line.startswith(f"spend {expected:.4f} CNY") for line in summary.lines())


@pytest.mark.anyio
@pytest.mark.redis
async def test_two_runners_share_the_account_through_redis(
    tmp_path: Path, redis_server: Any
) -> None:
    """Two runners naming one Redis namespace keep to one Tier1 together: no 429.

    Both runners and the provider share this process's loop, and every admission is a
    Redis round trip: 400 ms of margin (50 and 100 ms saw a few 429s in a full CI run,
    200 ms one in about ten: the provider counts a request when this loop gets to it).
    """
    async with MockProvider(tier_limits("tier1"), speed=SPEED) as server:
        configs = []
        for name in ("a", "b"):
            write_requests(tmp_path / f"{name}.jsonl", 250)
            configs.append(
                config_for(
                    server.base_url,
                    "tier1",
                    redis_url=redis_server.url,
                    namespace=f"run-{uuid.uuid4().hex}",
                    margin_ms=400,
                )
            )
        shared = configs[0].namespace
        summaries = []

        async def one(name: str, config: BatchConfig) -> None:
            config = dataclasses.replace(config, namespace=shared)
            summaries.append(await run_batch(config, tmp_path / f"{name}.jsonl"))

        async with anyio.create_task_group() as group:
            for name, config in zip(("a", "b"), configs, strict=True):
                group.start_soon(one, name, config)
        stats = server.statistics()
    assert [s.ok for s in summaries] == [250, 250]
    assert stats.rejected == {}


# --- the command -----------------------------------------------------------------------


def test_unknown_provider_or_tier_exits_2(tmp_path: Path) -> None:
    """An unknown provider or tier fails at once, exit code 2, listing the known ones."""
    requests = tmp_path / "batch.jsonl"
    write_requests(requests, 1)
    runner = CliRunner()
    base = ["run", str(requests), "--base-url", "http://127.0.0.1:9/v1"]
    result = runner.invoke(cli_main, [*base, "--provider", "moonshoot", "--tier", "tier1"])
    assert result.exit_code == 2
    assert "unknown provider 'moonshoot'; known: infly, minimax, moonshot" in result.output
    result = runner.invoke(cli_main, [*base, "--provider", "moonshot", "--tier", "tier9"])
    assert result.exit_code == 2
    assert "unknown tier 'tier9' in profile 'moonshot'; known: Tier0, Tier1" in result.output
    assert not default_output_path(requests).exists()


def closed_port() -> int:
    """A loopback port that was just free: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_refused_connections_fail_each_request_fast(tmp_path: Path) -> None:
    """A base URL that refuses connections: the run stops after a few calls in a row
    failed that way (the rest is left for the next run), says why, exits 1, and does not
    hang."""
    requests = tmp_path / "batch.jsonl"
    write_requests(requests, 400)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    args = ["run", str(requests), "--provider", PROVIDER, "--tier", "tier1", "--base-url", url]
    started = time.monotonic()
    result = CliRunner().invoke(cli_main, [*args, "--model", MODEL, "--no-progress"])
    assert time.monotonic() - started < 10
    assert result.exit_code == 1, result.output
    assert "APIConnectionError: cannot connect to" in result.output
    assert "the provider could not be reached 8 times in a row" in result.output
    assert "the provider could not be reached" in result.output
    records = output_records(default_output_path(requests))
    assert 8 <= len(records) < 100
    assert {r["status"] for r in records} == {"failed"}


# --- subprocesses: a crash and a signal --------------------------------------------------


@pytest.fixture(scope="module")
def provider_process() -> Iterator[str]:
    """``python -m ratekit.testing.mock_provider`` at Moonshot Tier1 (200 RPM), a minute a second;
    yields its base URL."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ratekit.testing.mock_provider",
            "--provider",
            PROVIDER,
            "--tier",
            "tier1",
            "--speed",
            str(SPEED),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        base_url = ""
        deadline = time.monotonic() + 20
        while not base_url.startswith("http") and time.monotonic() < deadline:
            base_url = child.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:"), "the mock provider did not start"
        yield base_url
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def start_run(requests: Path, base_url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)  # a loopback URL needs none
    return subprocess.Popen(
        [
            *COMMAND,
            str(requests),
            "--provider",
            PROVIDER,
            "--tier",
            "tier1",
            "--base-url",
            base_url,
            "--speed",
            str(SPEED),
            "--model",
            MODEL,
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_lines(path: Path, count: int, child: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        if path.exists():
            lines = path.read_bytes().count(b"\n")
            if lines >= count:
                return lines
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {count} lines")


def test_killed_midway_then_resumed(tmp_path: Path, provider_process: str) -> None:
    """SIGKILL halfway through 600 requests, then the same command again: every request
    ends up in the output exactly once, ok."""
    requests = tmp_path / "batch.jsonl"
    ids = write_requests(requests, 600)
    output = default_output_path(requests)
    child = start_run(requests, provider_process)
    written = wait_for_lines(output, 150, child)
    child.kill()
    child.wait(timeout=10)
    assert written < 600, "killed before the end"
    again = start_run(requests, provider_process)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, out + err
    assert "done 600/600 ok" in out
    assert "already skipped" in err
    assert_each_once_ok(output, ids)


def test_sigterm_stops_then_resumes(tmp_path: Path, provider_process: str) -> None:
    """SIGTERM stops admitting, lets calls in flight end, prints the summary and exits
    128 + 15; the rerun completes the batch."""
    requests = tmp_path / "batch.jsonl"
    ids = write_requests(requests, 400, start=1_000)
    output = default_output_path(requests)
    child = start_run(requests, provider_process)
    wait_for_lines(output, 50, child)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM, out + err
    assert "SIGTERM: no new requests" in err
    assert "interrupted: run the same command again to resume" in out
    records = output_records(output)  # compacted: whole lines only, each id once
    assert len({r["custom_id"] for r in records}) == len(records) < 400
    again = start_run(requests, provider_process)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, out + err
    assert_each_once_ok(output, ids)


def test_a_tenants_file_gives_each_tenant_its_limits_and_weight(tmp_path: Path) -> None:
    """``[default]`` is every tenant the file does not name; rates are compressed by the
    speed and count tokens as the account does; a weight alone sets no limit."""
    path = tmp_path / "tenants.toml"
    path.write_text(
        "[default]\nrpm = 20\ntpm = 50000\n\n[gold]\nrpm = 100\nconcurrency = 4\nweight = 3\n"
        "\n[batch]\nweight = 0.5\n",
        encoding="utf-8",
    )
    account = ratekit.Account(PROVIDER, tier="tier1")
    tenants = load_tenants(path, account, speed=60)
    assert tenants.tenant("acme").weight == 1.0
    assert tenants.tenant("acme").limits.rpm == 20
    assert tenants.tenant("acme").limits.all_rates[0].period_s == 1.0
    gold = tenants.tenant("gold")
    assert (gold.limits.rpm, gold.limits.concurrency, gold.weight) == (100, 4, 3)
    assert gold.limits.token_counting == account.limits().token_counting
    assert not tenants.tenant("batch").limited
    assert tenants.tenant("batch").weight == 0.5


def test_read_requests_counts_trailing_blank_lines_out(tmp_path: Path) -> None:
    """Blank lines at the end of the file are not requests; one in the middle is bad."""
    path = tmp_path / "in.jsonl"
    line = '{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    path.write_text(f"{line}\n\n{line}\n\n\n")
    batch = read_requests(path)
    assert [r.line for r in batch.requests] == [1, 3]
    assert [(b.line, b.reason) for b in batch.bad_lines] == [(2, "empty line")]


def test_an_output_that_would_destroy_data_is_refused(tmp_path: Path) -> None:
    """The requests file itself, or a file that is not ratekit's results, is never
    written over: `run` says why and exits 2 before any call, the files untouched."""
    requests = tmp_path / "batch.jsonl"
    write_requests(requests, 3)
    before = requests.read_bytes()
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\nmore notes\n", encoding="utf-8")
    base = ["run", str(requests), "--provider", "moonshot", "--tier", "tier1"]
    base += ["--base-url", "http://127.0.0.1:9/v1"]
    for output, reason in (
        (requests, "is the requests file itself"),
        (foreign, "is not a ratekit results file (line 1 is not a result record)"),
        (tmp_path / "no" / "such" / "out.jsonl", "does not exist"),
    ):
        done = CliRunner().invoke(cli_main, [*base, "-o", str(output)])
        assert done.exit_code == 2, done.output
        assert reason in done.output
    assert requests.read_bytes() == before
    assert foreign.read_text(encoding="utf-8") == "my notes\nmore notes\n"


def test_a_bad_line_costs_that_line_only(tmp_path: Path) -> None:
    """Bytes that are not UTF-8, JSON nested beyond reading, and messages no provider
    takes (no content, an unknown role) fail their own line; the others are read."""
    requests = tmp_path / "batch.jsonl"
    good = json.dumps(
        {"custom_id": "ok", "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    lines = [
        good.encode(),
        b'{"custom_id": "bytes", "model": "m", "messages": [{"role": "user", "content": "\xff"}]}',
        ("[" * 100_000 + "]" * 100_000).encode(),
        json.dumps({"model": "m", "messages": [{"role": "user"}]}).encode(),
        json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        json.dumps(
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{}]}]}
        ).encode(),
    ]
    requests.write_bytes(b"\n".join(lines) + b"\n")
    batch = read_requests(requests)
    assert [r.custom_id for r in batch.requests] == ["ok", 6]
    reasons = {bad.line: bad.reason for bad in batch.bad_lines}
    assert reasons[2] == "not UTF-8 (byte 80 of the line)"
    assert reasons[3] == "JSON nested too deeply to read"
    assert reasons[4] == "messages[0]: a user message needs content"
    assert reasons[5].startswith("messages[0]: role must be one of")
