"""The ratekit command: profiles, simulate (with its plot), mock-provider."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from ratekit.cli import main
from ratekit.cli._simulate_cmd import window_series
from ratekit.mock_provider import CallRecord


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
    assert code == 1
    assert "unknown provider 'openai'; known: infly, minimax, moonshot, relay, stepfun" in output


def test_simulate_gets_no_429_and_writes_a_plot(tmp_path: Path) -> None:
    """A short simulation against the strict provider: zero 429s and a PNG written."""
    picture = tmp_path / "use.png"
    code, output = run("simulate", "--calls", "150", "--workers", "30", "--plot", str(picture))
    assert code == 0, output
    assert "429s at the provider: 0" in output
    assert "150 ok, 0 failed" in output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_refuses_processes_without_redis() -> None:
    """Several processes need Redis to share the account."""
    code, output = run("simulate", "--processes", "2")
    assert code == 2
    assert "--processes above 1 needs --redis URL" in output


def test_simulate_rejects_an_unknown_tier() -> None:
    """An unknown tier names the ones that exist."""
    code, output = run("simulate", "--tier", "tier9")
    assert code == 1
    assert "unknown tier 'tier9'" in output


def test_window_series_counts_each_rolling_window() -> None:
    """The plot's series: at each arrival, what the provider admitted in the window ending then."""

    def call(at: float, tokens: int) -> CallRecord:
        return CallRecord("chat", "m", at, at, 0, 0, tokens, True)

    calls = [call(0.0, 10), call(0.5, 20), call(1.0, 30), call(1.2, 40)]
    # At 1.0 the arrival at 0.0 has left the window (0.0, 1.0]; at 1.2, 0.5 is still in.
    assert window_series(calls, 1.0, "requests") == ([0.0, 0.5, 1.0, 1.2], [1, 2, 2, 3])
    assert window_series(calls, 1.0, "tokens")[1] == [10, 30, 50, 90]
