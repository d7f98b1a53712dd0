"""End to end through the real command line: synth -> train -> load -> serve -> POST /rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from feature_store.embedded import free_port
from model.data.log import read_log

DIN = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).resolve().parents[1]


def din(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DIN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=check
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "DIN_HOME": str(work / "home")}
    log_path = work / "log.parquet"
    din("synth", "--users", "200", "--items", "150", "--categories", "8", "--seed", "3", "--out", str(log_path), env=env)
    out = din(
        "train", "--data", f"events:{log_path}", "--model", "din", "--epochs", "1",
        "--out", str(work / "bundles"), "--json", env=env,
    )
    return work, env, log_path, out


def test_train_json_is_the_only_stdout(trained):
    _, _, _, out = trained
    payload = json.loads(out.stdout)  # exactly one JSON document, nothing else
    assert payload["model"] == "din"
    assert set(payload["metrics"]) >= {"auc", "gauc", "logloss"}
    assert 0.0 <= payload["metrics"]["auc"] <= 1.0
    assert (Path(payload["bundle"]) / "model.onnx").is_file()


def test_synth_load_serve_rank(trained, redis_url):
    work, env, log_path, out = trained
    bundle = json.loads(out.stdout)["bundle"]
    loaded = din("load", "--bundle", bundle, "--data", f"events:{log_path}", "--redis-url", redis_url, env=env)
    assert "loaded 200 users" in loaded.stdout

    port = free_port()
    server = subprocess.Popen(
        [*DIN, "serve", "--bundle", str(work / "bundles"), "--port", str(port), "--redis-url", redis_url],
        cwd=ROOT, env={**env, "STORE_TIMEOUT_MS": "5000", "STORE_READ_TIMEOUT_MS": "5000", "STORE_CONNECT_TIMEOUT_MS": "5000"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.2)

        log = read_log(log_path)
        user = int(log.user_id[0])
        n_events = int((log.user_id == user).sum())
        rng = np.random.default_rng(0)
        pick = rng.choice(len(log), size=30, replace=False)
        candidates = [{"item_id": int(log.item_id[i]), "cate_id": int(log.cate_id[i])} for i in pick]
        r = httpx.post(f"{base}/rank", json={"user_id": user, "candidates": candidates, "top_k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["degraded"] is False
        assert body["history_length"] == min(n_events, 50)
        ctrs = [c["ctr"] for c in body["ranked"]]
        assert len(ctrs) == 10
        assert ctrs == sorted(ctrs, reverse=True)
        assert all(0.0 < p < 1.0 for p in ctrs)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_inputs_give_clear_cli_errors(tmp_path):
    env = {**os.environ, "DIN_HOME": str(tmp_path / "home")}
    r = din("train", "--data", "nonsense:x", "--model", "din", env=env, check=False)
    assert r.returncode != 0 and "nonsense" in r.stderr
    r = din("train", "--model", "transformer", env=env, check=False)
    assert r.returncode != 0 and "transformer" in r.stderr and "din" in r.stderr
    r = din("serve", "--bundle", str(tmp_path / "missing"), env=env, check=False)
    assert r.returncode != 0 and "no model bundle" in r.stderr
