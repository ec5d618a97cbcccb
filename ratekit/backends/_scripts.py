"""The Lua scripts of the Redis backend: loaded here, and only here.

Each atomic operation is one file under ``lua/``; the shared window helpers in
``lua/_window.lua`` are prepended to each. A script runs by EVALSHA (one command
per operation, possibly pipelined with others') and is sent (SCRIPT LOAD) only
when the server answers NOSCRIPT, after a restart or a flush.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

_PACKAGE = "ratekit.backends"


def _read(name: str) -> str:
    return (resources.files(_PACKAGE) / "lua" / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Script:
    """One Lua script: its full text and SHA1."""

    name: str
    text: str
    sha: str

    def evalsha(self, keys: Sequence[str], args: Sequence[str]) -> tuple[str, ...]:
        """The EVALSHA command that runs this script on `keys` with `args`."""
        return ("EVALSHA", self.sha, str(len(keys)), *keys, *args)

    def load(self) -> tuple[str, ...]:
        """The SCRIPT LOAD command that sends it (after the server answered NOSCRIPT)."""
        return ("SCRIPT", "LOAD", self.text)


def _load(name: str) -> Script:
    text = _read("_window.lua") + "\n" + _read(f"{name}.lua")
    return Script(name, text, hashlib.sha1(text.encode("utf-8")).hexdigest())


RESERVE = _load("reserve")
SETTLE = _load("settle")
RENEW = _load("renew")
STATS = _load("stats")
PAUSE = _load("pause")
SENT = _load("sent")
ESTIMATES = _load("estimates")
