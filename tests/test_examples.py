"""Every script in examples/ runs to its end against the local provider and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .redis_server import require_redis_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A line each example must print (besides "ok: no 429"), showing it did its whole job.
EXPECTED = {
    "openai_client.py": "calls: 300/300 (150 plain, 150 streamed)",
    "decorator.py": "calls: 280/280; provider 429s: 0",
    "sync_threads.py": "calls: 300/300 from 64 threads",
    "redis_processes.py": "calls: 400/400; total admitted: 400",
    "httpx_transport.py": "calls: 300/300; admitted: 300; 429s: 0",
}


def test_every_example_is_run_here() -> None:
    """A new example gets an expected line above, so that it is run too."""
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.redis] if "redis" in name else [])
        for name in sorted(EXPECTED)
    ],
)
def test_an_example_runs_without_429s_and_exits_0(name: str) -> None:
    """The example exits 0 within its time, printing its summary and no failure."""
    if "redis" in name:
        require_redis_server()
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
