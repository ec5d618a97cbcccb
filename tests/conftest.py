"""Shared fixtures: async tests on asyncio and trio; backends to run one suite over."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from ratekit import Clock, FakeClock, MemoryBackend
from ratekit.backends import Backend

from .redis_server import RedisServer, require_redis_server


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


BackendFactory = Callable[[Clock | None], Backend]

BACKENDS = ["memory", "fakeredis", "redis"]


@pytest.fixture(params=BACKENDS)
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """Builds backends of one kind (each a fresh account); closes them afterwards.

    Modules using it run on asyncio only, as redis-py's client does; the memory
    backend's trio coverage is in the limiter's own tests.
    """
    kind = request.param
    made: list[Backend] = []

    def factory(clock: Clock | None = None) -> Backend:
        if kind == "memory":
            backend: Backend = MemoryBackend(clock=clock or FakeClock())
        else:
            from ratekit.backends.redis import RedisBackend

            if kind == "fakeredis":
                import fakeredis

                client = fakeredis.FakeAsyncRedis()
            else:
                from redis.asyncio import Redis

                client = Redis.from_url(request.getfixturevalue("redis_server").url)
            backend = RedisBackend(client, namespace=f"test-{uuid.uuid4().hex}", clock=clock)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()
