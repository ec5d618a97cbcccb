"""The Lua scripts of the Redis backend: loaded here, and only here.

Each atomic operation is one file under ``lua/``; the shared window helpers in
``lua/_window.lua`` come first, then the step's quick way (``lua/_quick.lua``). They
reach the server in one of two forms:

- one function library (`LIBRARY`, Redis 7+ and Valkey): every operation a function
  of it, run by FCALL; the helpers are built once when the library is loaded, not on
  every call. The library's name, and its functions', carry a hash of its text, so
  pods of different versions each load and call their own and never replace one
  another's. Sent (FUNCTION LOAD REPLACE) when the server answers that the function
  is not there: after a restart, a flush, or on first use.
- one script per operation (`Script`): the helpers then the operation, run by
  EVALSHA, where functions are not to be had (a server before 7.0, or one that
  refuses them). Sent (SCRIPT LOAD) when the server answers NOSCRIPT.

A command is made as an EVALSHA (`Script.evalsha`); `Script.fcall` turns it into the
function's FCALL, with the same keys and arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

_PACKAGE = "ratekit.backends"
# The operations, each a file lua/<name>.lua.
_NAMES = ("reserve", "settle", "renew", "stats", "pause", "sent", "estimates", "step")
# What step.lua runs: the settle and reserve operations' bodies, as functions.
_STEP_PARTS = ("settle", "reserve")


def _read(name: str) -> str:
    return (resources.files(_PACKAGE) / "lua" / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Library:
    """The function library: its name (versioned by a hash of its text) and text."""

    name: str
    text: str

    def load(self) -> tuple[str, ...]:
        """The FUNCTION LOAD command that sends it. REPLACE: a library of this name is
        this very text, so loading it again (two pods after one flush) changes nothing
        instead of failing."""
        return ("FUNCTION LOAD", "REPLACE", self.text)


@dataclass(frozen=True)
class Script:
    """One operation: its text and SHA1 as a script, and its function's name in
    `LIBRARY`."""

    name: str
    text: str
    sha: str
    function: str

    def evalsha(self, keys: Sequence[str], args: Sequence[str]) -> tuple[str, ...]:
        """The EVALSHA command that runs this script on `keys` with `args`."""
        return ("EVALSHA", self.sha, str(len(keys)), *keys, *args)

    def fcall(self, evalsha: tuple[str, ...]) -> tuple[str, ...]:
        """The FCALL of this operation's function with the keys and arguments of its
        command `evalsha` (made by `evalsha`)."""
        return ("FCALL", self.function, *evalsha[2:])

    def load(self) -> tuple[str, ...]:
        """The SCRIPT LOAD command that sends it (after the server answered NOSCRIPT)."""
        return ("SCRIPT LOAD", self.text)


def _build() -> tuple[Library, dict[str, Script]]:
    helpers = _read("_window.lua") + _read("_quick.lua")
    bodies = {name: _read(f"{name}.lua") for name in _NAMES}

    # Each operation's file, its text unchanged, as the body of a function of (KEYS,
    # ARGV) (called by another operation: step.lua), and the function each runs as
    # (begin, then the body).
    def body(name: str) -> str:
        return f"\nlocal function {name}_body(KEYS, ARGV)\n{bodies[name]}\nend\n"

    functions = "".join(
        f"{body(name)}local function {name}(KEYS, ARGV)\nbegin(KEYS)\n"
        f"return {name}_body(KEYS, ARGV)\nend\n"
        for name in _NAMES
    )
    version = hashlib.sha1((helpers + functions).encode("utf-8")).hexdigest()[:16]
    prefix = f"ratekit_{version}"
    registered = "".join(f"redis.register_function('{prefix}_{name}', {name})\n" for name in _NAMES)
    library = Library(prefix, f"#!lua name={prefix}\n{helpers}{functions}\n{registered}")
    scripts = {}
    for name, text_of in bodies.items():
        parts = "".join(body(part) for part in _STEP_PARTS) if name == "step" else ""
        text = f"{helpers}{parts}\nbegin(KEYS)\n{text_of}"
        sha = hashlib.sha1(text.encode("utf-8")).hexdigest()
        scripts[name] = Script(name, text, sha, f"{prefix}_{name}")
    return library, scripts


LIBRARY, _SCRIPTS = _build()
RESERVE = _SCRIPTS["reserve"]
SETTLE = _SCRIPTS["settle"]
RENEW = _SCRIPTS["renew"]
STATS = _SCRIPTS["stats"]
PAUSE = _SCRIPTS["pause"]
SENT = _SCRIPTS["sent"]
ESTIMATES = _SCRIPTS["estimates"]
STEP = _SCRIPTS["step"]
# Every operation's script, for loading them all at once.
SCRIPTS = tuple(_SCRIPTS.values())
