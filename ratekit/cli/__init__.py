"""The ``ratekit`` command: profiles, plans, batch runs, a strict local provider, simulations.

Each command lives in a module of its own and is registered here.
"""

from __future__ import annotations

import click

from ._mock_provider_cmd import mock_provider
from ._profiles_cmd import profiles


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ratekit")
def main() -> None:
    """Keep LLM calls inside a provider's tier: plan, run and simulate batches."""


main.add_command(profiles)
main.add_command(mock_provider)


def _register_optional() -> None:
    # Commands written in modules of their own, registered when present.
    from importlib import import_module

    commands = (("._plan_cmd", "plan"), ("._run_cmd", "run"), ("._simulate_cmd", "simulate"))
    for module, name in commands:
        try:
            command = getattr(import_module(module, __name__), name)
        except ModuleNotFoundError:
            continue
        main.add_command(command)


_register_optional()
