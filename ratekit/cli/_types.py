"""Option types shared by the commands: numbers that are finite and in range."""

from __future__ import annotations

import math
import sys

import click
from rich.console import Console


class FiniteFloat(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2
    """A finite number (no ``nan`` or ``inf``), at least `low` (above it when `open_low`)
    and at most `high`: a bad value is one line naming the option, before any work."""

    name = "number"

    def __init__(
        self, low: float | None = None, *, open_low: bool = False, high: float | None = None
    ) -> None:
        self.low = low
        self.open_low = open_low
        self.high = high

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low, high = self.low, self.high
        if low is not None and (number < low or (self.open_low and number == low)):
            bound = f"above {low:g}" if self.open_low else f"at least {low:g}"
            self.fail(f"{number:g} is not {bound}", param, ctx)
        if high is not None and number > high:
            self.fail(f"{number:g} is above {high:g}", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"FiniteFloat({self.low!r}, open_low={self.open_low!r}, high={self.high!r})"


AMOUNT = FiniteFloat(0)  # a price, a top-up, seconds of grace: 0 or more
POSITIVE = FiniteFloat(0, open_low=True)  # a limit, a speed, a timeout: more than 0


class InputError(click.ClickException):
    """A value the command cannot use (an unknown provider, tier or model, a file it
    must not write): one line, ``Error: ...``, and exit code 2, as click's usage errors."""

    exit_code = 2


# Wide enough that no table or line of ours wraps when the output is not a terminal.
_PIPE_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    """A console for a command's output: a terminal's own width; in a pipe or a file, lines
    that are never wrapped or cut (a table as wide as it needs)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=_PIPE_WIDTH, soft_wrap=True)
