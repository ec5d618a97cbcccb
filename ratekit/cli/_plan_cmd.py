"""``ratekit plan``: how long a batch takes at a tier, which limit binds, what it costs.

The numbers come from `ratekit.cli._plan` (pure); this module reads the options and the
JSONL file, and prints rich tables or, with ``--json``, one JSON document.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from .._errors import RatekitError
from .._pool_file import load_pool
from .._pricing import ExtraTokens
from .._profiles import Profile, Tier, load_profile
from .._tokens import default_estimator
from ._plan import (
    DEFAULT_CALL_S,
    CostEstimate,
    LineProblem,
    Plan,
    PlanError,
    Pricing,
    TierTime,
    Workload,
    make_plan,
    parse_deadline,
    plan_pool,
    read_jsonl,
)
from ._types import AMOUNT, POSITIVE, FiniteFloat, InputError, make_console


class PlanUsageError(InputError):
    """A plan that cannot be made from the options (unknown name, missing input): exit 2."""


def format_duration(seconds: float) -> str:
    """`seconds` as ``"5h 33m 10s"`` (days when longer than one); "never" when infinite."""
    if not math.isfinite(seconds):
        return "never"
    whole = math.ceil(seconds)
    if whole == 0:
        return "0s"
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return " ".join(f"{value}{unit}" for value, unit in parts if value)


def _amount(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _money(value: float) -> str:
    return f"{value:,.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3e}"


def _threshold(top_up: float, inclusive: bool) -> str:
    return f"{top_up:,g}" if inclusive else f"> {top_up:g}"


def _top_up(time: TierTime) -> str:
    return _threshold(time.top_up, time.top_up_inclusive)


def limits_table(plan: Plan) -> Table:
    """Every limit of the chosen tier: its number, the batch's amount, windows, time."""
    time = plan.time
    model = f", {plan.model}" if plan.model else ""
    table = Table(
        title=f"{plan.provider} {time.tier}{model}: {plan.workload.requests:,} requests, "
        f"{plan.workload.total_tokens:,} tokens, calls of {plan.call_s:g} s",
        caption="* binding: the limit that takes longest",
    )
    for column in ("limit", "allows", "batch", "windows", "last admission", "done"):
        table.add_column(column, justify="left" if column in ("limit", "allows") else "right")
    for limit in time.limits:
        if limit.period_s is None:
            allows = f"{_amount(limit.limit)} in flight"
        else:
            allows = f"{_amount(limit.limit)} {limit.unit} / {format_duration(limit.period_s)}"
        binding = limit is time.binding
        table.add_row(
            f"[bold]{limit.name} *[/bold]" if binding else limit.name,
            allows,
            _amount(limit.amount),
            "-" if limit.batches is None else f"{limit.batches:,}",
            format_duration(limit.last_admission_s),
            format_duration(limit.finish_s),
        )
    if not time.limits:
        table.add_row("(no limits)", "-", "-", "-", "-", format_duration(time.finish_s))
    return table


def cost_table(cost: CostEstimate) -> Table:
    """The bill line by line, and the total (with the relay's CNY conversion)."""
    unit = f"per {cost.tokens_per_price_unit:,} tokens"
    factor = f", x{cost.factor:.4g} discounts and multipliers" if cost.factor != 1 else ""
    table = Table(title=f"cost, {cost.currency} ({unit}{factor}; output at its maximum)")
    for column in ("item", "tokens", "billed tokens", "price", cost.currency):
        table.add_column(column, justify="left" if column == "item" else "right")
    for line in cost.lines:
        table.add_row(
            line.item,
            _amount(line.tokens),
            _amount(line.billed_tokens),
            f"{line.price:g}",
            _money(line.cost),
        )
    table.add_row("[bold]total[/bold]", "", "", "", f"[bold]{_money(cost.total)}[/bold]")
    if cost.converted is not None:
        currency, amount = cost.converted
        table.add_row(f"total in {currency}", "", "", "", _money(amount))
    return table


def tiers_table(plan: Plan) -> Table:
    """Every tier's time against the deadline."""
    deadline = format_duration(plan.deadline_s or 0.0)
    table = Table(title=f"tiers against a deadline of {deadline}")
    for column in ("tier", f"top-up ({plan.currency})", "binding", "done", "meets"):
        table.add_column(column, justify="left" if column in ("tier", "binding") else "right")
    for time in plan.tiers:
        meets = plan.deadline_s is not None and time.meets(plan.deadline_s)
        cheapest = plan.cheapest is not None and time.tier == plan.cheapest.tier
        table.add_row(
            f"[bold]{time.tier}[/bold]" if cheapest else time.tier,
            _top_up(time),
            "-" if time.binding is None else time.binding.name,
            format_duration(time.finish_s),
            "yes" if meets else "no",
        )
    return table


def deadline_sentence(plan: Plan) -> str:
    """One sentence: the cheapest tier that meets the deadline, or that none does."""
    deadline = format_duration(plan.deadline_s or 0.0)
    if plan.cheapest is None:
        fastest = min(plan.tiers, key=lambda t: t.finish_s, default=None)
        if fastest is None:
            best = ""
        elif math.isinf(fastest.finish_s):
            best = ": a request is larger than a whole limit of every tier"
        else:
            best = f"; the fastest, {fastest.tier}, needs {format_duration(fastest.finish_s)}"
        return f"No tier finishes within {deadline}{best}."
    top_up = _top_up(plan.cheapest)
    return (
        f"Cheapest tier within {deadline}: {plan.cheapest.tier} (cumulative top-up "
        f"{top_up} {plan.currency}), done in {format_duration(plan.cheapest.finish_s)}."
    )


def _fail(exc: Exception) -> PlanUsageError:
    return PlanUsageError(str(exc))


def _pick_tier(profile: Profile, tier: str | None, top_up: float | None) -> Tier:
    if (tier is None) == (top_up is None):
        raise PlanUsageError("give exactly one of --tier and --top-up")
    if tier is not None:
        return profile.tier(tier)
    assert top_up is not None
    reached = profile.tier_for_top_up(top_up)
    if reached is None:
        first = profile.tiers[0]
        raise PlanUsageError(
            f"a cumulative top-up of {top_up:g} {profile.currency} reaches no tier of "
            f"{profile.provider!r}; {first.name} needs "
            f"{_threshold(first.top_up, first.top_up_inclusive)}"
        )
    return reached


def _workload(
    profile: Profile,
    requests: int | None,
    prompt_tokens: int | None,
    output_tokens: int | None,
    jsonl: Path | None,
) -> tuple[Workload, tuple[LineProblem, ...]]:
    uniform = (requests, prompt_tokens, output_tokens)
    if jsonl is not None:
        if any(value is not None for value in uniform):
            raise PlanUsageError("give --jsonl or --requests/--prompt-tokens/--output-tokens")
        try:
            with jsonl.open(encoding="utf-8") as lines:
                read = read_jsonl(lines, default_estimator(profile))
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanUsageError(f"{jsonl}: cannot be read: {exc}") from None
        if not read.requests:
            shown = "; ".join(f"line {p.line}: {p.message}" for p in read.problems[:3])
            more = len(read.problems) - 3
            raise PlanUsageError(
                f"{jsonl}: no request could be read"
                + (f": {shown}" if shown else " (it holds no request line)")
                + (f"; and {more} more malformed line(s)" if more > 0 else "")
            )
        return Workload.of_requests(read.requests), read.problems
    if requests is None or prompt_tokens is None or output_tokens is None:
        raise PlanUsageError(
            "give --requests, --prompt-tokens and --output-tokens (tokens per request), "
            "or --jsonl FILE"
        )
    return Workload.uniform(requests, prompt_tokens, output_tokens), ()


def _extras(values: tuple[str, ...]) -> tuple[ExtraTokens, ...]:
    extras = []
    for value in values:
        parts = value.split(":")
        try:
            item, tokens, multiple = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise PlanUsageError(
                f"--extra {value!r}: expected ITEM:TOKENS_PER_REQUEST:MULTIPLE (reasoning:500:2)"
            ) from None
        if len(parts) != 3:
            raise PlanUsageError(f"--extra {value!r}: expected ITEM:TOKENS_PER_REQUEST:MULTIPLE")
        if not (math.isfinite(tokens) and tokens >= 0 and math.isfinite(multiple) and multiple > 0):
            raise PlanUsageError(
                f"--extra {value!r}: tokens must be a finite number >= 0 and the multiple > 0"
            )
        extras.append(ExtraTokens(item, tokens, multiple))
    return tuple(extras)


def _problems_out(problems: tuple[LineProblem, ...]) -> list[dict[str, Any]]:
    return [{"line": p.line, "message": p.message} for p in problems]


@click.command()
@click.option("--provider", default=None, help="Bundled provider name or a profile .toml file.")
@click.option(
    "--pool",
    "pool_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="A pool file instead of --provider: the batch spread over its accounts.",
)
@click.option("--tier", default=None, help="Tier name (or give --top-up).")
@click.option("--top-up", type=AMOUNT, default=None, help="Cumulative top-up; picks the tier.")
@click.option("--model", default=None, help="Model: its limits (MiniMax) and prices.")
@click.option(
    "--requests", type=click.IntRange(min=0, max=10**15), default=None, help="Number of requests."
)
@click.option(
    "--prompt-tokens", type=click.IntRange(min=0, max=10**15), default=None, help="Per request."
)
@click.option(
    "--output-tokens",
    type=click.IntRange(min=0, max=10**15),
    default=None,
    help="Max output per request.",
)
@click.option(
    "--jsonl",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Requests, one a line: a chat request body or {prompt_tokens, max_tokens}.",
)
@click.option(
    "--call-seconds",
    type=POSITIVE,
    default=DEFAULT_CALL_S,
    show_default=True,
    help="Mean call duration, seconds.",
)
@click.option(
    "--cache-hit-share",
    type=FiniteFloat(0, high=1),
    default=0.0,
    show_default=True,
    help="Share of prompt tokens that hit the cache.",
)
@click.option("--deadline", default=None, help="Find the cheapest tier within it: 2h, 90m, 1d.")
@click.option(
    "--input-price", type=AMOUNT, default=None, help="Per 1M tokens (relay: per 1,000 tokens)."
)
@click.option(
    "--output-price", type=AMOUNT, default=None, help="Per 1M tokens (relay: per 1,000 tokens)."
)
@click.option("--cached-input-price", type=AMOUNT, default=None, help="Per 1M tokens.")
@click.option("--cache-multiple", type=POSITIVE, default=1.0, help="Relay: cache tokens' multiple.")
@click.option(
    "--extra", multiple=True, help="Relay: ITEM:TOKENS_PER_REQUEST:MULTIPLE (reasoning:500:2)."
)
@click.option("--channel-discount", type=POSITIVE, default=1.0, help="Relay: e.g. 0.8.")
@click.option("--user-discount", type=POSITIVE, default=1.0, help="Relay: e.g. 0.9.")
@click.option("--field", "fields", multiple=True, help="Relay: priced request field (priority).")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Override.")
@click.option("--rpm", type=POSITIVE, default=None, help="Override the tier's RPM.")
@click.option("--tpm", type=POSITIVE, default=None, help="Override the tier's TPM.")
@click.option("--tpd", type=POSITIVE, default=None, help="Override the tier's TPD.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def plan(
    provider: str | None,
    pool_path: str | None,
    tier: str | None,
    top_up: float | None,
    model: str | None,
    requests: int | None,
    prompt_tokens: int | None,
    output_tokens: int | None,
    jsonl: Path | None,
    call_seconds: float,
    cache_hit_share: float,
    deadline: str | None,
    input_price: float | None,
    output_price: float | None,
    cached_input_price: float | None,
    cache_multiple: float,
    extra: tuple[str, ...],
    channel_discount: float,
    user_discount: float,
    fields: tuple[str, ...],
    concurrency: int | None,
    rpm: float | None,
    tpm: float | None,
    tpd: float | None,
    as_json: bool,
) -> None:
    """How long a batch takes at a tier, which limit binds, and what it costs.

    Times are lower bounds from the provider's windows: a rate of N per P admits N at
    once and N more each P. Overrides (--rpm, ...) apply to every tier. With --pool, the
    batch is spread over the pool file's accounts (each at its own tier, limits and
    prices) so that it ends as early as it can.
    """
    if (provider is None) == (pool_path is None):
        raise PlanUsageError("give --provider or --pool (one of them)")
    if pool_path is not None:
        given = [
            name
            for name, value in (("--tier", tier), ("--top-up", top_up), ("--deadline", deadline))
            if value is not None
        ]
        if given:
            raise PlanUsageError(
                f"{', '.join(given)}: a pool file gives each account its tier; leave it out"
            )
        _plan_pool(
            pool_path, model, requests, prompt_tokens, output_tokens, jsonl, call_seconds, as_json
        )
        return
    assert provider is not None
    try:
        profile = load_profile(provider)
        chosen = _pick_tier(profile, tier, top_up)
        workload, problems = _workload(profile, requests, prompt_tokens, output_tokens, jsonl)
        numbers = {"concurrency": concurrency, "rpm": rpm, "tpm": tpm, "tpd": tpd}
        overrides = {name: value for name, value in numbers.items() if value is not None}
        pricing = Pricing(
            cache_hit_share=cache_hit_share,
            input_price=input_price,
            output_price=output_price,
            cached_input_price=cached_input_price,
            cache_multiple=cache_multiple,
            extras_per_request=_extras(extra),
            channel_discount=channel_discount,
            user_discount=user_discount,
            fields=fields,
        )
        result = make_plan(
            profile,
            chosen,
            workload,
            model=model,
            call_s=call_seconds,
            deadline_s=None if deadline is None else parse_deadline(deadline),
            pricing=pricing,
            overrides=overrides,
        )
    except RatekitError as exc:
        raise _fail(exc) from None
    if as_json:
        document = result.as_dict()
        document["malformed_lines"] = _problems_out(problems)
        click.echo(json.dumps(document, indent=2))
        return
    _print(result, problems)


def _plan_pool(
    pool_path: str,
    model: str | None,
    requests: int | None,
    prompt_tokens: int | None,
    output_tokens: int | None,
    jsonl: Path | None,
    call_seconds: float,
    as_json: bool,
) -> None:
    """``plan --pool``: the batch spread over the pool's accounts."""
    try:
        pool = load_pool(pool_path)
        first = pool.accounts[0].account.profile
        workload, problems = _workload(first, requests, prompt_tokens, output_tokens, jsonl)
        accounts = []
        for account in pool.accounts:
            names = account.models
            if model is not None and names is not None and model not in names:
                continue  # this account does not serve the model
            own = names[model] if isinstance(names, dict) and model is not None else model
            accounts.append(
                (
                    account.name,
                    account.account.profile,
                    account.account.tier,
                    dict(account.overrides),
                    own,
                    account.discount,
                )
            )
        if not accounts:
            raise PlanError(f"no account of the pool serves model {model!r}")
        result = plan_pool(accounts, workload, call_s=call_seconds)
    except RatekitError as exc:
        raise _fail(exc) from None
    if as_json:
        document = result.as_dict()
        document["malformed_lines"] = _problems_out(problems)
        click.echo(json.dumps(document, indent=2))
        return
    console = make_console()
    table = Table(title=f"{result.workload.requests:,} requests spread over the pool")
    for column in ("account", "tier", "requests", "binding", "done", "cost"):
        table.add_column(
            column, justify="left" if column in ("account", "tier", "binding") else "right"
        )
    for share in result.shares:
        binding = share.time.binding
        cost = "not priced" if share.cost is None else f"{_money(share.cost)} {share.currency}"
        table.add_row(
            share.account,
            f"{share.provider} {share.time.tier}",
            f"{share.requests:,}",
            "-" if binding is None or not share.requests else binding.name,
            format_duration(share.time.finish_s),
            cost,
        )
    console.print(table)
    if math.isinf(result.finish_s):
        console.print(
            "Spread over the pool, the batch can never finish: some request is larger "
            "than a whole limit of every account it could go to."
        )
    else:
        console.print(
            f"Spread over the pool, the batch takes at least {format_duration(result.finish_s)}."
        )


def _print(result: Plan, problems: tuple[LineProblem, ...]) -> None:
    console = make_console()
    err = make_console(stderr=True)
    for problem in problems:
        err.print(f"[yellow]line {problem.line}: skipped: {escape(problem.message)}[/yellow]")
    if problems:
        err.print(f"[yellow]{len(problems)} malformed line(s) skipped[/yellow]")
    console.print(limits_table(result))
    time = result.time
    binding = "no limit" if time.binding is None else time.binding.name
    if math.isinf(time.finish_s):
        console.print(
            f"At {time.tier}, the batch can never finish: a request is larger than the "
            f"whole {binding} limit."
        )
    else:
        console.print(
            f"At {time.tier}, the batch takes at least {format_duration(time.finish_s)} "
            f"({binding} binds)."
        )
    if result.cost is not None:
        console.print(cost_table(result.cost))
    else:
        console.print(f"cost: not priced: {escape(result.cost_note)}")
    if result.deadline_s is not None:
        console.print(tiers_table(result))
        console.print(deadline_sentence(result))
