"""`bench.acquire` over a copy of ratekit whose hot path is compiled with mypyc.

Run from the repository root::

    python -m bench.compiled [--compile ratekit/MODULE.py ...] [bench.acquire's options]

The same modules as the opt-in compiled build (`compiled_modules`, read from the mypyc
hook in pyproject.toml), built the quick way: this copies the `ratekit` package to a
temporary directory, compiles those modules there with mypyc (it needs mypy, which
ships mypyc, and a C compiler; about a minute; `--compile` names other modules to
compile with them), and runs ``python -m bench.acquire`` with that copy first on the
path, so its table sets the compiled ratekit beside aiolimiter in one run. Run
``python -m bench.acquire`` for the pure-Python table, the reference.

What the compiled build had to change in the sources, all kept by the pure one too:
amount arguments are typed `SupportsFloat` (mypyc converts an argument typed `float` to
a C double at the call, which turned a bool into 1.0 and admitted it), and their
types are checked before their values (a comparison with a float narrows the type);
module constants are `Final` (else each use is a dictionary lookup); `type(x) is`
rather than ``x.__class__ is`` (an attribute lookup, compiled); the admission knows its
`Limiter` (a protocol's methods are called as Python's); nothing takes a weak
reference to an admission or a limiter (a native object has none: a limiter's backend
holds its `Relay` weakly).

The compiled windows cannot be deep-copied (mypyc's native classes need an explicit
opt-in for `copy`), so `tests/test_properties.py`, which copies a backend to check a
wait hint, does not run against them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """The modules the opt-in compiled build compiles: pyproject.toml's mypyc hook names
    them, so this benchmark times what that build installs."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    hook = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return [str(pattern).lstrip("/") for pattern in hook["include"]]


COMPILED = compiled_modules()


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
