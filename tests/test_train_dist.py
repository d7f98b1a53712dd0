"""Data-parallel training under torchrun (2 gloo processes) against 1 process; kill and resume;
the regularisers and Dice in the streamed trainer.

Each torchrun start costs a few seconds (python + torch import per process), so the runs
are started once per module, on first use, and shared by the assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import load_bundle
from model.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from model.contract import cand_input, hist_input
from model.data.log import read_log
from model.data.stream import LogReader, sample_counts, shard_layout
from model.data.stream_loader import process_batches
from model.data.stream_plan import TRAIN, StreamConfig, StreamPlan, plan_stream, user_split
from model.data.synthetic import SyntheticConfig, write_synthetic
from model.hashing import HashedIds
from model.train_dist import DistTrainConfig, launch, parse_args
from tests import ddp_worker

TINY = SyntheticConfig(users=300, items=80, categories=8, events_per_user=(4, 12), seed=5)
EPOCHS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic(TINY, tmp_path_factory.mktemp("data") / "tiny.parquet")


def _config(data: Path, root: Path, name: str, **kw) -> DistTrainConfig:
    base = dict(
        data=f"events:{data}", epochs=EPOCHS, batch_size=64, embedding_dim=4, max_history=8, out=root / "bundles",
        run_dir=root / name, block_events=200, shuffle_window=300, shards=4, checkpoint_every=5, threads=1,
        progress=False, record_samples=True, verify_replicas=True,
    )  # fmt: skip
    return DistTrainConfig(**{**base, **kw})


# name -> (processes, settings); the regularised runs write their bundles apart from "one" and "two"
RUNS = {
    "one": (1, {}),
    "two": (2, {}),
    # 3 shards of batches 22, 22, 21: process 1's one shard runs dry 3 steps before process 0's
    "dice_mba1": (1, dict(model="din_dice", reg="mba", reg_lambda=0.5, shards=3, batch_size=65)),
    "dice_mba2": (2, dict(model="din_dice", reg="mba", reg_lambda=0.5, shards=3, batch_size=65)),
    "dropout1": (1, dict(reg="dropout", id_dropout=0.5, verify_replicas=False)),
    "dropout2": (2, dict(reg="dropout", id_dropout=0.5, verify_replicas=False)),
}


class Runs:
    """`runs[name]` -> (config, report) of RUNS[name], trained on first use; `runs["root"]` their directory."""

    def __init__(self, data: Path, root: Path):
        self.data, self.root, self.done = data, root, {}

    def __getitem__(self, name: str):
        if name == "root":
            return self.root
        if name not in self.done:
            world, kw = RUNS[name]
            out = {} if name in ("one", "two") else {"out": self.root / "bundles-reg"}
            config = _config(self.data, self.root, name, **kw, **out)
            self.done[name] = (config, launch(config, world))
        return self.done[name]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    return Runs(data, tmp_path_factory.mktemp("runs"))


def _final_state(config: DistTrainConfig) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(config.run_path))["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_parameters_are_identical_across_ranks_after_every_step(runs):
    _, report = runs["two"]
    assert report["world"] == 2 and report["backend"] == "gloo"
    assert report["replica_checks"] == report["global_steps"] > 20
    assert len(report["peak_rss_mb"]) == 2 and all(r > 50 for r in report["peak_rss_mb"])


def test_each_training_sample_is_used_exactly_once_per_epoch(runs, data):
    log = read_log(data)
    rows = np.flatnonzero(user_split(log.user_id, (0.8, 0.1, 0.1), 0) == TRAIN)
    expected = np.sort(np.concatenate([rows * 2, rows * 2 + 1]))  # each event and its one negative
    for name, world in (("one", 1), ("two", 2)):
        config, report = runs[name]
        assert report["train_samples"] == EPOCHS * expected.size
        for epoch in range(1, EPOCHS + 1):
            per_rank = [np.load(config.run_path / "samples" / f"epoch{epoch}-rank{r}.npy") for r in range(world)]
            if world == 2:
                assert per_rank[0].size > 0 and per_rank[1].size > 0
                assert np.intersect1d(per_rank[0], per_rank[1]).size == 0
            np.testing.assert_array_equal(np.sort(np.concatenate(per_rank)), expected)


def test_two_processes_train_the_same_model_as_one(runs):
    (one, r1), (two, r2) = runs["one"], runs["two"]
    assert r1["global_steps"] == r2["global_steps"]
    for k in ("auc", "gauc", "logloss"):
        assert r2["metrics"][k] == pytest.approx(r1["metrics"][k], abs=1e-5)
    for h1, h2 in zip(r1["validation"], r2["validation"], strict=True):
        for k in ("auc", "gauc", "logloss", "train_loss"):
            assert h2[k] == pytest.approx(h1[k], abs=1e-5)
    assert _max_diff(_final_state(one), _final_state(two)) < 1e-5
    # only rank 0 wrote a bundle and a report; the bundle serves the ids the plan fitted
    bundles = sorted(p for p in (runs["root"] / "bundles").iterdir() if not p.name.startswith("."))
    assert len(bundles) == 2
    manifest = load_bundle(r2["bundle"]).manifest
    assert manifest["distributed"] == {"world": 2, "backend": "gloo", "shards": 4}
    assert manifest["metrics"]["test"] == pytest.approx(r2["metrics"])


def test_same_seed_same_processes_same_result(runs, data):
    config, report = runs["two"]
    again = replace(config, run_dir=runs["root"] / "two-again", record_samples=False, verify_replicas=False)
    r = launch(again, 2)
    assert r["metrics"] == report["metrics"]
    assert _max_diff(_final_state(config), _final_state(again)) == 0.0


@pytest.mark.parametrize("name", ["one", "two", "dropout2"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(runs, name):
    reference, ref_report = runs[name]
    nproc = ref_report["world"]
    steps_per_epoch = ref_report["global_steps"] // EPOCHS
    crash_at = steps_per_epoch + 7  # mid epoch 2, two steps after a checkpoint (every 5)
    assert crash_at % 5 != 0
    config = replace(reference, run_dir=runs["root"] / f"crash-{name}", crash_after_steps=crash_at)
    with pytest.raises(RuntimeError, match="exited with code"):
        launch(config, nproc)  # every process SIGKILLs itself after global step `crash_at`
    saved = list_checkpoints(config.run_path)
    last = load_checkpoint(saved[-1])
    assert last["global_step"] == crash_at // 5 * 5 and last["epoch"] == 2 and len(last["history"]) == 1
    assert set(last["model"]) == set(_final_state(reference))  # parameters and buffers
    assert len(last["rng"]) == nproc and last["world"] == nproc
    assert not (config.run_path / "report.json").exists()

    resumed = launch(replace(config, crash_after_steps=None, resume=True), nproc)
    assert resumed["resumed_from"] == last["global_step"]
    assert resumed["global_steps"] == ref_report["global_steps"]
    # the resumed process trained on the rest of epoch 2 only: no sample again, none skipped
    per_epoch = ref_report["train_samples"] // EPOCHS
    assert resumed["train_samples"] == per_epoch - 64 * last["step"]
    ids = np.concatenate([np.load(config.run_path / "samples" / f"epoch2-rank{r}.npy") for r in range(nproc)])
    assert np.unique(ids).size == ids.size == per_epoch - 64 * last["step"]
    assert _max_diff(_final_state(reference), _final_state(config)) < 1e-6
    for k in ("auc", "gauc", "logloss"):
        assert resumed["metrics"][k] == pytest.approx(ref_report["metrics"][k], abs=1e-6)
    assert [h["epoch"] for h in resumed["validation"]] == [1, 2]
    for h, want in zip(resumed["validation"], ref_report["validation"]):  # train loss of the resumed epoch too
        assert h["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)


def test_resume_refuses_other_settings(runs):
    config, _ = runs["one"]
    with pytest.raises(ValueError, match="batch_size: 64 -> 128"):
        launch(replace(config, batch_size=128, resume=True, record_samples=False), 1)
    with pytest.raises(ValueError, match="reg: 'none' -> 'l2', reg_lambda: 0.0 -> 0.1"):
        launch(replace(config, reg="l2", reg_lambda=0.1, resume=True, record_samples=False), 1)



def test_resume_refuses_a_checkpoint_from_when_the_regulariser_was_a_loss_term(runs, tmp_path):
    import shutil

    from model.checkpoint import save_checkpoint

    config, _ = runs["dice_mba1"]
    run_dir = tmp_path / "old-run"
    shutil.copytree(config.run_path, run_dir)
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["regularizer"]  # written by this code
    del state["regularizer"]  # as every checkpoint before the rule changed
    save_checkpoint(run_dir, state["global_step"] + 1, state)
    with pytest.raises(ValueError, match="was a term of the loss, not its own step"):
        launch(replace(config, run_dir=run_dir, resume=True, record_samples=False), 1)

def test_command_line_round_trip():
    config = DistTrainConfig(data="events:/x.parquet", hash_buckets=1000, resume=True, progress=False, out=Path("o"))
    again = parse_args(config.to_argv())
    assert again == config
    assert json.dumps(config.to_json())
    regularised = replace(config, reg="mba", reg_lambda=0.25, id_dropout=0.3, attention_softmax=True)
    assert parse_args(regularised.to_argv()) == regularised


def test_config_rejects_what_streamed_training_cannot_do():
    with pytest.raises(ValueError, match="--reg mba needs --reg-lambda > 0"):
        DistTrainConfig(reg="mba")
    with pytest.raises(ValueError, match="none, l2, mba, dropout"):
        DistTrainConfig(reg="l1")
    with pytest.raises(ValueError, match="streamed training reads a Parquet log"):
        DistTrainConfig(data="movielens:/data/ml-1m")
    # switches the run would silently ignore
    with pytest.raises(ValueError, match="--reg-lambda 0.5 would be ignored: only --reg l2 / mba take a lambda, not --reg none"):
        DistTrainConfig(reg="none", reg_lambda=0.5)
    with pytest.raises(ValueError, match="--reg-lambda 0.2 would be ignored"):
        DistTrainConfig(reg="dropout", reg_lambda=0.2)
    with pytest.raises(ValueError, match=r"--attention-softmax needs a model with attention \(din, din_dice\); --model base has none"):
        DistTrainConfig(model="base", attention_softmax=True)
    DistTrainConfig(model="din_dice", attention_softmax=True, reg="mba", reg_lambda=0.5)  # still accepted where used


def test_all_reduce_sum_returns_a_new_array_and_leaves_its_input_alone(tmp_path):
    import torch.distributed as dist

    from model.distributed import DistContext, all_reduce_sum

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
        values = np.array([1.5, 2.0])
        counts = np.array([3, 4], np.int64)
        out = all_reduce_sum(ctx, values)
        out += 1
        np.testing.assert_array_equal(values, [1.5, 2.0])  # an in-place reduce once double-counted losses
        assert all_reduce_sum(ctx, counts).dtype == np.int64
    finally:
        dist.destroy_process_group()



def test_end_process_keeps_the_exit_status_and_flushes_what_was_written():
    """A worker ended by os._exit must not lose its buffered stdout (the --json summary) or its log lines."""
    code = (
        "import atexit, logging, sys\n"
        "from model.distributed import end_process\n"
        "logging.basicConfig(stream=sys.stderr, format='%(message)s')\n"
        "atexit.register(lambda: print('atexit ran'))\n"  # the interpreter's teardown: skipped
        "print('{\"bundle\": 1}', end='')\n"  # a pipe: block-buffered until flushed
        "logging.getLogger('w').warning('logged')\n"
        "end_process(3)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == '{"bundle": 1}'
    assert proc.stderr.strip() == "logged"

# -- the regularisers and Dice in the streamed trainer ------------------------------------------
@pytest.mark.parametrize("buckets", [None, 211])
def test_streamed_mba_counts_are_the_training_samples_occurrences(data, buckets):
    """n_j as in memory: each candidate once per sample, each behaviour once per sample whose
    truncated history holds it; brute force: count the ids of every batch of one epoch."""
    plan = plan_stream(data, StreamConfig(max_history=8, hash_buckets=buckets, block_events=200))
    counts = sample_counts(plan, LogReader(plan))
    fields = plan.spec.sequence_fields
    seen = {name: np.zeros(plan.spec.vocab_sizes[f]) for f in fields for name in (hist_input(f), cand_input(f))}
    assert counts.keys() == seen.keys()
    layout = shard_layout(plan, 1, 4, 64)
    for batch in process_batches(plan, layout, rank=0, world=1, epoch=1):
        for f in fields:
            hist = batch.hist[f]
            seen[hist_input(f)] += np.bincount(hist[hist != 0].ravel(), minlength=plan.spec.vocab_sizes[f])
            seen[cand_input(f)] += np.bincount(batch.cand[f], minlength=plan.spec.vocab_sizes[f])
    for name, n in seen.items():
        n[0] = 0.0  # PAD_ROW
        np.testing.assert_array_equal(counts[name], n)
    for f in fields:  # histories count: more than the training events
        assert counts[hist_input(f)].sum() > plan.row_counts[f].sum()


def test_streamed_mba_gradient_is_over_the_global_batch_with_the_plans_bucket_counts(data, tmp_path):
    buckets = 211
    run_dir = tmp_path / "run"
    plan = plan_stream(data, StreamConfig(max_history=8, hash_buckets=buckets, block_events=200))
    plan.save(run_dir)
    log = read_log(data)
    train = user_split(log.user_id, (0.8, 0.1, 0.1), 0) == TRAIN
    for f, ids in (("item_id", log.item_id), ("cate_id", log.cate_id)):  # the plan's counts: per bucket, training events
        np.testing.assert_array_equal(plan.row_counts[f], np.bincount(HashedIds(buckets).lookup(ids[train]), minlength=buckets + 2))
    mba_n = sample_counts(plan, LogReader(plan))  # what MBA divides by (test above)

    ddp_worker.launch("mba", tmp_path, str(run_dir))  # each of 2 processes on its part of global step 0
    parts = [dict(np.load(tmp_path / f"mba-rank{r}.npz")) for r in (0, 1)]
    whole = ddp_worker.mba_gradient(run_dir)  # one process: the global batch itself
    lam = ddp_worker.MBA_LAMBDA
    for f in ("item_id", "cate_id"):
        present = whole[f"rows_{f}"]
        np.testing.assert_array_equal(np.union1d(parts[0][f"rows_{f}"], parts[1][f"rows_{f}"]), present)
        n = np.maximum(mba_n[hist_input(f)] + mba_n[cand_input(f)], 1).astype(np.float32)  # DIN: one table serves both
        absent = np.setdiff1d(np.arange(n.size), present)
        assert absent.size > 0 and present.size > 0
        for got in (whole, *parts):  # every process: the penalty of the GLOBAL batch's rows
            w, g = got[f"weight_{f}"], got[f"grad_{f}"]
            assert np.all(g[absent] == 0)
            step_rounding = 2 * np.finfo(np.float32).eps * np.abs(w).max()  # g = w - (w - lr * 2 lambda w / n) in float32
            np.testing.assert_allclose(g[present], 2 * lam * w[present] / n[present, None], rtol=1e-6, atol=step_rounding)
    # rows only process 1's part uses: process 0 regularises them too (so the union matters)
    assert np.setdiff1d(parts[1]["rows_item_id"], parts[0]["rows_item_id"]).size > 0


def test_dice_and_mba_two_processes_train_the_same_model_as_one(runs):
    (one, r1), (two, r2) = runs["dice_mba1"], runs["dice_mba2"]
    assert r2["replica_checks"] == r2["global_steps"] == r1["global_steps"]
    # Float rounding only: Dice's statistics are summed in another order over 2 processes, and
    # the AUC is read off a 2^20-bin histogram (~1e-5). Measured: parameters 1.2e-5 apart (4.7e-6
    # with MBA as its own step), AUC 1.3e-5 (6e-6), GAUC equal (1.5e-4: a per-user AUC over a
    # few impressions moves by a whole pair when a near-tie flips); switching off the Dice sync
    # or MBA's row union moves them by ~0.06.
    tol = 5e-5
    for k, k_tol in (("auc", tol), ("gauc", 1e-3), ("logloss", tol)):
        assert r2["metrics"][k] == pytest.approx(r1["metrics"][k], abs=k_tol)
    for h1, h2 in zip(r1["validation"], r2["validation"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
    final = _final_state(two)
    assert _max_diff(_final_state(one), final) < tol  # parameters and Dice's running statistics
    assert any("running_mean" in k for k in final)
    # the runs include steps where a process's shards have run dry (an empty batch in Dice's all-reduce)
    plan = StreamPlan.load(two.run_path)
    dry = [
        step
        for epoch in range(1, EPOCHS + 1)
        for layout in [shard_layout(plan, epoch, two.shards, two.batch_size)]
        for step in range(layout.steps)
        if any(all(layout.shard_batches(v) <= step for v in range(rank, two.shards, 2)) for rank in (0, 1))
    ]
    assert dry
    assert r2["config"]["reg"] == "mba" and load_bundle(r2["bundle"]).manifest["train_config"]["reg_lambda"] == 0.5


def test_id_dropout_is_the_same_with_one_or_two_processes(runs):
    (one, r1), (two, r2) = runs["dropout1"], runs["dropout2"]
    assert _max_diff(_final_state(one), _final_state(two)) < 1e-5  # each sample's coins are its own
    assert _max_diff(_final_state(two), _final_state(runs["two"][0])) > 1e-3  # and dropout did drop ids


def test_more_processes_than_shards_is_refused_before_anything_runs(tmp_path):
    """Said at once, not by every process after the data plan's pass over the log."""
    config = DistTrainConfig(data="synthetic", run_dir=tmp_path / "run", shards=8)
    with pytest.raises(ValueError, match="9 processes need at least as many data shards, got 8"):
        launch(config, nproc=9)
    assert not (tmp_path / "run").exists()


def test_a_new_run_that_cannot_start_leaves_the_previous_run_alone(data, tmp_path):
    """Bad data is refused before the run directory is touched: the previous run's checkpoints
    and report stay, and it can still be resumed."""
    config = _config(data, tmp_path, "run", epochs=1, checkpoint_every=0, record_samples=False, verify_replicas=False,
                     export=False)  # fmt: skip
    first = launch(config, 1)
    checkpoints = list_checkpoints(config.run_path)
    report = (config.run_path / "report.json").read_text()
    assert checkpoints and json.loads(report)["global_steps"] == first["global_steps"]
    not_parquet = tmp_path / "events.csv"
    not_parquet.write_text("user_id,item_id,cate_id,ts\n1,2,3,4\n")
    with pytest.raises(ValueError, match="Parquet"):
        launch(replace(config, data=f"events:{not_parquet}"), 1)
    assert list_checkpoints(config.run_path) == checkpoints
    assert (config.run_path / "report.json").read_text() == report
    resumed = launch(replace(config, resume=True), 1)  # nothing left to train: the finished run, tested again
    assert resumed["resumed_from"] == first["global_steps"] and resumed["metrics"] == first["metrics"]


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--lr", "0"], "error: --lr must be > 0, got 0.0"),
    (["--model", "transformer"], "error: unknown --model 'transformer'; choose one of: lr, base"),
    (["--seed", "-1"], "error: --seed must be in 0..2^32-1, got -1"),
    (["--data", "bogus"], "reads a Parquet log: --data events:PATH"),  # the flag named once, not ----data
])  # fmt: skip
def test_bad_values_are_argparse_errors_naming_the_flag(argv, says, capsys):
    """`python -m model.train_dist` (documented in the README) used to end these in a traceback."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err
