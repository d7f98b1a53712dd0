"""`din experiment` on a tiny log: results.json keys and numbers, the report prints those numbers, figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.data.synthetic import SyntheticConfig, write_synthetic
from model.experiment import ExperimentConfig, run_experiment, summary
from model.metrics import rela_impr
from model.report import comparison_table

TINY = SyntheticConfig(users=150, items=60, categories=6, events_per_user=(12, 20), seed=2)
ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_synthetic(TINY, tmp_path_factory.mktemp("exp") / "tiny.parquet")


@pytest.fixture(scope="module")
def run(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    config = ExperimentConfig(
        data=f"events:{tiny_path}", models=("base", "din", "lr"), seeds=2, epochs=2, out=out, batch_size=128,
        embedding_dim=4, max_history=10, progress=False, command="din experiment (test)",
    )
    return config, run_experiment(config)


def test_results_json_has_the_issue_keys(run):
    config, result = run
    saved = json.loads((config.out / "results.json").read_text())
    assert set(saved["models"]) == {"base", "din", "lr"}
    for name, m in saved["models"].items():
        for metric in ("auc", "gauc", "logloss", "relaimpr"):
            assert set(m[metric]) == {"mean", "std", "per_seed"}
            assert len(m[metric]["per_seed"]) == 2
        assert m["num_params"] > 0 and len(m["train_seconds"]["per_seed"]) == 2
        assert len(m["validation_gauc"]) == 2 and all(len(c) == 2 for c in m["validation_gauc"])
    base, din = saved["models"]["base"], saved["models"]["din"]
    # RelaImpr: seed i of the model against seed i of BaseModel, on GAUC (paper eq. 10)
    want = [rela_impr(d, b) for d, b in zip(din["gauc"]["per_seed"], base["gauc"]["per_seed"])]
    assert din["relaimpr"]["per_seed"] == pytest.approx(want, abs=1e-12)
    assert base["relaimpr"]["per_seed"] == [0.0, 0.0]
    assert din["gauc"]["mean"] == pytest.approx(np.mean(din["gauc"]["per_seed"]))
    assert din["gauc"]["std"] == pytest.approx(np.std(din["gauc"]["per_seed"], ddof=1))
    stats = saved["data_stats"]
    assert stats["users"] == 150 and stats["samples"] == 2 * stats["behaviours"]
    assert sum(stats["split_samples"].values()) == stats["samples"]
    assert saved["figure_model"] == "din"


def test_summary_statistics():
    s = summary([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["per_seed"] == [0.5, 0.7, 0.6]
    assert summary([0.4])["std"] is None  # one seed: no spread, not a spread of 0


def test_report_prints_exactly_the_numbers_of_results_json(run):
    config, result = run
    report = (config.out / "report.md").read_text()
    saved = json.loads((config.out / "results.json").read_text())
    for m in saved["models"].values():
        assert f"{m['gauc']['mean']:.4f} ± {m['gauc']['std']:.4f}" in report
        assert f"{m['auc']['mean']:.4f} ± {m['auc']['std']:.4f}" in report
        assert f"{m['logloss']['mean']:.4f} ± {m['logloss']['std']:.4f}" in report
    assert comparison_table(saved) in report
    assert "Model selection on validation only" in report and "evaluated once" in report
    assert "din experiment (test)" in report
    for png in ("validation_gauc.png", "attention.png", "embeddings.png"):
        assert (config.out / png).read_bytes()[:8] == PNG
        assert f"]({png})" in report


def test_attention_example_is_dins_own_output(run):
    config, result = run
    ex = result.attention
    assert len(ex.candidates) == 2 and ex.candidates[0][1] != ex.candidates[1][1]
    assert all(len(w) == len(ex.behaviour_items) > 0 for w in ex.weights)
    assert np.abs(np.array(ex.weights[0]) - np.array(ex.weights[1])).max() > 0  # depends on the candidate
    emb = result.embeddings
    assert emb.vectors.shape == (emb.items.size, 4) and emb.ctr.shape == (emb.items.size,)
    assert np.unique(emb.cates).size <= 8 and ((emb.ctr > 0) & (emb.ctr < 1)).all()


def test_bad_model_list_is_rejected():
    with pytest.raises(ValueError, match="xgb"):
        ExperimentConfig(models=("din", "xgb"))
    with pytest.raises(ValueError, match="twice"):
        ExperimentConfig(models=("din", "din"))


def test_cli_json_is_results_json(tiny_path, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "experiment", "--data", f"events:{tiny_path}", "--models", "lr,base",
         "--seeds", "1", "--epochs", "1", "--out", str(out), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    printed = json.loads(proc.stdout)
    saved = json.loads((out / "results.json").read_text())
    assert printed["models"] == saved["models"]
    assert printed["command"].startswith("din experiment --data events:") and "--json" in printed["command"]
    assert "experiment" in proc.stderr  # the progress bar / log goes to stderr


def test_train_cli_takes_the_regularisation_and_softmax_switches(tiny_path, tmp_path):
    from model.bundle import load_bundle

    args = ["train", "--data", f"events:{tiny_path}", "--model", "din", "--epochs", "1", "--out", str(tmp_path), "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--reg", "mba", "--reg-lambda", "0.1", "--attention-softmax"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    manifest = load_bundle(Path(json.loads(proc.stdout)["bundle"])).manifest
    assert (manifest["train_config"]["reg"], manifest["train_config"]["reg_lambda"]) == ("mba", 0.1)
    assert manifest["model_config"]["attention_softmax"] is True
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--reg", "mba"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "--reg mba needs --reg-lambda > 0" in bad.stderr


def test_a_baseline_with_a_gauc_of_exactly_one_half_still_gives_a_report(tmp_path):
    """Labelled impressions of one item, each user's all at one moment (so every history is
    empty): a user's samples are identical, every model ties them (GAUC exactly 0.5) and
    RelaImpr is undefined: n/a in the report, not a lost experiment."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 1500
    path = tmp_path / "one_item.parquet"
    user = np.repeat(np.arange(150), 10)
    pq.write_table(pa.table({"user_id": user, "item_id": np.full(n, 7), "cate_id": np.full(n, 1),
                             "timestamp": user * 10, "label": np.arange(n) % 2}), path)  # fmt: skip
    config = ExperimentConfig(
        data=f"events:{path}", models=("base", "lr"), seeds=1, epochs=1, out=tmp_path / "out", batch_size=128,
        embedding_dim=4, max_history=10, progress=False, command="din experiment (test)",
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "attention.png").write_bytes(b"an earlier run's figure")  # this run has no DIN to draw
    result = run_experiment(config)
    models = result.results["models"]
    assert not (tmp_path / "out" / "attention.png").exists()
    assert models["base"]["gauc"]["mean"] == 0.5
    assert np.isnan(models["lr"]["relaimpr"]["mean"])
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()


def test_one_seed_reports_no_spread_and_no_verdict(run):
    """With one seed there is no std: the report must not print '± 0.0000' nor judge DIN by it."""
    import copy

    from model.report import comparison_table, din_vs_base

    one = copy.deepcopy(run[1].results)
    one["config"]["seeds"] = 1
    for m in one["models"].values():
        for key in ("gauc", "auc", "logloss", "relaimpr"):
            if isinstance(m.get(key), dict):
                m[key]["std"] = None
    table, verdict = comparison_table(one), din_vs_base(one)
    assert "±" not in table and "one seed: no spread" in table
    assert "no spread to judge it by; run --seeds 2 or more" in verdict and "beats" not in verdict
