"""``ratekit mock-provider`` (also ``python -m ratekit.testing.mock_provider``): the strict
local server for OpenAI's and Anthropic's APIs, until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from .._errors import RatekitError
from .._limits import Limits
from .._profiles import load_profile
from ..testing._strict import PROVIDER_COUNTINGS
from ..testing.mock_provider import _ADMIN_LIMIT_KEYS, DEFAULT_MODEL, MockProvider
from ._types import AMOUNT, POSITIVE, FiniteFloat, InputError


class LimitsJson(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2
    """Limits as the provider's numbers in a JSON object of concurrency, rpm, tpm and tpd
    (``null`` for unlimited; a key left out is unlimited too)."""

    name = "json"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Limits:
        if isinstance(value, Limits):
            return value
        text = str(value)
        try:
            values = json.loads(text)
        except ValueError as exc:
            self.fail(f"{text!r} is not JSON: {exc}", param, ctx)
        keys = ", ".join(_ADMIN_LIMIT_KEYS)
        if not isinstance(values, dict) or set(values) - set(_ADMIN_LIMIT_KEYS):
            self.fail(f"{text!r} is not a JSON object of {keys}", param, ctx)
        try:
            return Limits(**values)
        except RatekitError as exc:
            self.fail(str(exc), param, ctx)


async def _serve(
    limits: Limits, options: dict[str, Any], banner: str, until_stdin_closes: bool
) -> None:
    async with MockProvider(limits, **options) as server:
        # The OpenAI base URL alone on its line (what a parent process reads), then the
        # Anthropic one, which the anthropic SDK takes without /v1.
        print(f"{banner}\n{server.base_url}", flush=True)
        print(f"anthropic base URL: {server.anthropic_base_url}", flush=True)
        if until_stdin_closes:
            await asyncio.to_thread(sys.stdin.read)
        else:
            await asyncio.Event().wait()


@click.command("mock-provider", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--provider", default="moonshot", show_default=True, help="bundled provider")
@click.option("--tier", default="tier1", show_default=True, help="tier name")
@click.option("--model", default=None, help="model, for per-model limits")
@click.option(
    "--speed",
    type=POSITIVE,
    default=1.0,
    show_default=True,
    help="time compression: 60 runs a minute per second",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="port, 0 for any free one",
)
@click.option(
    "--counting",
    type=click.Choice([mode.value for mode in PROVIDER_COUNTINGS]),
    default="reserve",
    show_default=True,
    help="how tokens count: reserve (at arrival) or usage (at completion)",
)
@click.option(
    "--latency-ms",
    type=AMOUNT,
    default=0.0,
    show_default=True,
    help="fixed latency per call, provider ms",
)
@click.option(
    "--ms-per-token",
    type=AMOUNT,
    default=0.0,
    show_default=True,
    help="latency per output token, provider ms",
)
@click.option(
    "--completion-tokens",
    type=click.IntRange(1, 1_000_000),
    default=16,
    show_default=True,
    help="output tokens per call at most",
)
@click.option(
    "--tokenizer-factor",
    type=FiniteFloat(0.01, high=100),
    default=1.0,
    show_default=True,
    help="the provider's prompt tokens per mock-tokenizer token",
)
@click.option(
    "--count-cache-reads/--no-count-cache-reads",
    default=True,
    show_default=True,
    help="whether prompt-cache reads of Messages calls count toward token rates",
)
@click.option(
    "--limits",
    "own_limits",
    type=LimitsJson(),
    default=None,
    help='JSON limits instead of the tier\'s: {"rpm": 200, "tpm": null, ...}',
)
@click.option(
    "--until-stdin-closes",
    is_flag=True,
    help="stop when standard input closes (a child of another process)",
)
def mock_provider(
    provider: str,
    tier: str,
    model: str | None,
    speed: float,
    host: str,
    port: int,
    counting: str,
    latency_ms: float,
    ms_per_token: float,
    completion_tokens: int,
    tokenizer_factor: float,
    count_cache_reads: bool,
    own_limits: Limits | None,
    until_stdin_closes: bool,
) -> None:
    """Serve OpenAI's API (base URL http://host:port/v1) and Anthropic's Messages API (base
    URL http://host:port) on loopback, enforcing a tier's limits strictly in one set of
    windows for both, until Ctrl-C."""
    try:
        tier_limits = load_profile(provider).tier(tier)
        limits = tier_limits.limits(model=model)
    except RatekitError as exc:
        raise InputError(str(exc)) from None
    if own_limits is not None:
        limits = own_limits
    options = {
        "speed": speed,
        "host": host,
        "port": port,
        "token_counting": counting,
        "latency_s": latency_ms / 1000,
        "latency_per_token_s": ms_per_token / 1000,
        "completion_tokens": completion_tokens,
        "tokenizer_factor": tokenizer_factor,
        "count_cache_reads": count_cache_reads,
        "models": (model or DEFAULT_MODEL,),
    }
    banner = (
        f"{provider} {tier_limits.name}: concurrency {limits.concurrency}, rpm {limits.rpm}, "
        f"tpm {limits.tpm}, tpd {limits.tpd}; time x{speed:g}, counting {counting}"
    )
    try:
        asyncio.run(_serve(limits, options, banner, until_stdin_closes))
    except KeyboardInterrupt:
        return  # Ctrl-C is how it stops: exit code 0
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {host}:{port}: {exc}") from None
