"""``ratekit profiles [PROVIDER]``: the bundled providers, their tiers and prices, as tables."""

from __future__ import annotations

import click
from rich.table import Table

from .._errors import RatekitError
from .._profiles import Profile, bundled_providers, load_profile
from ._types import InputError, make_console


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value == int(value) else f"{value:,}"


def tiers_table(profile: Profile) -> Table:
    """The tiers of `profile`: top-up, concurrency, RPM, TPM, TPD ("-": no limit)."""
    table = Table(title=f"{profile.display_name} ({profile.provider}): tiers, {profile.currency}")
    for column in ("tier", "top-up", "concurrency", "RPM", "TPM", "TPD"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier in profile.tiers:
        top_up = f"> {tier.top_up:g}" if not tier.top_up_inclusive else f"{tier.top_up:,g}"
        table.add_row(
            tier.name,
            top_up,
            _number(tier.concurrency),
            _number(tier.rpm),
            _number(tier.tpm),
            _number(tier.tpd),
        )
    return table


def models_table(profile: Profile) -> Table | None:
    """Per-model limits and token prices (per 1M tokens), when the profile lists models."""
    if not profile.models:
        return None
    table = Table(title=f"{profile.provider}: models, {profile.currency} per 1M tokens")
    columns = ("model", "input", "cached input", "output", "cache write", "other", "limits")
    for column in columns:
        left = column in ("model", "other", "limits")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "model")
    for model in profile.models:
        prices = model.prices
        other = []
        for label, value in (
            ("per 10k chars", prices.per_10k_characters),
            ("per voice", prices.per_voice),
            ("per hour", prices.per_hour),
            ("per request", prices.per_request),
            ("per song", prices.per_song),
            ("per image", prices.per_image),
        ):
            if value is not None:
                other.append(f"{value:g} {label}")
        if prices.per_video:
            other.append(f"videos: {len(prices.per_video)} variants")
        limits = "; ".join(
            f"{tier}: rpm {_number(numbers.rpm)}, tpm {_number(numbers.tpm)}"
            for tier, numbers in model.limits_by_tier.items()
        )
        table.add_row(
            model.name,
            _optional(prices.input_per_1m_tokens),
            _optional(prices.cached_input_per_1m_tokens),
            _optional(prices.output_per_1m_tokens),
            _optional(prices.cache_write_per_1m_tokens),
            ", ".join(other),
            limits,
        )
    return table


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@click.command()
@click.argument("provider", required=False)
def profiles(provider: str | None) -> None:
    """The bundled providers; with PROVIDER, its tiers and prices."""
    console = make_console()
    if provider is None:
        table = Table(title="bundled providers")
        for column in ("provider", "name", "currency", "tiers"):
            table.add_column(column)
        for name in bundled_providers():
            profile = load_profile(name)
            table.add_row(
                name, profile.display_name, profile.currency, ", ".join(profile.tier_names)
            )
        console.print(table)
        return
    try:
        profile = load_profile(provider)
    except RatekitError as exc:
        raise InputError(str(exc)) from None
    console.print(tiers_table(profile))
    models = models_table(profile)
    if models is not None:
        console.print(models)
