"""`bench.acquire` over a copy of ratekit whose hot path is compiled with mypyc.

Run from the repository root::

    python -m bench.compiled [--compile ratekit/MODULE.py ...] [bench.acquire's options]

An experiment, not a build: ratekit installs and runs as pure Python, which stays
the reference. This copies the `ratekit` package to a temporary directory,
compiles there with mypyc the four modules an uncontended admission runs through
(the windows, the memory backend, the admission and the limiter; it needs mypy,
which ships mypyc, and a C compiler; about a minute; `--compile` names other
modules to compile with them), and runs ``python -m bench.acquire`` with that copy
first on the path, so its table sets the compiled ratekit beside aiolimiter in
one run. Run ``python -m bench.acquire`` for the pure-Python table.

Compiled, an amount arrives as a float whatever the caller passed (mypyc keeps a
`float` argument as a C double), so the limiter's shortcuts for plain numbers take
floats as well as ints: with ints only, every compiled admission went through the
full validation and the compiled limiter was slower than the pure one.

Compiled, the arguments are not checked as the pure-Python ones are: mypyc
converts them to a double at the call (a bool or a numpy int becomes 1.0 and
is admitted; a string or an int too large for a float raises `TypeError`, not
`InvalidCostError`), so `tests/test_errors.py` fails against the compiled copy. A
compiled build offered to users would check its arguments before that conversion.

The compiled windows cannot be deep-copied (mypyc's native classes need an
explicit opt-in for `copy`), so `tests/test_properties.py`, which copies a
backend to check a wait hint, does not run against them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILED = [
    "ratekit/_window.py",
    "ratekit/backends/memory.py",
    "ratekit/_admission.py",
    "ratekit/_limiter.py",
]


def build(where: Path, modules: Sequence[str]) -> None:
    """Copy the package under `where` and compile `modules` (paths) in place there."""
    shutil.copytree(
        ROOT / "ratekit", where / "ratekit", ignore=shutil.ignore_patterns("__pycache__")
    )
    # mypyc builds through setuptools; the copy has no pyproject.toml for it to read.
    # The source tree off the path, so that mypy sees one package named ratekit.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    command = [sys.executable, "-c", "from mypyc.__main__ import main; main()", *modules]
    done = subprocess.run(command, cwd=where, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.compiled: mypyc could not build:\n{done.stdout}{done.stderr}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled", add_help=False)
    parser.add_argument("--compile", action="append", default=[], metavar="MODULE.py")
    known, args = parser.parse_known_args(argv)
    modules = [*COMPILED, *(m for m in known.compile if m not in COMPILED)]
    with tempfile.TemporaryDirectory(prefix="ratekit-mypyc-") as scratch:
        where = Path(scratch)
        build(where, modules)
        # Run from the copy: the current directory comes first on the path, and the
        # source tree's own ratekit must not.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(where), str(ROOT)]))
        names = [m.removesuffix(".py").replace("/", ".") for m in modules]
        check = f"import importlib; [print(importlib.import_module(n).__file__) for n in {names}]"
        subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=where)
        command = [sys.executable, "-m", "bench.acquire", *args]
        subprocess.run(command, env=env, check=True, cwd=where)


if __name__ == "__main__":
    main()
