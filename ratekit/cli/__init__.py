"""The ``ratekit`` command: profiles, plans, batch runs, a strict local provider, simulations.

Each command lives in a module of its own and is registered here. It needs the
``cli`` extra (``pip install 'ratekit[cli]'``).
"""

from __future__ import annotations

import click

from ._mock_provider_cmd import mock_provider
from ._plan_cmd import plan
from ._profiles_cmd import profiles
from ._run_cmd import run
from ._simulate_cmd import simulate_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ratekit")
def main() -> None:
    """Keep LLM calls inside a provider's tier: plan, run and simulate batches."""


for command in (profiles, plan, run, simulate_command, mock_provider):
    main.add_command(command)
