"""The scale-out commands through the real command line: din prepare, din train --nproc, din bench train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.bundle import load_bundle
from model.data.log import BehaviourLog, read_log, write_log
from model.data.synthetic import SyntheticConfig, generate, write_synthetic
from model.hashing import HashedIds

DIN = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).resolve().parents[1]


def din(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*DIN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=check)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    env = {**os.environ, "DIN_HOME": str(work / "home")}
    log = generate(SyntheticConfig(users=250, items=90, categories=8, events_per_user=(4, 12), seed=8))
    perm = np.random.default_rng(0).permutation(len(log))
    shuffled = BehaviourLog(log.user_id[perm], log.item_id[perm], log.cate_id[perm], log.timestamp[perm])
    return work, env, write_log(shuffled, work / "shuffled.csv"), log


def test_prepare_then_train_on_two_processes_with_hashed_ids(work):
    root, env, shuffled, log = work
    bad = din("train", "--data", f"events:{shuffled}", "--stream", env=env, check=False)
    assert bad.returncode == 2 and "cannot be read as Parquet" in bad.stderr and "din prepare" in bad.stderr
    unsorted = write_log(read_log(shuffled), root / "unsorted.parquet")
    bad = din("train", "--data", f"events:{unsorted}", "--stream", "--run-dir", str(root / "r0"), env=env, check=False)
    assert bad.returncode == 2 and "not sorted by (user_id, timestamp)" in bad.stderr and "din prepare" in bad.stderr
    # the plan's progress bar is closed first: the error starts a line, not the bar's
    assert any(line.startswith("error: ") and "not sorted by" in line for line in bad.stderr.splitlines()), bad.stderr[-2000:]
    # the same refusal under torchrun: rank 0 says it in one line (no traceback), and it is the last line
    # (torchrun's own report, and the traceback of the rank it stopped, come before it)
    bad = din("train", "--data", f"events:{unsorted}", "--nproc", "2", "--run-dir", str(root / "r1"), env=env, check=False)
    assert bad.returncode == 2 and "[rank0]: Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not sorted by (user_id, timestamp)" in last, bad.stderr[-3000:]

    prepared = din("prepare", str(shuffled), str(root / "sorted.parquet"), "--json", env=env)
    report = json.loads(prepared.stdout)
    assert report["rows"] == len(log) and report["users"] == 250
    np.testing.assert_array_equal(read_log(root / "sorted.parquet").user_id, np.sort(log.user_id))

    out = din(
        "train", "--data", f"events:{root / 'sorted.parquet'}", "--nproc", "2", "--epochs", "1", "--hash-buckets", "101",
        "--run-dir", str(root / "run"), "--out", str(root / "bundles"), "--json", env=env,
    )  # fmt: skip
    payload = json.loads(out.stdout)  # one JSON document on stdout, the processes' output went to stderr
    assert payload["world"] == 2 and payload["model"] == "din"
    assert (root / "bundles" / "latest").resolve() == Path(payload["bundle"]).resolve()
    bundle = load_bundle(payload["bundle"])
    assert bundle.vocabularies["item_id"] == HashedIds(101)
    assert json.loads((root / "run" / "report.json").read_text())["metrics"] == payload["metrics"]


def test_bench_train_json(work):
    root, env, _, _ = work
    # one process count keeps this fast; the bench runs each count the same way
    out = din("bench", "train", "--users", "300", "--steps", "3", "--batch-size", "64", "--procs", "2",
              "--work-dir", str(root / "bench"), "--json", env=env)  # fmt: skip
    (run,) = json.loads(out.stdout)["runs"]
    assert run["nproc"] == 2 and run["backend"] == "gloo" and run["speedup"] == 1.0
    assert run["train_samples"] == 3 * 64 and run["samples_per_second"] > 0
    assert len(run["peak_rss_mb_per_process"]) == 2 and run["peak_rss_mb"] == max(run["peak_rss_mb_per_process"]) > 50


def test_streamed_train_takes_every_training_option(work):
    root, env, _, _ = work
    data = write_synthetic(SyntheticConfig(users=150, items=60, categories=6, events_per_user=(4, 10), seed=9), root / "reg.parquet")
    out = din(
        "train", "--data", f"events:{data}", "--stream", "--model", "din_dice", "--epochs", "1", "--seed", "3",
        "--reg", "mba", "--reg-lambda", "0.2", "--attention-softmax", "--run-dir", str(root / "reg-run"),
        "--out", str(root / "reg-bundles"), "--json", env=env,
    )  # fmt: skip
    payload = json.loads(out.stdout)
    config = json.loads((root / "reg-run" / "report.json").read_text())["config"]
    assert (config["model"], config["seed"], config["epochs"]) == ("din_dice", 3, 1)
    assert (config["reg"], config["reg_lambda"], config["attention_softmax"]) == ("mba", 0.2, True)
    manifest = load_bundle(payload["bundle"]).manifest
    assert manifest["train_config"]["reg"] == "mba" and manifest["train_config"]["reg_lambda"] == 0.2
    assert manifest["model_config"]["attention_softmax"] is True and manifest["model_config"]["activation"] == "dice"

    # what the streamed trainer cannot do is an error that says why, not an option quietly ignored
    bad = din("train", "--data", f"events:{data}", "--stream", "--reg", "mba", env=env, check=False)
    assert bad.returncode == 2 and "--reg mba needs --reg-lambda > 0" in bad.stderr
    bad = din("train", "--data", "movielens:/nowhere/ml-1m", "--nproc", "2", env=env, check=False)
    assert bad.returncode == 2 and "streamed training reads a Parquet log" in bad.stderr and "Traceback" not in bad.stderr
