"""The Lua scripts of the Redis backend: loaded here, and only here.

Each atomic operation is one file under ``lua/``; the shared window helpers in
``lua/_window.lua`` are prepended to each. A script runs by EVALSHA and is sent
(SCRIPT LOAD) only when the server answers NOSCRIPT, after a restart or a flush.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

_PACKAGE = "ratekit.backends"


def _read(name: str) -> str:
    return (resources.files(_PACKAGE) / "lua" / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Script:
    """One Lua script: its full text and SHA1, run with `run` (one round trip)."""

    name: str
    text: str
    sha: str

    async def run(self, client: Redis, keys: Sequence[str], args: Sequence[str | float]) -> Any:
        """EVALSHA; on NOSCRIPT, load the script and run it again."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.text)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


def _load(name: str) -> Script:
    text = _read("_window.lua") + "\n" + _read(f"{name}.lua")
    return Script(name, text, hashlib.sha1(text.encode("utf-8")).hexdigest())


RESERVE = _load("reserve")
SETTLE = _load("settle")
RENEW = _load("renew")
STATS = _load("stats")
PAUSE = _load("pause")
