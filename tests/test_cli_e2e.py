"""End to end through the real command line: synth -> train -> load -> serve -> POST /rank."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from feature_store.embedded import free_port
from model.data.log import read_log, write_log

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


@contextlib.contextmanager
def serving(*args: str, env: dict) -> Iterator[str]:
    """`din serve ARGS --port P` running until ready; yields its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [*DIN, "serve", *args, "--port", str(port)],
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
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def rank_first_user(base: str, log_path: Path) -> tuple[dict, int]:
    """POST /rank for the log's first user with 30 of its items; (the answer, that user's behaviours)."""
    log = read_log(log_path)
    user = int(log.user_id[0])
    n_events = int((log.user_id == user).sum())
    rng = np.random.default_rng(0)
    pick = rng.choice(len(log), size=30, replace=False)
    candidates = [{"item_id": int(log.item_id[i]), "cate_id": int(log.cate_id[i])} for i in pick]
    r = httpx.post(f"{base}/rank", json={"user_id": user, "candidates": candidates, "top_k": 10})
    assert r.status_code == 200, r.text
    return r.json(), n_events


def test_synth_load_serve_rank(trained, redis_url):
    work, env, log_path, out = trained
    env = {**env, "REDIS_NAMESPACE": "e2e-ns"}  # exported once: `din load` and `din serve` both use it
    bundle = json.loads(out.stdout)["bundle"]
    loaded = din("load", "--bundle", bundle, "--data", f"events:{log_path}", "--redis-url", redis_url, env=env)
    assert "loaded 200 users" in loaded.stdout

    with serving("--bundle", str(work / "bundles"), "--redis-url", redis_url, env=env) as base:
        body, n_events = rank_first_user(base, log_path)
        assert body["degraded"] is False
        assert body["history_length"] == min(n_events, 50)  # read from the namespace `din load` wrote
        ctrs = [c["ctr"] for c in body["ranked"]]
        assert len(ctrs) == 10
        assert ctrs == sorted(ctrs, reverse=True)
        assert all(0.0 < p < 1.0 for p in ctrs)


def test_serve_redis_cluster_flag_reads_what_load_wrote_to_a_cluster(trained, redis_cluster, redis_cluster_url):
    """`--redis-cluster` on a plain redis:// URL of one node: `din load` and `din serve` alike (README)."""
    work, env, log_path, out = trained
    node = f"redis://127.0.0.1:{redis_cluster.ports[0]}"
    din("load", "--bundle", json.loads(out.stdout)["bundle"], "--data", f"events:{log_path}", "--redis-url", node,
        "--redis-cluster", env=env)  # fmt: skip
    with serving("--bundle", str(work / "bundles"), "--redis-url", node, "--redis-cluster", env=env) as base:
        body, n_events = rank_first_user(base, log_path)
    assert body["degraded"] is False and body["history_length"] == min(n_events, 50)


def test_a_busy_port_is_one_line_before_anything_starts(trained, redis_url, tmp_path):
    """It used to be reported after "Application startup complete" (uvicorn binds last), exit 3."""
    work, env, _, out = trained
    home = tmp_path / "home"  # `din demo` finds a bundle here: it would not train
    shutil.copytree(Path(json.loads(out.stdout)["bundle"]), home / "demo" / "bundles" / Path(json.loads(out.stdout)["bundle"]).name)
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        port = held.getsockname()[1]
        cases = [
            (["serve", "--bundle", str(work / "bundles"), "--redis-url", redis_url, "--port", str(port)], "--port / PORT"),
            (["demo", "--port", str(port)], "--port"),
        ]
        for args, flag in cases:
            r = din(*args, env={**env, "DIN_HOME": str(home)}, check=False)
            assert r.returncode == 2, (args, r.stderr[-2000:])
            assert r.stderr.strip() == f"error: port {port} on 127.0.0.1 is already in use; stop what holds it or pick another with {flag}"


def test_bad_inputs_give_clear_cli_errors(tmp_path):
    env = {**os.environ, "DIN_HOME": str(tmp_path / "home")}
    r = din("train", "--data", "nonsense:x", "--model", "din", env=env, check=False)
    assert r.returncode != 0 and "nonsense" in r.stderr
    r = din("train", "--model", "transformer", env=env, check=False)
    assert r.returncode != 0 and "transformer" in r.stderr and "din" in r.stderr
    r = din("serve", "--bundle", str(tmp_path / "missing"), env=env, check=False)
    assert r.returncode != 0 and "no model bundle" in r.stderr


def test_more_bad_inputs_are_one_line_errors_not_tracebacks(trained, tmp_path):
    """Each of these used to end in a Python traceback."""
    work, env, _, out = trained
    few = tmp_path / "two_users.csv"  # readable, but two users cannot fill train, validation and test
    few.write_text("user_id,item_id,cate_id,timestamp\n" + "".join(f"{u},{t % 7 + 1},{t % 3 + 1},{t}\n" for u in (1, 2) for t in range(20)))
    one_item = tmp_path / "one_item.csv"  # enough users, but every click is item 7: no negative can differ from it
    one_item.write_text("user_id,item_id,cate_id,timestamp\n" + "".join(f"{u},7,1,{t}\n" for u in range(40) for t in range(5)))
    one_item_parquet = write_log(read_log(one_item).sorted_by_user_time(), tmp_path / "one_item.parquet")  # sorted: streamable
    empty = tmp_path / "empty.csv"
    empty.write_text("user_id,item_id,cate_id,timestamp\n")
    clicks = "user_id,item_id,cate_id,timestamp,label\n" + "".join(f"{u},{t % 7 + 1},{t % 3 + 1},{t},{{}}\n" for u in range(40) for t in range(5))
    no_clicks, all_clicks = tmp_path / "no_clicks.csv", tmp_path / "all_clicks.csv"
    no_clicks.write_text(clicks.replace("{}", "0"))
    all_clicks.write_text(clicks.replace("{}", "1"))
    no_clicks_parquet = write_log(read_log(no_clicks).sorted_by_user_time(), tmp_path / "no_clicks.parquet")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(Path(json.loads(out.stdout)["bundle"]), corrupt)
    (corrupt / "model.onnx").write_bytes(b"\x08\x07garbage, not a graph")
    cases = [
        (["train", "--data", f"events:{few}", "--epochs", "1", "--out", str(tmp_path / "b")], "empty validation split; it needs more users"),
        (["experiment", "--data", f"events:{few}", "--epochs", "1", "--seeds", "1", "--models", "din", "--out", str(tmp_path / "x")],
         "empty validation split; it needs more users"),
        (["train", "--data", f"events:{one_item}", "--epochs", "1", "--out", str(tmp_path / "b")],
         "every training behaviour is item 7: no negative can differ"),
        (["train", "--stream", "--data", f"events:{one_item_parquet}", "--epochs", "1", "--out", str(tmp_path / "b")],
         "the training events hold 1 distinct item(s)"),
        (["train", "--data", f"events:{few}", "--id-dropout", "0.3", "--out", str(tmp_path / "b")],
         "--id-dropout 0.3 would be ignored: it is the drop probability of --reg dropout, not --reg none"),
        (["bench", "train", "--procs", "0", "--steps", "1", "--users", "50"], "--procs '0' must be comma-separated process counts of at least 1"),
        (["synth", "--out", "/dev/null/x.parquet", "--users", "5"], "cannot write --out '/dev/null/x.parquet'"),
        (["train", "--data", f"events:{empty}", "--epochs", "1", "--out", str(tmp_path / "b")], "is empty; nothing to train on"),
        (["experiment", "--data", f"events:{empty}", "--epochs", "1", "--seeds", "1", "--models", "lr", "--out", str(tmp_path / "x")],
         "is empty; nothing to train on"),
        (["train", "--data", f"events:{no_clicks}", "--epochs", "1", "--out", str(tmp_path / "b")], "has no clicks (label = 1)"),
        (["train", "--stream", "--data", f"events:{no_clicks_parquet}", "--epochs", "1", "--out", str(tmp_path / "b")],
         "has no clicks (label = 1)"),
        (["train", "--data", f"events:{all_clicks}", "--epochs", "1", "--out", str(tmp_path / "b")],
         "has only clicks (label = 1): no negative to learn from"),
        (["train", "--data", f"events:{few}", "--reg", "dropout", "--id-dropout", "0", "--out", str(tmp_path / "b")],
         "--id-dropout 0 drops nothing"),
        (["train", "--seed", "-1", "--out", str(tmp_path / "b")], "Invalid value for '--seed'"),
        (["serve", "--bundle", str(corrupt), "--port", str(free_port())], "cannot be loaded by ONNX Runtime"),
    ]  # fmt: skip
    for args, says in cases:
        r = din(*args, env=env, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert says in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path / "b").exists() and not (tmp_path / "x").exists()  # a refused run leaves no empty --out


def test_synth_takes_fewer_categories_than_a_users_interests(tmp_path):
    """--categories 2 (below the generator's 3-6 interests per user) makes a log, not an error about interests."""
    out = tmp_path / "few_cats.parquet"
    r = din("synth", "--users", "20", "--items", "10", "--categories", "2", "--out", str(out), env={**os.environ, "DIN_HOME": str(tmp_path)}, check=False)
    assert r.returncode == 0, r.stderr
    import pyarrow.parquet as pq

    assert set(pq.read_table(out).column("cate_id").to_pylist()) <= {0, 1, 2} and out.is_file()


def test_outputs_it_cannot_write_are_refused_before_the_work(trained, tmp_path):
    """`--out` naming a file: train and experiment used to run to the end, then die with a traceback;
    synth wrote Parquet into a .csv that `--data events:x.csv` then failed to parse."""
    _, env, log_path, _ = trained
    existing = tmp_path / "existing"
    existing.write_text("not a directory")
    a_bundle = tmp_path / "a_bundle"  # a bundle given as --out: the new one would land inside it, never served
    a_bundle.mkdir()
    (a_bundle / "bundle.json").write_text("{}")
    (tmp_path / "odd" / "latest").mkdir(parents=True)  # a real directory where din train keeps its link
    cases = [
        (["train", "--data", f"events:{log_path}", "--epochs", "1", "--out", str(existing)],
         f"error: --out '{existing}': '{existing}' is a file, not a directory; pass a directory"),
        (["experiment", "--data", f"events:{log_path}", "--epochs", "1", "--seeds", "1", "--models", "lr", "--out", str(existing / "x")],
         f"error: --out '{existing / 'x'}': '{existing}' is a file, not a directory; pass a directory"),
        (["synth", "--users", "5", "--out", str(tmp_path / "x.csv")],
         f"error: --out '{tmp_path / 'x.csv'}' must end in .parquet: din synth writes Parquet (read back as --data events:PATH)"),
        (["train", "--data", f"events:{log_path}", "--epochs", "1", "--out", "/proc/din-bundles"],
         "error: --out '/proc/din-bundles' cannot be written (No such file or directory); pass a writable directory"),
        (["experiment", "--data", f"events:{log_path}", "--epochs", "1", "--seeds", "1", "--models", "lr", "--out", "/proc/x"],
         "error: --out '/proc/x' cannot be written (No such file or directory); pass a writable directory"),
        (["train", "--data", f"events:{log_path}", "--stream", "--epochs", "1", "--out", str(tmp_path / "b"), "--run-dir", str(existing)],
         f"error: --run-dir '{existing}': '{existing}' is a file, not a directory; pass a directory"),
        (["train", "--data", f"events:{log_path}", "--epochs", "1", "--out", str(a_bundle)],
         f"error: --out '{a_bundle}' is a bundle (it holds bundle.json); pass the directory that holds the bundles, e.g. '{tmp_path}'"),
        (["train", "--data", f"events:{log_path}", "--epochs", "1", "--out", str(tmp_path / "odd")],
         f"error: --out '{tmp_path / 'odd'}': '{tmp_path / 'odd' / 'latest'}' is not the link din train keeps to the newest bundle; move it away"),
        (["prepare", str(log_path), str(tmp_path / "sorted.csv")],
         f"error: OUT '{tmp_path / 'sorted.csv'}' must end in .parquet: din prepare writes Parquet (read back as --data events:PATH)"),
        (["prepare", str(log_path), str(existing / "sorted.parquet")],
         f"error: OUT's directory '{existing}': '{existing}' is a file, not a directory; pass a directory"),
    ]  # fmt: skip
    for args, says in cases:
        r = din(*args, env=env, check=False)
        assert (r.returncode, r.stderr.strip()) == (2, says), (args, r.stderr[-2000:])
    assert existing.read_text() == "not a directory" and not (tmp_path / "x.csv").exists()
    assert sorted(p.name for p in a_bundle.iterdir()) == ["bundle.json"] and not (tmp_path / "sorted.csv").exists()


def test_the_one_line_summary_says_n_a_for_an_undefined_metric():
    """A streamed run's metrics come back through JSON, NaN as null; the summary crashed on it after the bundle was written."""
    from service.cli import _metric

    assert [_metric(v) for v in (None, float("nan"), 0.51234)] == ["n/a", "n/a", "0.5123"]
