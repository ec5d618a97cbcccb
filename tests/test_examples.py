"""Every script in examples/ runs to its end against the local provider and says so."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from .redis_server import require_redis_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# A line each example must print (besides "ok: no 429"), showing it did its whole job.
EXPECTED = {
    "openai_client.py": "calls: 300/300 (150 plain, 150 streamed)",
    "anthropic_client.py": "calls: 300/300 (100 plain, 100 streamed, 100 stream helper)",
    "decorator.py": "calls: 280/280; provider 429s: 0",
    "sync_threads.py": "calls: 300/300 from 64 threads",
    "sync_clients.py": "calls: 240/240 from 32 threads",
    "redis_processes.py": "calls: 400/400; total admitted: 400",
    "httpx_transport.py": "calls: 300/300; admitted: 300; 429s: 0",
}

# The install line of an example's docstring: ``pip install -e '.[anthropic]'``.
_INSTALL = re.compile(r"pip install -e '\.\[([a-z0-9_,-]+)\]'")


def documented_extras(name: str) -> tuple[str, ...]:
    """The extras the example's docstring says to install (none: the library alone)."""
    docstring = ast.get_docstring(ast.parse((EXAMPLES / name).read_text(encoding="utf-8")))
    found = _INSTALL.search(docstring or "")
    return tuple(found.group(1).split(",")) if found else ()


def _modules(requirements: list[str]) -> set[str]:
    """The modules `requirements` install on this platform (``redis>=5.0`` -> ``redis``):
    for the packages ratekit names, the distribution's own name."""
    wanted = [Requirement(text) for text in requirements]
    return {
        requirement.name.lower().replace("-", "_")
        for requirement in wanted
        if requirement.marker is None or requirement.marker.evaluate()
    }


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def extra_modules(extras: tuple[str, ...]) -> set[str]:
    """The modules the optional dependencies `extras` add, as pyproject.toml says."""
    optional = _project()["optional-dependencies"]
    unknown = [extra for extra in extras if extra not in optional]
    assert not unknown, f"no such extra in pyproject.toml: {unknown}"
    return _modules([requirement for extra in extras for requirement in optional[extra]])


def installed_by(extras: tuple[str, ...]) -> set[str]:
    """The modules ``pip install -e '.[extras]'`` provides, ratekit's own dependencies
    included."""
    return _modules(_project()["dependencies"]) | extra_modules(extras)


def third_party_imports(name: str) -> set[str]:
    """The top-level modules the example imports, besides the standard library and ratekit."""
    tree = ast.parse((EXAMPLES / name).read_text(encoding="utf-8"))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - {"__future__", "ratekit"}


def test_every_example_is_run_here() -> None:
    """A new example gets an expected line above, so that it is run too."""
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", [name for name in sorted(EXPECTED) if documented_extras(name)])
def test_the_install_an_example_documents_gives_what_it_imports(name: str) -> None:
    """The extras named in the example's docstring install every package it imports."""
    missing = third_party_imports(name) - installed_by(documented_extras(name))
    assert not missing, f"{name} imports {sorted(missing)}: not in {documented_extras(name)}"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.redis] if "redis" in name else [])
        for name in sorted(EXPECTED)
    ],
)
def test_an_example_runs_without_429s_and_exits_0(name: str) -> None:
    """The example exits 0 within its time, printing its summary and no failure (skipped
    where the install its docstring names is missing)."""
    if "redis" in name:
        require_redis_server()
    extras = documented_extras(name)
    for module in sorted(extra_modules(extras)):
        pytest.importorskip(module, reason=f"{name} needs pip install -e '.[{','.join(extras)}]'")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=EXAMPLES.parent,
        check=False,
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert EXPECTED[name] in done.stdout, report
    assert "ok: no 429" in done.stdout, report
