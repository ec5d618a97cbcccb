"""``ratekit mock-provider``: the strict local OpenAI-compatible server."""

from __future__ import annotations

import click

from .. import mock_provider as _mock


@click.command(
    "mock-provider",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def mock_provider(context: click.Context) -> None:
    """Serve an OpenAI-compatible API on loopback that enforces a tier strictly.

    Options: --provider, --tier, --model, --speed (60: a minute per second),
    --port, --counting, --latency-ms, --ms-per-token; --help for details.
    """
    raise SystemExit(_mock.main(list(context.args)))
