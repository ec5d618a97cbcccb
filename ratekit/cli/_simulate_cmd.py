"""``ratekit simulate``: a workload through ratekit into the strict local provider, over HTTP.

The provider runs in a process of its own (`ProviderProcess`), as a real one
does, so that its arrival stamps never wait for the client's event loop; it
enforces the tier exactly and answers 429 to anything beyond it. ratekit runs
with the library's defaults (only time is compressed): its job is to send
nothing the provider would refuse, and to leave nothing unused. The report says
both: 429s, and the steady-state utilisation of the binding limit
(`ratekit.testing.workload.binding_utilisation`). With ``--plot`` a PNG shows what
the provider admitted per window against the limits, and the calls in flight
against the cap. ``--api anthropic`` sends the same workload through the
`anthropic` client to the provider's Messages API instead of the `openai` client
to its Chat Completions API. The calls are made by the one workload driver
(`ratekit.testing.workload`): a `Driver` in this process, or a `Fleet` of
processes sharing the account through Redis.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import multiprocessing
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from .._account import Account
from .._errors import RatekitError
from .._limits import Limits
from .._pool_file import PoolAccount, PoolFile, load_pool
from .._profiles import API_NAMES, load_profile
from ..testing.mock_provider import CallRecord, MockProviderStatistics, ProviderProcess
from ..testing.workload import (
    Driver,
    Fleet,
    Outcome,
    Workload,
    WorkloadError,
    binding_utilisation,
)
from ._types import AMOUNT, POSITIVE, InputError, make_console

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _sdk(api: str) -> None:
    """A one-line `click.ClickException` naming the extra if the `api` SDK package (each
    package and its ratekit extra bear the API's name) is missing."""
    try:
        importlib.import_module(api)
    except ImportError:
        raise click.ClickException(
            f"--api {api} needs the {api} package: pip install 'ratekit[{api}]'"
        ) from None


def window_series(
    calls: list[CallRecord], period_s: float, amount: str
) -> tuple[list[float], list[float]]:
    """At each arrival, the amount the provider admitted in the window ending then.

    `amount` is "requests" (1 per call) or "tokens" (prompt + max output).
    """
    ordered = sorted(calls, key=lambda c: c.arrived_s)
    times, totals = [], []
    window: deque[tuple[float, float]] = deque()
    total = 0.0
    for call in ordered:
        value = 1.0 if amount == "requests" else float(call.reserved_tokens)
        window.append((call.arrived_s, value))
        total += value
        while window and window[0][0] <= call.arrived_s - period_s:
            total -= window.popleft()[1]
        times.append(call.arrived_s)
        totals.append(total)
    return times, totals


def in_flight_series(calls: list[CallRecord]) -> tuple[list[float], list[int]]:
    """At each arrival and each end, the calls the provider was serving from then on.

    A call ending at the instant another arrives has left first (it no longer counted
    against the cap for the new one).
    """
    steps = sorted([(c.arrived_s, 1) for c in calls] + [(c.finished_s, -1) for c in calls])
    times, counts = [], []
    serving = 0
    for at, step in steps:
        serving += step
        times.append(at)
        counts.append(serving)
    return times, counts


# Below this share of its limit, a panel's use is drawn on a log scale, so that both the
# use and the limit line are readable.
_LOG_BELOW = 0.1
# The room above the limit line for the legend (a factor of the limit; a log scale's).
_HEADROOM, _HEADROOM_LOG = 1.3, 10.0


def use_figure(calls: list[CallRecord], limits: Limits, title: str) -> Figure:
    """What the provider admitted against the limits: per rate of requests or tokens, the
    amount in the window ending at each arrival; with a cap, the calls in flight."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rates = [rate for rate in limits.all_rates if rate.unit in ("requests", "tokens")]
    panels = len(rates) + (limits.concurrency is not None)
    figure = Figure(figsize=(9, 3.2 * max(panels, 1)))
    axes = list(figure.subplots(max(panels, 1), 1, sharex=True, squeeze=False)[:, 0])
    start = min((c.arrived_s for c in calls), default=0.0)
    # Plain numbers with thousands separators: no "1e6" offset above the axis.
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    for axis, rate in zip(axes, rates, strict=False):
        times, totals = window_series(calls, rate.period_s, rate.unit)
        axis.plot([t - start for t in times], totals, drawstyle="steps-post", label="admitted")
        axis.axhline(rate.limit, color="red", linestyle="--", label=f"limit {rate.limit:,.0f}")
        axis.set_title(
            f"{rate.name}: {rate.unit} the provider admitted in the {rate.period_s:g} s window"
            " ending at each arrival"
        )
        peak = max(totals, default=0.0)
        if 0 < peak < rate.limit * _LOG_BELOW:
            axis.set_yscale("log")
            axis.set_ylim(min(t for t in totals if t > 0) / 2, rate.limit * _HEADROOM_LOG)
            axis.set_ylabel(f"{rate.unit} per window (log)")
        else:
            axis.set_ylim(0, max(rate.limit, peak) * _HEADROOM)
            axis.set_ylabel(f"{rate.unit} per window")
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.legend(loc="upper right", ncol=2)
    if limits.concurrency is not None:
        axis = axes[len(rates)]
        cap = limits.concurrency
        times, counts = in_flight_series(calls)
        axis.plot([t - start for t in times], counts, drawstyle="steps-post", label="in flight")
        axis.axhline(cap, color="red", linestyle="--", label=f"cap {cap:,}")
        axis.set_title("concurrency: calls the provider was serving at each instant")
        axis.set_ylabel("calls in flight")
        axis.set_ylim(0, max([cap, *counts]) * _HEADROOM)
        axis.yaxis.set_major_formatter(plain)
        axis.legend(loc="upper right", ncol=2)
    axes[-1].set_xlabel("seconds since the first call (compressed time)")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot(calls: list[CallRecord], limits: Limits, path: str, title: str) -> None:
    """A PNG of `use_figure`."""
    use_figure(calls, limits, title).savefig(path, dpi=110)


@dataclass
class _Run:
    """What the provider saw of one simulation."""

    calls: list[CallRecord]
    statistics: MockProviderStatistics


def _workload(options: dict[str, Any], **fields: Any) -> Workload:
    """The simulated calls: `options`' count, tasks, speed, model and backend, random
    prompts of 20-400 words and 16-256 tokens of output; `fields` say whose account."""
    return Workload(
        through="wrap",
        calls=options["calls"],
        tasks=options["workers"],
        timeout_s=3600.0,
        speed=options["speed"],
        model=options["model"],
        prompt_words=(20, 400),
        max_tokens=(16, 256),
        seed=options["seed"],
        redis_url=options["redis"],
        namespace=options["namespace"],
        **fields,
    )


async def _drive(workload: Workload, processes: int) -> Outcome:
    """`workload` in this process, or in `processes` processes sharing Redis."""
    if processes > 1:
        try:
            return Outcome.merged(await Fleet(workload, processes).run())
        except WorkloadError as exc:
            raise click.ClickException(f"a simulation process failed: {exc}") from None
    async with Driver(workload) as driver:
        return await driver.run()


async def _simulate(options: dict[str, Any]) -> tuple[Outcome, float, _Run]:
    """The workload through ratekit into the strict provider: what the client saw, the
    seconds it took, and what the provider saw."""
    tier = load_profile(options["provider"]).tier(options["tier"])
    provider_limits = tier.limits(model=options["model_limits"])
    speed = options["speed"]
    server = ProviderProcess(
        provider_limits, speed=speed, completion_tokens=options["completion_tokens"]
    )
    await server.start()
    started = time.monotonic()
    account: dict[str, Any] = {}
    if options["margin_ms"] is not None:  # real ms, never compressed
        account["margin_s"] = options["margin_ms"] / 1000
    if options["pacing"]:
        account["pacing"] = True
    # As a user builds it: the library's defaults, time compressed; a margin and pacing
    # only when asked for.
    workload = _workload(
        options,
        provider=options["provider"],
        tier=tier.name,
        account=account,
        # Where the provider serves each API (the Anthropic SDK adds /v1 itself).
        base_url={"openai": server.base_url, "anthropic": server.anthropic_base_url}[
            options["api"]
        ],
        api=options["api"],
    )
    try:
        outcome = await _drive(workload, options["processes"])
        elapsed_s = time.monotonic() - started
        run = _Run(await server.calls(), await server.statistics())
    finally:
        await server.close()
    return outcome, elapsed_s, run


async def _simulate_pool(
    pool: PoolFile, options: dict[str, Any]
) -> tuple[Outcome, float, dict[str, _Run]]:
    """The workload through a pool's client into one strict provider per account (each
    enforcing that account's limits): what the client saw, the seconds it took, and what
    each provider saw."""
    speed = options["speed"]
    servers = {
        account.name: ProviderProcess(
            _enforced(account, options["model"]), speed=speed, completion_tokens=64
        )
        for account in pool.accounts
    }
    runs: dict[str, _Run] = {}
    try:
        for server in servers.values():
            await server.start()
        started = time.monotonic()
        specs = [
            {
                "name": account.name,
                "provider": account.provider,
                "tier": account.account.tier.name,
                "account": dict(account.overrides),
                "base_url": servers[account.name].base_url,
                "models": account.models,
                "discount": account.discount,
            }
            for account in pool.accounts
        ]
        workload = _workload(options, pool=specs, prefer=pool.prefer)
        outcome = await _drive(workload, options["processes"])
        elapsed_s = time.monotonic() - started
        for name, server in servers.items():
            runs[name] = _Run(await server.calls(), await server.statistics())
    finally:
        for server in servers.values():
            await server.close()
    return outcome, elapsed_s, runs


def _enforced(account: PoolAccount, model: str) -> Limits:
    """What `account`'s provider enforces on calls of `model`: the model's own limits
    where its profile sets some (MiniMax), else the account's."""
    names = account.models
    own = names.get(model, model) if isinstance(names, dict) else model
    group = account.account.group(own)
    return account.account.limits(None if group == "account" else own)


def _report_pool(
    console: Console,
    outcome: Outcome,
    elapsed_s: float,
    runs: dict[str, _Run],
    pool: PoolFile,
    speed: float,
    model: str,
) -> int:
    table = Table(title=f"a pool of {len(pool.accounts)} accounts, prefer {pool.prefer}")
    for column in ("account", "tier", "calls", "429s", "binding limit", "steady state"):
        table.add_column(column, justify="left" if column in ("account", "tier") else "right")
    rejected = 0
    for account in pool.accounts:
        run = runs[account.name]
        limits = _enforced(account, model).compressed(speed)
        name, share = binding_utilisation(
            limits,
            [call.arrived_s for call in run.calls],
            [(call.arrived_s, float(call.reserved_tokens)) for call in run.calls],
        )
        refused = sum(run.statistics.rejected.values())
        rejected += refused
        table.add_row(
            account.name,
            f"{account.provider} {account.account.tier.name}",
            f"{len(run.calls):,}",
            f"{refused}{_by_dimension(run.statistics.rejected)}",
            name,
            "-" if math.isnan(share) else f"{share:.1%}",
        )
    console.print(table)
    failed = len(outcome.errors)
    if failed:
        console.print(f"first failure: {outcome.errors[0]}", markup=False)
    console.print(
        f"calls: {outcome.results} ok, {failed} failed; 429s at the providers: {rejected}; "
        f"elapsed {elapsed_s:.2f} s"
    )
    return 0 if rejected == 0 and failed == 0 else 1


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def _by_dimension(rejected: dict[str, int]) -> str:
    return f" ({_counts(rejected)})" if rejected else ""


def _report(
    console: Console, outcome: Outcome, elapsed_s: float, run: _Run, limits: Limits, title: str
) -> int:
    stats = run.statistics
    table = Table(title=title)
    for column in ("dimension", "peak in any window", "limit", "used"):
        table.add_column(column, justify="left" if column == "dimension" else "right")
    for name, (peak, limit) in stats.peak_use.items():
        table.add_row(name, f"{peak:,.0f}", f"{limit:,.0f}", f"{peak / limit:.0%}")
    console.print(table)
    name, share = binding_utilisation(
        limits,
        [call.arrived_s for call in run.calls],
        [(call.arrived_s, float(call.reserved_tokens)) for call in run.calls],
    )
    if math.isnan(share):
        console.print("steady-state utilisation: the run is too short to have a steady state")
    else:
        console.print(f"steady-state utilisation of the binding limit ({name}): {share:.1%}")
    console.print(f"served by endpoint: {_counts(stats.served_by_endpoint) or 'none'}")
    # The verdict last: calls, and the provider's 429s.
    rejected, failed = sum(stats.rejected.values()), len(outcome.errors)
    if failed:
        console.print(f"first failure: {outcome.errors[0]}", markup=False)
    console.print(
        f"calls: {outcome.results} ok, {failed} failed; 429s at the provider: "
        f"{rejected}{_by_dimension(stats.rejected)}; elapsed {elapsed_s:.2f} s"
    )
    return 0 if rejected == 0 and failed == 0 else 1


def _check_redis_url(url: str) -> None:
    try:
        from ..backends.redis import _check_url
    except ModuleNotFoundError:
        raise InputError("--redis needs the redis package: pip install 'ratekit[redis]'") from None
    try:
        _check_url(url)
    except RatekitError as exc:
        raise click.BadParameter(str(exc), param_hint="--redis") from None


@click.command("simulate")
@click.option(
    "--api",
    type=click.Choice(API_NAMES, case_sensitive=False),
    default="openai",
    show_default=True,
    help="the client and the provider's API: openai (Chat Completions), anthropic (Messages)",
)
@click.option("--provider", default="moonshot", show_default=True, help="bundled provider")
@click.option("--tier", default="tier1", show_default=True, help="tier name")
@click.option("--model", default="kimi-k2", show_default=True, help="model name sent")
@click.option(
    "--calls",
    type=click.IntRange(1, 10_000_000),
    default=600,
    show_default=True,
    help="calls to make",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="concurrent tasks in all",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="OS processes (needs --redis)",
)
@click.option("--redis", "redis_url", default=None, help="share the account through Redis")
@click.option(
    "--speed",
    type=POSITIVE,
    default=20.0,
    show_default=True,
    help="time compression: 20 runs a minute in 3 s (one SDK process sends ~100 calls/s)",
)
@click.option(
    "--margin-ms",
    type=AMOUNT,
    default=None,
    help="safety margin per admission, real ms [default: the library's, 50]",
)
@click.option(
    "--pacing/--no-pacing", default=False, show_default=True, help="spread requests evenly"
)
@click.option("--plot", "plot_path", default=None, help="write a PNG of use per window")
@click.option(
    "--pool",
    "pool_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="a pool file: one strict provider per account, the calls through the pool "
    "(--provider and --tier are then the file's; OpenAI API only)",
)
@click.option("--seed", default=1, show_default=True, help="random seed of the workload")
def simulate_command(
    api: str,
    provider: str,
    tier: str,
    model: str,
    calls: int,
    workers: int,
    processes: int,
    redis_url: str | None,
    speed: float,
    margin_ms: float | None,
    pacing: bool,
    plot_path: str | None,
    pool_path: str | None,
    seed: int,
) -> None:
    """Drive a workload through ratekit against the strict local provider; report 429s."""
    if processes > 1 and redis_url is None:
        raise click.UsageError("--processes above 1 needs --redis URL to share the account")
    if redis_url is not None:
        _check_redis_url(redis_url)  # before any process starts
    _sdk(api)  # a missing package fails here, before the provider starts
    if plot_path is not None:
        folder = Path(plot_path).absolute().parent
        if not folder.is_dir():
            raise click.BadParameter(f"{folder} is not a directory", param_hint="--plot")
    if pool_path is not None:
        _simulate_pool_command(
            pool_path, api, model, calls, workers, processes, redis_url, speed, plot_path, seed
        )
    try:
        profile = load_profile(provider)
        tier_name = profile.tier(tier).name
        account = Account(profile, tier=tier_name)
        has_own_limits = account.group(model) != "account"
    except RatekitError as exc:
        raise InputError(str(exc)) from None
    model_limits = model if has_own_limits else None
    options = {
        "api": api,
        "provider": provider,
        "tier": tier_name,
        "model": model,
        "model_limits": model_limits,
        "calls": calls,
        "workers": workers,
        "processes": processes,
        "redis": redis_url,
        "namespace": f"simulate-{random.getrandbits(32):08x}",
        "speed": speed,
        "margin_ms": margin_ms,
        "pacing": pacing,
        "seed": seed,
        "completion_tokens": 64,
    }
    console = make_console()
    limits = account.limits(model if has_own_limits else None)
    console.print(
        f"{profile.display_name} {tier_name}: concurrency {limits.concurrency}, rpm {limits.rpm}, "
        f"tpm {limits.tpm}, tpd {limits.tpd}; {calls} calls, {workers} tasks, "
        f"{processes} process(es), time x{speed:g}, {api} API"
    )
    outcome, elapsed_s, run = asyncio.run(_simulate(options))
    title = f"{provider} {tier_name}: what the strict provider admitted"
    compressed = profile.tier(tier_name).limits(model_limits).compressed(speed)
    code = _report(console, outcome, elapsed_s, run, compressed, title)
    if plot_path:
        plot(run.calls, compressed, plot_path, f"{provider} {tier_name}, x{speed:g}")
        console.print(f"plot: {plot_path}")
    sys.exit(code)


def _simulate_pool_command(
    pool_path: str,
    api: str,
    model: str,
    calls: int,
    workers: int,
    processes: int,
    redis_url: str | None,
    speed: float,
    plot_path: str | None,
    seed: int,
) -> None:
    """``simulate --pool``: the checks, the run, the report; exits."""
    if api != "openai":
        raise click.UsageError("--pool sends through the OpenAI API: leave --api openai")
    if plot_path is not None:
        raise click.UsageError("--plot draws one account: leave it out with --pool")
    try:
        pool = load_pool(pool_path)
    except RatekitError as exc:
        raise InputError(str(exc)) from None
    options = {
        "model": model,
        "calls": calls,
        "workers": workers,
        "processes": processes,
        "redis": redis_url,
        "namespace": f"simulate-{random.getrandbits(32):08x}",
        "speed": speed,
        "seed": seed,
    }
    console = make_console()
    names = ", ".join(f"{a.name} ({a.provider} {a.account.tier.name})" for a in pool.accounts)
    console.print(
        f"a pool of {names}; {calls} calls of {model}, {workers} tasks, "
        f"{processes} process(es), time x{speed:g}"
    )
    outcome, elapsed_s, runs = asyncio.run(_simulate_pool(pool, options))
    sys.exit(_report_pool(console, outcome, elapsed_s, runs, pool, speed, model))


if __name__ == "__main__":  # pragma: no cover
    multiprocessing.freeze_support()
