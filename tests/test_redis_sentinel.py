"""A Sentinel-managed primary that fails over: the policy holds while no primary answers,
and the account comes back on the promoted replica.

The tests start a primary, its replica and one Sentinel (quorum 1) on loopback with
Debian's redis-server, then kill the primary. ratekit is given the client Sentinel
hands out for the primary (``Sentinel.master_for``): a `redis.asyncio.Redis` whose
connections ask Sentinel where the primary is.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from redis.asyncio.sentinel import Sentinel

from ratekit import Limiter, Limits
from ratekit.backends.redis import RedisBackend

from .redis_server import RedisServer, free_port, require_redis_server

pytestmark = pytest.mark.anyio

SERVICE = "ratekit-primary"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client


class SentinelSetup:
    """A primary, its replica and one Sentinel watching them."""

    def __init__(self, binary: str) -> None:
        self.primary = RedisServer(binary)
        self.replica = RedisServer(
            binary, extra=("--replicaof", "127.0.0.1", str(self.primary.port))
        )
        self.sentinel_port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="ratekit-sentinel-"))
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 500\n"
            f"sentinel failover-timeout {SERVICE} 5000\n",
            encoding="utf-8",
        )
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = subprocess.run(
                ["redis-cli", "-p", str(self.sentinel_port), "sentinel", "replicas", SERVICE],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            replication = subprocess.run(
                ["redis-cli", "-p", str(self.replica.port), "info", "replication"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            if str(self.replica.port) in info and "master_link_status:up" in replication:
                return
            time.sleep(0.1)
        raise RuntimeError("the replica was not in sync and seen by Sentinel within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    setup = SentinelSetup(require_redis_server())
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.mark.timeout(60)
async def test_a_failover_is_waited_out_and_nothing_is_lost(
    sentinel_setup: SentinelSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """Failing closed (the default), callers that come while no primary answers wait for
    one (no error, no raw redis error, no hang, no admission without a primary); once
    Sentinel has promoted the replica they are all admitted there, and what the account
    used before is still counted (it was replicated). The outage is logged under the
    Sentinel service's name (not an address the client never used)."""
    sentinel = Sentinel([("127.0.0.1", sentinel_setup.sentinel_port)], socket_timeout=1.0)
    client = sentinel.master_for(SERVICE, socket_timeout=1.0)
    backend = RedisBackend(client, namespace=f"failover-{uuid.uuid4().hex[:8]}")
    limits = Limits(concurrency=4, rpm=1000)
    limiter = Limiter(limits, backend=backend)
    admitted_after_s: list[float] = []
    try:
        for _ in range(10):
            async with limiter.acquire():
                pass
        # The replica has what the primary had.
        acknowledged = await client.execute_command("WAIT", 1, 500)  # type: ignore[no-untyped-call]
        assert acknowledged == 1
        sentinel_setup.primary.stop()
        started = time.monotonic()

        async def call() -> None:
            async with limiter.acquire():
                admitted_after_s.append(time.monotonic() - started)

        with anyio.fail_after(40):
            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(call)
        used = (await limiter.statistics()).dimension("rpm").used
    finally:
        await backend.aclose()
        await client.aclose()
    print(
        f"\nfailover: 20 callers waited it out, admitted {min(admitted_after_s):.1f} to "
        f"{max(admitted_after_s):.1f} s after the primary died; rpm used {used:g}"
    )
    assert len(admitted_after_s) == 20
    # Sentinel needs half a second to call the primary down: nobody got in before.
    assert min(admitted_after_s) >= 0.5
    assert used >= 30  # the ten before the failover, and the twenty after
    outages = [r.getMessage() for r in caplog.records if " is unreachable" in r.getMessage()]
    assert outages
    where = f"sentinel service '{SERVICE}' (127.0.0.1:{sentinel_setup.sentinel_port})"
    assert all(f"Redis at {where} is unreachable" in message for message in outages), outages
