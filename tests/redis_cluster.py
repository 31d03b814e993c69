"""A real 3-master Redis Cluster for tests: free 127.0.0.1 ports, one temporary directory, no persistence.

Each master is a :class:`tests.redis_server.RedisServer` started with ``--cluster-enabled yes``; its
``nodes.conf`` stays in its directory, so ``masters[i].stop()`` then ``restart(i)`` plays a crash and a
restart: it rejoins with its slots, empty. ``cluster-require-full-coverage no`` keeps the other masters
serving their slots while one is down (the setting the docs ask of a cache cluster without replicas).
The ``redis_cluster`` fixture skips when ``redis-server`` or ``redis-cli`` is missing.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.redis_server import REDIS_SERVER, RedisServer

if TYPE_CHECKING:
    import redis

REDIS_CLI = shutil.which("redis-cli")
CLUSTER_OPTIONS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                   "2000", "--cluster-require-full-coverage", "no")


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, which must stay below 65536) is free too."""
    while True:
        port = random.randrange(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


def cluster_tools_missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if not shutil.which(REDIS_SERVER):
        return "redis-server is not installed"
    if REDIS_CLI is None:
        return "redis-cli is not installed (it creates the cluster)"
    return None


class RedisCluster:
    """Three masters, no replicas; ``masters[i]`` is a :class:`RedisServer` to stop, start or pause."""

    def __init__(self, size: int = 3) -> None:
        self.masters = [RedisServer() for _ in range(size)]
        for master in self.masters:
            master.port = _free_cluster_port()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in self.masters) + "/"

    def start(self) -> None:
        for master in self.masters:
            master.start(*CLUSTER_OPTIONS)
        self.cli("--cluster", "create", *(f"127.0.0.1:{m.port}" for m in self.masters), "--cluster-replicas", "0",
                 "--cluster-yes")
        self.wait_ok()

    def restart(self, index: int) -> None:
        """Start master ``index`` again after a ``stop()``: empty, with its slots (from its nodes.conf)."""
        self.masters[index].start(*CLUSTER_OPTIONS)
        self.wait_ok()

    def cli(self, *args: str) -> str:
        done = subprocess.run([REDIS_CLI, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def client(self, index: int) -> redis.Redis:
        import redis  # here, not at import: conftest loads this module where redis-py is not installed (GPU runs)

        return redis.Redis(port=self.masters[index].port)

    def wait_ok(self, seconds: float = 20) -> None:
        """Until every running master says ``cluster_state:ok`` (slots assigned and agreed on)."""
        deadline = time.monotonic() + seconds
        for i, master in enumerate(self.masters):
            while self.client(i).cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not reach cluster_state:ok on port {master.port}")
                time.sleep(0.1)

    def index_of_port(self, port: int) -> int:
        return [m.port for m in self.masters].index(port)

    def reshard(self, source: int, target: int, slots: int) -> None:
        """Move ``slots`` slots, with their keys, from master ``source`` to master ``target`` (MIGRATE)."""
        ids = [self.client(i).execute_command("CLUSTER MYID").decode() for i in (source, target)]
        self.cli("--cluster", "reshard", f"127.0.0.1:{self.masters[source].port}", "--cluster-from", ids[0],
                 "--cluster-to", ids[1], "--cluster-slots", str(slots), "--cluster-yes")
        self.wait_ok()

    def close(self) -> None:
        for master in self.masters:
            master.close()

    def __enter__(self) -> RedisCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def redis_cluster() -> Iterator[RedisCluster]:
    missing = cluster_tools_missing()
    if missing:
        pytest.skip(missing)
    with RedisCluster() as cluster:
        yield cluster
