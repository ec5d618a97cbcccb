"""The ratekit command: profiles, simulate (with its plot), mock-provider."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ratekit
from ratekit.cli import main
from ratekit.cli._simulate_cmd import in_flight_series, use_figure, window_series
from ratekit.testing.mock_provider import CallRecord
from ratekit.testing.workload import messages_request

from .redis_server import RedisServer


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_profiles_lists_every_bundled_provider() -> None:
    """`ratekit profiles` names the five bundled providers and their currencies."""
    code, output = run("profiles")
    assert code == 0
    for name in ("moonshot", "stepfun", "minimax", "infly", "relay"):
        assert name in output


def test_profiles_of_a_provider_shows_its_tiers_and_prices() -> None:
    """`ratekit profiles stepfun` shows V0..V5 with their numbers and the model prices."""
    code, output = run("profiles", "stepfun")
    assert code == 0
    assert "V5" in output
    assert "200,000" in output  # V5's RPM
    assert "100,000,000" in output  # V5's TPM
    assert "step-3.7-flash" in output


def test_an_unknown_provider_is_a_clear_error() -> None:
    """An unknown provider exits non-zero, listing the bundled ones."""
    code, output = run("profiles", "openai")
    assert code == 2
    assert "unknown provider 'openai'; known: infly, minimax, moonshot, relay, stepfun" in output


def test_simulate_gets_no_429_and_writes_a_plot(tmp_path: Path) -> None:
    """A short simulation against the strict provider: zero 429s and a PNG written."""
    picture = tmp_path / "use.png"
    code, output = run("simulate", "--calls", "150", "--workers", "30", "--plot", str(picture))
    assert code == 0, output
    assert "429s at the provider: 0" in output
    assert "150 ok, 0 failed" in output
    assert "served by endpoint: chat.completions 150" in output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# More calls than Tier1's 200 RPM, so that ratekit must hold calls back for the rpm
# window (and more tasks than its 50 in flight); x40 makes the minute 1.5 s.
BINDING = ("--calls", "250", "--workers", "60", "--speed", "40")


def test_simulate_through_the_anthropic_client_gets_no_429() -> None:
    """--api anthropic: the same workload through the Messages API, zero 429s."""
    code, output = run("simulate", "--api", "anthropic", *BINDING)
    assert code == 0, output
    assert "anthropic API" in output
    assert "429s at the provider: 0" in output
    assert "250 ok, 0 failed" in output
    assert "served by endpoint: messages 250" in output


@pytest.mark.redis
def test_simulate_processes_send_through_the_api_asked_for(redis_server: RedisServer) -> None:
    """With --processes and --redis, every worker process uses the anthropic client."""
    code, output = run(
        "simulate", "--api", "anthropic", "--processes", "2", "--redis", redis_server.url, *BINDING
    )
    assert code == 0, output
    assert "429s at the provider: 0" in output
    assert "250 ok, 0 failed" in output
    assert "served by endpoint: messages 250" in output


def test_simulate_rejects_an_unknown_api() -> None:
    """A bad --api value is click's one-line error naming the choices."""
    code, output = run("simulate", "--api", "gemini")
    assert code == 2
    assert output.splitlines()[-1] == (
        "Error: Invalid value for '--api': 'gemini' is not one of 'openai', 'anthropic'."
    )


def test_simulate_without_the_anthropic_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--api anthropic without the package: one line naming the extra, before any provider."""
    monkeypatch.setitem(sys.modules, "anthropic", None)  # `import anthropic` fails
    code, output = run("simulate", "--api", "anthropic")
    assert code == 1
    assert output == (
        "Error: --api anthropic needs the anthropic package: pip install 'ratekit[anthropic]'\n"
    )


def test_a_chat_body_maps_to_a_messages_request() -> None:
    """System messages become `system`, the rest keep their order, max_tokens stays."""
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
        "max_tokens": 32,
    }
    assert messages_request(body) == {
        "messages": body["messages"][1:],
        "max_tokens": 32,
        "system": "be brief",
    }
    plain = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    assert messages_request(plain) == plain


def test_simulate_refuses_processes_without_redis() -> None:
    """Several processes need Redis to share the account."""
    code, output = run("simulate", "--processes", "2")
    assert code == 2
    assert "--processes above 1 needs --redis URL" in output


def test_simulate_rejects_an_unknown_tier() -> None:
    """An unknown tier names the ones that exist."""
    code, output = run("simulate", "--tier", "tier9")
    assert code == 2
    assert "unknown tier 'tier9'" in output


def test_window_series_counts_each_rolling_window() -> None:
    """The plot's series: at each arrival, what the provider admitted in the window ending then."""

    def call(at: float, tokens: int) -> CallRecord:
        return CallRecord("chat", "m", at, at, 0, 0, tokens, True)

    calls = [call(0.0, 10), call(0.5, 20), call(1.0, 30), call(1.2, 40)]
    # At 1.0 the arrival at 0.0 has left the window (0.0, 1.0]; at 1.2, 0.5 is still in.
    assert window_series(calls, 1.0, "requests") == ([0.0, 0.5, 1.0, 1.2], [1, 2, 2, 3])
    assert window_series(calls, 1.0, "tokens")[1] == [10, 30, 50, 90]


def _record(arrived_s: float, finished_s: float, tokens: int) -> CallRecord:
    return CallRecord("chat.completions", "m", arrived_s, finished_s, 0, 0, tokens, True)


def test_in_flight_series_counts_the_calls_being_served() -> None:
    """The concurrency panel's series: a call ending as another arrives has left first."""
    calls = [_record(0.0, 1.0, 1), _record(0.5, 2.0, 1), _record(1.0, 1.5, 1)]
    assert in_flight_series(calls) == ([0.0, 0.5, 1.0, 1.0, 1.5, 2.0], [1, 2, 1, 2, 1, 0])


def test_the_plot_shows_calls_in_flight_against_the_cap_and_plain_token_counts() -> None:
    """The figure has a concurrency panel whose red line is the cap and whose curve peaks at
    the most calls in flight; the tpm panel, at 4 % of a 2,000,000 limit, draws both the
    use and the limit line and labels its axis in plain numbers (no "1e6" offset)."""
    limits = ratekit.Limits(concurrency=50, rpm=200, tpm=2_000_000).compressed(20)
    # A call of 400 tokens every 0.07 s lasting 0.25 s: 4 in flight at most, 43 calls
    # (17,200 tokens) in a window of 3 s.
    calls = [_record(i * 0.07, i * 0.07 + 0.25, 400) for i in range(200)]
    figure = use_figure(calls, limits, "test")
    figure.canvas.draw()
    axes = {axis.get_ylabel(): axis for axis in figure.axes}
    assert set(axes) == {
        "requests per window",
        "tokens per window (log)",
        "calls in flight",
    }

    concurrency = axes["calls in flight"]
    served, cap = concurrency.get_lines()
    assert list(cap.get_ydata()) == [50, 50]
    assert cap.get_label() == "cap 50"
    assert max(served.get_ydata()) == 4
    low, high = concurrency.get_ylim()
    assert low == 0
    assert high > 50

    tokens = axes["tokens per window (log)"]
    admitted, limit = tokens.get_lines()
    assert list(limit.get_ydata()) == [2_000_000, 2_000_000]
    assert max(admitted.get_ydata()) == 17_200
    low, high = tokens.get_ylim()
    assert low <= 400
    assert high > 2_000_000
    assert tokens.yaxis.get_offset_text().get_text() == ""
    labels = [label.get_text() for label in tokens.get_yticklabels() if label.get_text()]
    assert "1,000,000" in labels
    assert all("e" not in label for label in labels)
