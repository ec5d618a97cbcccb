"""``python -m ratekit.cli``: the ``ratekit`` command."""

from . import main

main()
