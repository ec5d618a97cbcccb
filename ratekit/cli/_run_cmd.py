"""``ratekit run``: a resumable batch of chat completions kept inside an account's tier.

The logic is `ratekit.cli._batch`; this module reads the options, handles Ctrl-C and
SIGTERM (first: stop admitting and let calls in flight end; second: cancel them), shows
live progress with rich on stderr, and prints the summary on stdout.

Exit codes: 0 every request ok; 1 some failed or were not run; 2 bad usage (an unknown
provider or tier, a missing file); 128 + the signal's number when interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from .._errors import RatekitError
from .._pool_file import load_pool
from ._batch import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_GRACE_S,
    DEFAULT_MARGIN_MS,
    DEFAULT_REQUEST_TIMEOUT_S,
    BatchConfig,
    BatchProgress,
    BatchRunner,
    BatchSummary,
    check_output,
    default_output_path,
    is_loopback,
    make_account,
    make_tenants,
    open_batch,
    pool_api_key,
)
from ._types import AMOUNT, POSITIVE, InputError, make_console

# Seconds between two refreshes of the progress line.
_REFRESH_S = 0.25
# The key a local provider gets when the key's variable is unset.
_LOCAL_KEY = "ratekit-local"


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_spend(snapshot: BatchProgress) -> str:
    if snapshot.spend is not None and snapshot.tokens:
        return f"{snapshot.spend:.4f} {snapshot.currency}"
    return f"{snapshot.tokens:,} tokens"


def _fields(snapshot: BatchProgress) -> dict[str, Any]:
    return {
        "rate": f"{snapshot.rate_per_s:.1f} req/s",
        "failed": snapshot.failed,
        "limited": snapshot.rate_limited,
        "spend": _format_spend(snapshot),
        "eta": _format_eta(snapshot.eta_s),
    }


def _new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]run"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("429s {task.fields[limited]}"),
        TextColumn("{task.fields[spend]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
        auto_refresh=False,
        transient=False,
    )


async def _show_progress(runner: BatchRunner, progress: Progress, task: TaskID) -> None:
    while True:
        snapshot = runner.progress()
        progress.update(
            task, total=snapshot.total or None, completed=snapshot.done, **_fields(snapshot)
        )
        progress.refresh()
        await anyio.sleep(_REFRESH_S)


async def _handle_signals(
    runner: BatchRunner, console: Console, grace_s: float, received: list[int]
) -> None:
    """Stop on the first SIGINT/SIGTERM, cancel on the second; `received` gets each."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            received.append(signum)
            if len(received) == 1:
                runner.stop()
                console.print(
                    f"[yellow]{signal.Signals(signum).name}: no new requests; calls in flight "
                    f"get {grace_s:g} s to end (again to cancel them)",
                    soft_wrap=True,
                )
            else:
                runner.abort()
                console.print("[yellow]cancelling the calls in flight")


async def _run(
    config: BatchConfig, requests: Path, console: Console, show: bool
) -> tuple[BatchSummary, int]:
    received: list[int] = []

    def notice(text: str) -> None:
        console.print(text, style="yellow", markup=False, highlight=False, soft_wrap=True)

    async with open_batch(config, requests, notice=notice) as runner:
        progress = _new_progress(console)
        task = progress.add_task("run", total=None, **_fields(runner.progress()))
        summary: BatchSummary | None = None

        with progress if show else _Nothing():
            async with anyio.create_task_group() as group:
                group.start_soon(_handle_signals, runner, console, config.grace_s, received)
                if show:
                    group.start_soon(_show_progress, runner, progress, task)
                summary = await runner.run()
                group.cancel_scope.cancel()
            if show:
                snapshot = runner.progress()
                progress.update(task, completed=snapshot.done, **_fields(snapshot))
                progress.refresh()
    assert summary is not None
    return summary, received[0] if received else 0


class _Nothing:
    """A context manager that does nothing (progress turned off)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def _check_base_url(base_url: str) -> None:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(
            f"{base_url!r} is not an http(s) URL (e.g. https://api.moonshot.ai/v1)",
            param_hint="--base-url",
        )


def _api_key(variable: str, base_url: str) -> str:
    _check_base_url(base_url)
    key = os.environ.get(variable)
    if key:
        return key
    if is_loopback(base_url):
        return _LOCAL_KEY
    raise click.UsageError(
        f"the environment variable {variable} holding the API key is not set "
        "(name another with --api-key-env)"
    )


@click.command("run")
@click.argument(
    "requests",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
)
@click.option("--provider", help="Bundled provider (moonshot) or a profile file.")
@click.option("--tier", help="The account's tier (tier1).")
@click.option("--base-url", help="The OpenAI-compatible API's base URL.")
@click.option(
    "--pool",
    "pool_path",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="A pool file instead of --provider, --tier and --base-url: the requests go to "
    "whichever of its accounts admits each (keys from each account's api_key_env).",
)
@click.option(
    "--api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="Environment variable holding the API key (optional for a loopback URL).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help=(
        "Results, JSONL (default: beside REQUESTS, batch.jsonl -> batch.out.jsonl); "
        "read first to resume."
    ),
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Concurrent calls (the tier's concurrency)."
)
@click.option("--redis", "redis_url", help="Share the account through Redis at this URL.")
@click.option("--namespace", help="The shared account's name in Redis (default: PROVIDER-TIER).")
@click.option(
    "--speed",
    type=POSITIVE,
    default=1.0,
    show_default=True,
    help="Time compression (60: a minute per second), to match a mock provider.",
)
@click.option(
    "--margin-ms",
    type=AMOUNT,
    default=DEFAULT_MARGIN_MS,
    show_default=True,
    help="Real ms each admission counts beyond its window (network jitter).",
)
@click.option(
    "--pacing/--no-pacing",
    default=True,
    show_default=True,
    help="Spread requests evenly (one every period / limit) instead of in bursts.",
)
@click.option("--model", help="Model for lines without one.")
@click.option(
    "--tenants",
    "tenants_file",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="Tenants' limits and weights: TOML, a table per tenant (rpm, tpm, tpd, "
    "concurrency, weight), [default] for the others.",
)
@click.option(
    "--connect-timeout",
    type=POSITIVE,
    default=DEFAULT_CONNECT_TIMEOUT_S,
    show_default=True,
    help="Seconds a connection attempt may take.",
)
@click.option(
    "--timeout",
    "request_timeout",
    type=POSITIVE,
    default=DEFAULT_REQUEST_TIMEOUT_S,
    show_default=True,
    help="Seconds one request may take.",
)
@click.option(
    "--grace",
    type=AMOUNT,
    default=DEFAULT_GRACE_S,
    show_default=True,
    help="Seconds calls in flight get to end after Ctrl-C or SIGTERM.",
)
@click.option("--progress/--no-progress", default=True, help="Live progress on stderr.")
def run(
    requests: Path,
    provider: str | None,
    tier: str | None,
    base_url: str | None,
    pool_path: Path | None,
    api_key_env: str,
    output: Path | None,
    workers: int | None,
    redis_url: str | None,
    namespace: str | None,
    speed: float,
    margin_ms: float,
    pacing: bool,
    model: str | None,
    tenants_file: Path | None,
    connect_timeout: float,
    request_timeout: float,
    grace: float,
    progress: bool,
) -> None:
    """Run the chat requests of REQUESTS (JSONL, one body a line, optional custom_id
    and tenant) through the scheduler, inside the account's tier, and record each result.

    Rerun the same command to resume: requests already ok are skipped, failed ones
    are tried again. Ctrl-C stops admitting; a second Ctrl-C cancels calls in flight.
    """
    if namespace is not None and redis_url is None:
        raise click.UsageError("--namespace needs --redis")
    pool = None
    if pool_path is not None:
        given = [
            option
            for option, value in (
                ("--provider", provider),
                ("--tier", tier),
                ("--base-url", base_url),
            )
            if value is not None
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)}: a pool file names each account's")
        try:
            pool = load_pool(pool_path)
            keys = [pool_api_key(account) for account in pool.accounts]
        except RatekitError as exc:
            raise InputError(str(exc)) from None
        first = pool.accounts[0]
        provider, tier, base_url = first.provider, first.account.tier.name, first.url()
        api_key = keys[0]
    else:
        missing = [
            option
            for option, value in (
                ("--provider", provider),
                ("--tier", tier),
                ("--base-url", base_url),
            )
            if value is None
        ]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or give --pool)")
        assert base_url is not None
        api_key = _api_key(api_key_env, base_url)
    assert provider is not None
    assert tier is not None
    assert base_url is not None
    config = BatchConfig(
        provider=provider,
        tier=tier,
        base_url=base_url,
        api_key=api_key,
        pool=pool,
        output=output,
        workers=workers,
        redis_url=redis_url,
        namespace=namespace,
        speed=speed,
        margin_ms=margin_ms,
        pacing=pacing,
        model=model,
        connect_timeout_s=connect_timeout,
        request_timeout_s=request_timeout,
        grace_s=grace,
        tenants_file=tenants_file,
    )
    err = make_console(stderr=True)
    try:
        # An unknown provider or tier, or a bad tenants file, fails here, before any I/O.
        make_tenants(config, make_account(config))
        # An output that would destroy data (the requests, a foreign file) fails here too.
        check_output(requests, output or default_output_path(requests))
    except RatekitError as exc:
        raise InputError(str(exc)) from None
    summary, interrupted_by = anyio.run(_run, config, requests, err, progress, backend="asyncio")
    click.echo("\n".join(summary.lines()))
    if interrupted_by:
        sys.exit(128 + interrupted_by)
    sys.exit(0 if summary.complete else 1)
