"""Test doubles and real servers for code that uses ratekit, shared by ratekit's own
tests, benchmarks, examples and command line.

- `FakeClock`: time that moves only when told (limiter logic tested exactly).
- `MockProvider`: the strict local provider, OpenAI's API and Anthropic's Messages API
  over HTTP, enforcing a tier exactly (``ratekit mock-provider`` serves it).
- `RedisServer`, `RedisCluster`: a real redis-server (or valkey-server) on a free
  loopback port, and a three-master cluster; `free_port`, `redis_server_binary`,
  `valkey_server_binary`.
- `Workload`, `Driver`, `Fleet`, `Outcome`: the one workload driver
  (`ratekit.testing.workload`): calls from many tasks through ratekit, in this
  process or in N processes sharing an account through Redis, and what they came to.
- `simulation`: the strict provider in-process and ``python -m ratekit``'s offline run.
"""

from typing import TYPE_CHECKING

from .._clock import FakeClock
from ._redis import (
    NO_FUNCTIONS,
    SERVER_HINT,
    RedisCluster,
    RedisServer,
    free_port,
    redis_server_binary,
    valkey_server_binary,
)

__all__ = [
    "NO_FUNCTIONS",
    "SERVER_HINT",
    "Driver",
    "FakeClock",
    "Fleet",
    "MockProvider",
    "MockProviderStatistics",
    "Outcome",
    "RedisCluster",
    "RedisServer",
    "Workload",
    "free_port",
    "redis_server_binary",
    "valkey_server_binary",
]


if TYPE_CHECKING:
    from .mock_provider import MockProvider as MockProvider
    from .mock_provider import MockProviderStatistics as MockProviderStatistics
    from .workload import Driver as Driver
    from .workload import Fleet as Fleet
    from .workload import Outcome as Outcome
    from .workload import Workload as Workload


def __getattr__(name: str) -> object:
    # Imported on first use, so that ``python -m ratekit.testing.mock_provider`` (and
    # ``.workload``, a fleet member) runs a module this package has not imported already.
    if name in ("MockProvider", "MockProviderStatistics"):
        from . import mock_provider

        return getattr(mock_provider, name)
    if name in ("Driver", "Fleet", "Outcome", "Workload"):
        from . import workload

        return getattr(workload, name)
    raise AttributeError(f"module 'ratekit.testing' has no attribute {name!r}")
