"""`din` reads `./.env` as the service's settings do (README, Settings): the real command, in a
working directory holding a .env, against the test's own redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from model.data.log import BehaviourLog, write_log

ROOT = Path(__file__).resolve().parents[1]
# what a developer's shell might export: each test says what the command gets
UNSET = ("REDIS_URL", "REDIS_NAMESPACE", "REDIS_CLUSTER", "DIN_HOME")


def din(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in UNSET}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_dotenv_sets_redis_url_and_namespace_and_the_environment_wins(redis_url, redis_client, tmp_path):
    log = write_log(BehaviourLog(user_id=np.array([1, 2]), item_id=np.array([10, 20]), cate_id=np.array([1, 2]),
                                 timestamp=np.array([5, 6])), tmp_path / "log.parquet")  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text(f"# the service's settings\nREDIS_URL={redis_url}\nREDIS_NAMESPACE=fromdotenv\n")

    loaded = din("load", "--data", f"events:{log}", "--json", cwd=work)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert redis_client.get("fromdotenv:current").decode() == json.loads(loaded.stdout)["version"]
    assert not (work / ".din").exists()  # no embedded Redis was started: REDIS_URL came from .env

    stats = din("store", "stats", "--json", cwd=work)
    assert stats.returncode == 0, stats.stderr[-2000:]
    assert (json.loads(stats.stdout)["namespace"], json.loads(stats.stdout)["users"]) == ("fromdotenv", 2)
    exported = din("store", "stats", "--json", cwd=work, REDIS_NAMESPACE="exported")  # set: .env does not override it
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (json.loads(exported.stdout)["namespace"], json.loads(exported.stdout)["users"]) == ("exported", 0)


def test_dotenv_din_home_is_where_the_embedded_redis_lives(tmp_path):
    """DIN_HOME was read from the environment when the module was imported, before any .env."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text("DIN_HOME=home-from-dotenv\n")
    stats = din("store", "stats", "--json", cwd=work)
    assert stats.returncode == 0, stats.stderr[-2000:]
    assert json.loads(stats.stdout)["users"] == 0
    assert (work / "home-from-dotenv" / "redis").is_dir() and not (work / ".din").exists()


def test_an_empty_redis_namespace_is_refused_as_the_service_refuses_it(tmp_path):
    """click reads REDIS_NAMESPACE= as unset; the command must not quietly use 'din' instead."""
    for env_file in (False, True):
        env = {}
        if env_file:
            (tmp_path / ".env").write_text("REDIS_NAMESPACE=\n")
        else:
            env["REDIS_NAMESPACE"] = ""
        stats = din("store", "stats", "--redis-url", "redis://127.0.0.1:1/0", cwd=tmp_path, **env)
        assert stats.returncode != 0
        assert "REDIS_NAMESPACE is set but empty" in stats.stderr + stats.stdout
        assert "Traceback" not in stats.stderr
    explicit = din("store", "stats", "--namespace", "din", "--redis-url", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert "REDIS_NAMESPACE" not in explicit.stderr + explicit.stdout  # only the unreachable Redis is reported


def test_a_command_beside_a_running_built_in_redis_is_told_its_url(tmp_path):
    """Two built-in Redis servers on one data directory overwrote each other's saves; the second
    command is refused in one line that names the running server's URL."""
    from feature_store.embedded import EmbeddedRedis

    (tmp_path / ".env").write_text("DIN_HOME=home\n")
    with EmbeddedRedis(tmp_path / "home" / "redis") as running:
        stats = din("store", "stats", cwd=tmp_path)
    assert stats.returncode == 2 and "Traceback" not in stats.stderr, stats.stderr[-2000:]
    assert stats.stderr.startswith("error: ") and running.url in stats.stderr
