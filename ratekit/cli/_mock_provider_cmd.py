"""``ratekit mock-provider``: the strict local server for OpenAI's and Anthropic's APIs."""

from __future__ import annotations

import click

from ..testing import mock_provider as _mock


@click.command(
    "mock-provider",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def mock_provider(context: click.Context) -> None:
    """Serve OpenAI's API (base URL .../v1) and Anthropic's Messages API (base URL
    without /v1) on loopback, enforcing a tier strictly in one set of windows.

    Options: --provider, --tier, --model, --speed (60: a minute per second),
    --port, --counting, --latency-ms, --ms-per-token, --no-count-cache-reads;
    --help for details.
    """
    raise SystemExit(_mock.main(list(context.args), prog="ratekit mock-provider"))
