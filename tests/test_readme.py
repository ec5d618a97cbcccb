"""The README as a new user meets it: every Python block and every offline command runs
as written.

A block that calls a provider takes its host from ``MOONSHOT_BASE_URL`` (as the README
says) or its SDK's own variables (``OPENAI_BASE_URL``...): the test points them at the
strict local provider, served from a thread. Blocks
that continue another one (no imports of their own, top-level ``await``) are listed in
`FRAGMENTS` by their first line and only compiled. Shell commands that install, serve
forever, or call a real provider are listed in `NOT_RUN` with the reason.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal

import ratekit
from ratekit.testing import MockProvider

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
SHELL_BLOCKS = re.findall(r"```sh\n(.*?)```", README, re.S)

# Blocks that continue the one before them: compiled (top-level await allowed), not run.
FRAGMENTS = {
    "client = ratekit.wrap(openai.AsyncOpenAI(), scheduler)": "continues the scheduler block",
    "backend = ratekit.RedisBackend(": "continues the quick start with a Redis backend",
}
# Commands not run here, by their first word(s), and why.
NOT_RUN = {
    "pip install": "installs packages (.ci/run does, from a fresh clone)",
    "HATCH_BUILD_HOOK_ENABLE_MYPYC=true pip install": "the compiled build (.ci/compiled runs it)",
    "ratekit run": "calls a real provider at the URL it is given",
    "ratekit mock-provider": "serves until stopped (tests/test_mock_provider.py runs it)",
    "python -m pytest": "the test suite itself",
    "python -m bench": "a benchmark of minutes (run by hand, see bench/README.md)",
    "ratekit simulate": "runs in tests/test_cli.py and as CI's main job",
}


def _is_fragment(block: str) -> bool:
    return any(block.startswith(start) for start in FRAGMENTS)


@pytest.fixture(scope="module")
def provider() -> Iterator[MockProvider]:
    limits = ratekit.load_profile("moonshot").tier("tier1").limits()
    with start_blocking_portal() as loop:
        server = MockProvider(limits, completion_tokens=8)
        loop.call(server.start)
        try:
            yield server
        finally:
            loop.call(server.close)


def test_every_python_block_is_run_or_a_listed_fragment() -> None:
    assert len(PYTHON_BLOCKS) >= 5
    for block in PYTHON_BLOCKS:
        if _is_fragment(block):
            compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for start in FRAGMENTS:
        assert any(block.startswith(start) for block in PYTHON_BLOCKS), f"stale: {start}"


@pytest.mark.parametrize(
    "block",
    [block for block in PYTHON_BLOCKS if not _is_fragment(block)],
    ids=lambda block: block.splitlines()[0][:40],
)
def test_a_python_block_runs_as_written(block: str, provider: MockProvider, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block, encoding="utf-8")
    # Both SDKs take the host from the block's own base_url: the Messages API has no /v1.
    uses_anthropic = "anthropic" in block
    base_url = provider.anthropic_base_url if uses_anthropic else provider.base_url
    environment = {
        **os.environ,
        "MOONSHOT_BASE_URL": base_url,
        "MOONSHOT_API_KEY": "test",
        "MOONSHOT_API_KEY_B": "test",  # a second account's key (the pool's block)
        # A client built without arguments reads its SDK's own variables.
        "OPENAI_BASE_URL": provider.base_url,
        "OPENAI_API_KEY": "test",
        "ANTHROPIC_BASE_URL": provider.anthropic_base_url,
        "ANTHROPIC_API_KEY": "test",
    }
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _commands() -> list[str]:
    lines = []
    for block in SHELL_BLOCKS:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command:
                lines.append(command)
    return lines


def test_every_shell_command_is_run_or_listed() -> None:
    for command in _commands():
        for part in command.split("&&"):
            part = part.strip()
            runnable = part.startswith(("ratekit profiles", "ratekit plan"))
            assert runnable or any(part.startswith(start) for start in NOT_RUN), part


@pytest.mark.parametrize(
    "command",
    [c for c in _commands() if c.startswith(("ratekit profiles", "ratekit plan"))],
)
def test_an_offline_command_runs_as_written(command: str, tmp_path: Path) -> None:
    ratekit_bin = Path(sys.executable).with_name("ratekit")
    argv = shlex.split(command)
    argv[0] = str(ratekit_bin) if ratekit_bin.exists() else argv[0]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
