"""The public surface as a user's code sees it: types, star imports, missing extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import typing
import warnings
from pathlib import Path

import pytest

import ratekit

USER_CODE = """
import anthropic
import openai

import ratekit

backend = ratekit.RedisBackend("redis://localhost:6379/0", namespace="pods")
scheduler = ratekit.Scheduler(ratekit.Account("moonshot"), backend=backend)
client = ratekit.wrap(openai.AsyncOpenAI(), scheduler)
claude = ratekit.wrap(anthropic.AsyncAnthropic(), scheduler, count_tokens=True)


async def main() -> str | None:
    answer = await client.chat.completions.create(
        model="kimi-k2", messages=[{"role": "user", "content": "hi"}]
    )
    message = await claude.messages.create(
        model="kimi-k2", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.input_tokens >= 0
    return answer.choices[0].message.content


def threads() -> None:
    with ratekit.SyncScheduler(ratekit.Account("minimax")) as sync:
        chat = ratekit.wrap(openai.OpenAI(), sync)
        chat.chat.completions.create(model="MiniMax-M2", messages=[])
"""


def test_user_code_type_checks_strictly(tmp_path: Path) -> None:
    """mypy --strict over code that uses the README's API: the Redis backend (imported on
    first use) is typed, and a wrapped client keeps its SDK's types."""
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent(USER_CODE), encoding="utf-8")
    done = subprocess.run(
        # Incremental, on the project's cache: the SDKs' modules that `mypy` over the
        # package (run before the tests in CI) analysed already are not analysed again.
        [sys.executable, "-m", "mypy", "--strict", str(user)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_star_import_needs_no_extra() -> None:
    """``from ratekit import *`` imports no optional package."""
    code = (
        "import sys\n"
        "sys.modules['redis'] = None\n"
        "sys.modules['httpx'] = None\n"
        "from ratekit import *\n"
        "print(Scheduler.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Scheduler"


@pytest.mark.parametrize(
    ("name", "package", "extra"),
    [("RedisBackend", "redis", "redis"), ("RateLimitedTransport", "httpx", "httpx")],
)
def test_a_missing_extra_is_named(name: str, package: str, extra: str) -> None:
    """Without its package, an optional part raises MissingExtraError (an ImportError)
    naming the extra to install, not a bare ModuleNotFoundError."""
    code = (
        "import sys\n"
        f"sys.modules[{package!r}] = None\n"
        "import ratekit\n"
        "try:\n"
        f"    ratekit.{name}\n"
        "except ratekit.MissingExtraError as error:\n"
        "    assert isinstance(error, ImportError)\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"ratekit.{name} needs the {package!r} package, which is not installed: "
        f"pip install 'ratekit[{extra}]'"
    )
    assert ratekit.MissingExtraError.__name__ in ratekit.__all__


def _public_homes() -> dict[str, list[str]]:
    """Each public name and the public modules that export it."""
    homes: dict[str, list[str]] = {}
    for module in (ratekit, *(getattr(ratekit, name) for name in _SUBMODULES)):
        for name in module.__all__:
            homes.setdefault(name, []).append(module.__name__)
    return homes


_SUBMODULES = (
    "backends",
    "clock",
    "errors",
    "events",
    "pools",
    "providers",
    "statistics",
    "tokens",
)


def test_the_top_level_holds_what_applications_call() -> None:
    """A short ``__all__`` at the top, every name in it importable, and no backend
    internals or statistics records among them."""
    assert len(ratekit.__all__) <= 32
    for name in ratekit.__all__:
        assert getattr(ratekit, name) is not None
    assert not {"Demand", "Instant", "Backend", "DimensionStatistics"} & set(ratekit.__all__)


def test_every_error_and_event_has_a_public_home() -> None:
    """What ratekit raises or emits can be named from a public module: every error class
    in ``ratekit.errors`` and every event in ``ratekit.events``."""
    import ratekit._errors
    import ratekit._tokens

    raised = {
        value.__name__
        for module in (ratekit._errors, ratekit._tokens)
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, ratekit.RatekitError)
    }
    assert raised <= set(ratekit.errors.__all__)
    emitted = {event.__name__ for event in typing.get_args(ratekit.events.Event)}
    assert len(emitted) == 8
    assert emitted <= set(ratekit.events.__all__)


def test_a_name_means_one_thing_wherever_it_is_exported() -> None:
    """A name exported by several public modules is the same object in each."""
    for name, modules in _public_homes().items():
        objects = {id(getattr(sys.modules[module], name)) for module in modules}
        assert len(objects) == 1, (name, modules)


def test_compiled_modules_shadowing_a_checkout_are_warned_of(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A compiled build leaves its modules beside the sources of the checkout it was
    built in, where they would be imported instead: ratekit says so at import. An
    installed compiled build (no project file beside the package) is not warned of."""
    import ratekit._limiter

    package = tmp_path / "ratekit"
    package.mkdir()
    compiled = package / "_limiter.cpython-311-x86_64-linux-gnu.so"
    monkeypatch.setattr(ratekit._limiter, "__file__", str(compiled))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratekit._warn_if_shadowed()  # installed: no pyproject.toml beside the package
    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="compiled modules in the source checkout"):
        ratekit._warn_if_shadowed()
    monkeypatch.setattr(ratekit._limiter, "__file__", str(package / "_limiter.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratekit._warn_if_shadowed()  # the sources themselves
