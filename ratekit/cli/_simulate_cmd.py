"""``ratekit simulate``: a workload through ratekit into the strict local provider, over HTTP.

The provider runs in a process of its own (`ProviderProcess`), as a real one
does, so that its arrival stamps never wait for the client's event loop; it
enforces the tier exactly and answers 429 to anything beyond it. ratekit runs
with the library's defaults (only time is compressed): its job is to send
nothing the provider would refuse, and to leave nothing unused. The report says
both: 429s, and the steady-state utilisation of the binding limit
(`steady_utilisation`). With ``--plot`` a PNG shows what the provider admitted
per window against the limits. ``--api anthropic`` sends the same workload through
the `anthropic` client to the provider's Messages API instead of the `openai`
client to its Chat Completions API (`_client` builds either).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import multiprocessing
import random
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .._account import Account
from .._errors import RatekitError
from .._limits import Limits
from .._profiles import API_NAMES, load_profile
from .._scheduler import Scheduler
from ..testing.mock_provider import CallRecord, MockProviderStatistics, ProviderProcess
from ..testing.simulation import steady_utilisation
from ._types import AMOUNT, POSITIVE, InputError, make_console


@dataclass(frozen=True)
class CallMix:
    """What the simulated callers send: `calls` chat requests of random sizes, a user
    message of `prompt_words` words and `max_tokens` (inclusive ranges)."""

    calls: int
    seed: int
    prompt_words: tuple[int, int] = (20, 400)
    max_tokens: tuple[int, int] = (16, 256)


def _requests(workload: CallMix, share: int, part: int) -> list[dict[str, Any]]:
    """The bodies of part `part` (`share` calls) of the workload, as Chat Completions
    requests without the model; `_messages_request` maps one to the Messages API."""
    rng = random.Random(workload.seed * 1000 + part)
    bodies = []
    for _ in range(share):
        words = rng.randint(*workload.prompt_words)
        bodies.append(
            {
                "messages": [{"role": "user", "content": "word " * words}],
                "max_tokens": rng.randint(*workload.max_tokens),
            }
        )
    return bodies


def _messages_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions body (`_requests`) as a Messages API one: its system messages
    become ``system``, the others stay in order, and ``max_tokens`` (required) is kept."""
    messages = body["messages"]
    request: dict[str, Any] = {
        "messages": [message for message in messages if message["role"] != "system"],
        "max_tokens": body["max_tokens"],
    }
    system = [message["content"] for message in messages if message["role"] == "system"]
    if system:
        request["system"] = "\n\n".join(system)
    return request


def _sdk(api: str) -> ModuleType:
    """The SDK package of `api` ("openai" or "anthropic": each package and its ratekit extra
    bear the API's name); a one-line `click.ClickException` naming the extra if missing."""
    try:
        return importlib.import_module(api)
    except ImportError:
        raise click.ClickException(
            f"--api {api} needs the {api} package: pip install 'ratekit[{api}]'"
        ) from None


@dataclass(frozen=True)
class _Client:
    """A wrapped SDK client as the workload driver uses it, whichever API it speaks."""

    # Sends one `_requests` body (awaits the answer); raises `failure` if the call failed.
    send: Callable[[dict[str, Any]], Awaitable[object]]
    # The SDK's base error (openai.OpenAIError, anthropic.AnthropicError).
    failure: type[Exception]
    # Closes the SDK client's connections.
    close: Callable[[], Awaitable[None]]


def _client(api: str, base_url: str, scheduler: Scheduler, model: str) -> _Client:
    """The one place a simulation builds its client: the `api` SDK's async client at
    `base_url` (the provider's URL for that API), its own retries off, wrapped by ratekit
    on `scheduler`, sending `model`."""
    from ..integrations._wrap import wrap

    sdk = _sdk(api)
    if api == "anthropic":
        raw = sdk.AsyncAnthropic(base_url=base_url, api_key="simulation", max_retries=0)
        messages = wrap(raw, scheduler).messages

        async def send_message(body: dict[str, Any]) -> object:
            return await messages.create(model=model, **_messages_request(body))

        return _Client(send_message, sdk.AnthropicError, raw.close)
    raw = sdk.AsyncOpenAI(base_url=base_url, api_key="simulation", max_retries=0)
    completions = wrap(raw, scheduler).chat.completions

    async def send_chat(body: dict[str, Any]) -> object:
        return await completions.create(model=model, **body)

    return _Client(send_chat, sdk.OpenAIError, raw.close)


async def _drive(
    api: str,
    base_url: str,
    account: Account,
    bodies: list[dict[str, Any]],
    workers: int,
    model: str,
    redis_url: str | None,
    namespace: str,
) -> dict[str, int]:
    """Send `bodies` through ratekit from `workers` tasks, with the `api` client at
    `base_url`; returns counts of outcomes."""
    backend = None
    if redis_url is not None:
        from ..backends.redis import RedisBackend

        backend = RedisBackend(redis_url, namespace=namespace)
    scheduler = Scheduler(account, backend=backend)
    client = _client(api, base_url, scheduler, model)
    queue = deque(bodies)
    outcome = {"ok": 0, "failed": 0}

    async def worker() -> None:
        while queue:
            body = queue.popleft()
            try:
                await client.send(body)
                outcome["ok"] += 1
            except client.failure:
                outcome["failed"] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
        # Read while the backend is open: a closed RedisBackend answers nothing.
        outcome["rate_limited"] = (await scheduler.statistics()).rate_limited
    finally:
        await client.close()
        if backend is not None:
            await backend.aclose()
    return outcome


def _process_main(arguments: str) -> None:
    """One worker process of a multi-process simulation (arguments as JSON)."""
    spec = json.loads(arguments)
    account = _account(
        spec["provider"], spec["tier"], spec["speed"], spec["margin_ms"], spec["pacing"]
    )
    workload = CallMix(spec["calls"], spec["seed"])
    bodies = _requests(workload, spec["share"], spec["part"])
    result = asyncio.run(
        _drive(
            spec["api"],
            spec["base_url"],
            account,
            bodies,
            spec["workers"],
            spec["model"],
            spec["redis"],
            spec["namespace"],
        )
    )
    print(json.dumps(result))


def _account(
    provider: str, tier: str, speed: float, margin_ms: float | None, pacing: bool
) -> Account:
    """The account as a user builds it: the library's defaults, time compressed; a margin
    (real ms, never compressed) and pacing only when asked for."""
    overrides: dict[str, Any] = {"period_scale": 1 / speed}
    if margin_ms is not None:
        overrides["margin_s"] = margin_ms / 1000
    if pacing:
        overrides["pacing"] = True
    return Account(provider, tier=tier, **overrides)


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


def plot(calls: list[CallRecord], limits: Limits, path: str, title: str) -> None:
    """A PNG: requests and tokens admitted per window over time, against the limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rate, rate.unit) for rate in limits.all_rates if rate.unit in ("requests", "tokens")]
    figure, axes = plt.subplots(len(panels) or 1, 1, figsize=(9, 3.2 * max(len(panels), 1)))
    axes_list = list(axes) if len(panels) > 1 else [axes]
    start = min((c.arrived_s for c in calls), default=0.0)
    for axis, (rate, unit) in zip(axes_list, panels, strict=False):
        times, totals = window_series(calls, rate.period_s, unit)
        axis.plot([t - start for t in times], totals, drawstyle="steps-post", label="admitted")
        axis.axhline(rate.limit, color="red", linestyle="--", label=f"limit {rate.limit:,.0f}")
        axis.set_ylabel(f"{unit} per window")
        axis.set_title(
            f"{rate.name}: {unit} the provider admitted in the {rate.period_s:g} s window"
            " ending at each arrival"
        )
        axis.set_ylim(0, rate.limit * 1.15)
        axis.legend(loc="lower right")
    axes_list[-1].set_xlabel("seconds since the first call (compressed time)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclass
class _Run:
    """What the provider saw of one simulation."""

    calls: list[CallRecord]
    statistics: MockProviderStatistics


async def _simulate(options: dict[str, Any]) -> tuple[dict[str, Any], _Run]:
    profile = load_profile(options["provider"])
    tier = profile.tier(options["tier"])
    provider_limits = tier.limits(model=options["model_limits"])
    speed = options["speed"]
    server = ProviderProcess(
        provider_limits, speed=speed, completion_tokens=options["completion_tokens"]
    )
    await server.start()
    started = time.monotonic()
    workload = CallMix(options["calls"], options["seed"])
    # Where the provider serves each API (the Anthropic SDK adds /v1 itself).
    base_url = {"openai": server.base_url, "anthropic": server.anthropic_base_url}[options["api"]]
    try:
        if options["processes"] > 1:
            outcome = await _in_processes(options, workload, base_url)
        else:
            account = _account(
                options["provider"], tier.name, speed, options["margin_ms"], options["pacing"]
            )
            bodies = _requests(workload, workload.calls, 0)
            outcome = await _drive(
                options["api"],
                base_url,
                account,
                bodies,
                options["workers"],
                options["model"],
                options["redis"],
                options["namespace"],
            )
        elapsed = time.monotonic() - started
        run = _Run(await server.calls(), await server.statistics())
    finally:
        await server.close()
    report: dict[str, Any] = {**outcome, "elapsed_s": elapsed}
    return report, run


async def _in_processes(
    options: dict[str, Any], workload: CallMix, base_url: str
) -> dict[str, int]:
    count = options["processes"]
    shares = [
        workload.calls // count + (1 if i < workload.calls % count else 0) for i in range(count)
    ]
    spec = {
        key: options[key]
        for key in (
            "api",
            "provider",
            "tier",
            "speed",
            "margin_ms",
            "pacing",
            "model",
            "redis",
            "namespace",
        )
    }
    spec.update({"calls": workload.calls, "seed": workload.seed, "base_url": base_url})
    spec["workers"] = max(1, options["workers"] // count)
    processes = []
    for part, share in enumerate(shares):
        arguments = json.dumps({**spec, "share": share, "part": part})
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from ratekit.cli._simulate_cmd import _process_main; "
                f"_process_main({arguments!r})",
                stdout=asyncio.subprocess.PIPE,
            )
        )
    total = {"ok": 0, "failed": 0, "rate_limited": 0}
    for process in processes:
        stdout, _ = await process.communicate()
        if process.returncode != 0:
            raise click.ClickException(f"a simulation process failed (exit {process.returncode})")
        for key, value in json.loads(stdout.decode().strip().splitlines()[-1]).items():
            total[key] += value
    return total


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def _by_dimension(rejected: dict[str, int]) -> str:
    return f" ({_counts(rejected)})" if rejected else ""


def binding_utilisation(calls: list[CallRecord], limits: Limits) -> tuple[str, float]:
    """The rate the run used most of in its steady state, and that share of it.

    Requests count at arrival; tokens as the provider counts them (prompt + max
    output at arrival). NaN for a run too short to have a steady state.
    """
    best_name, best = "none", math.nan
    for rate in limits.all_rates:
        if rate.unit == "requests":
            amounts = [1.0] * len(calls)
        elif rate.unit == "tokens":
            amounts = [float(call.reserved_tokens) for call in calls]
        else:
            continue
        share = steady_utilisation(
            [call.arrived_s for call in calls], amounts, rate.limit, rate.period_s
        )
        if not math.isnan(share) and (math.isnan(best) or share > best):
            best_name, best = rate.name, share
    return best_name, best


def _report(
    console: Console, outcome: dict[str, Any], run: _Run, limits: Limits, title: str
) -> int:
    stats = run.statistics
    table = Table(title=title)
    for column in ("dimension", "peak in any window", "limit", "used"):
        table.add_column(column, justify="left" if column == "dimension" else "right")
    for name, (peak, limit) in stats.peak_use.items():
        table.add_row(name, f"{peak:,.0f}", f"{limit:,.0f}", f"{peak / limit:.0%}")
    console.print(table)
    name, share = binding_utilisation(run.calls, limits)
    if math.isnan(share):
        console.print("steady-state utilisation: the run is too short to have a steady state")
    else:
        console.print(f"steady-state utilisation of the binding limit ({name}): {share:.1%}")
    console.print(f"served by endpoint: {_counts(stats.served_by_endpoint) or 'none'}")
    # The verdict last: calls, and the provider's 429s.
    rejected = sum(stats.rejected.values())
    console.print(
        f"calls: {outcome['ok']} ok, {outcome['failed']} failed; 429s at the provider: "
        f"{rejected}{_by_dimension(stats.rejected)}; elapsed {outcome['elapsed_s']:.2f} s"
    )
    return 0 if rejected == 0 and outcome["failed"] == 0 else 1


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
    help="safety margin per admission, real ms [default: the library's, 20]",
)
@click.option(
    "--pacing/--no-pacing", default=False, show_default=True, help="spread requests evenly"
)
@click.option("--plot", "plot_path", default=None, help="write a PNG of use per window")
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
    outcome, run = asyncio.run(_simulate(options))
    title = f"{provider} {tier_name}: what the strict provider admitted"
    compressed = profile.tier(tier_name).limits(model_limits).compressed(speed)
    code = _report(console, outcome, run, compressed, title)
    if plot_path:
        plot(run.calls, compressed, plot_path, f"{provider} {tier_name}, x{speed:g}")
        console.print(f"plot: {plot_path}")
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    multiprocessing.freeze_support()
