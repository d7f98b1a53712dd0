"""Training at scale: streamed samples, data-parallel under torchrun, checkpoints, hashed ids.

    torchrun --nproc-per-node N -m model.train_dist --data events:LOG.parquet [options]
    python -m model.train_dist ...          # one process, same code path
    din train --nproc N / --stream / --resume / --hash-buckets B ...   (the CLI's shorthand)

What it does, in order:
1. rank 0 reads the sorted Parquet log once (model/data/stream_plan.py: split, id maps,
   event counts, negative pool, blocks) and saves the plan in the run directory; with
   --reg mba it then counts n_j over the training samples (one more pass, kept beside it);
2. every process builds the same model from the same seed and wraps it in
   DistributedDataParallel (gloo on CPU, nccl on CUDA);
3. each global step is the union of the virtual shards' batches (model/data/stream.py);
   a process trains on its shards' part with the loss of model/objective.py (the in-memory
   trainer's): its summed BCE weighted by world / global batch, so DDP's gradient average
   is the gradient of the global batch's mean loss; after the optimiser's step every process
   takes the regulariser's own step (l2, or mba over the rows of the GLOBAL batch, united
   across processes, n_j over the training samples); id dropout's coins are a hash of (sample id, position, seed, epoch),
   and Dice's batch statistics are all-reduced (model/dice.py). So the result depends on
   the seed and the shards, not on the number of processes (float rounding aside); a
   process whose shards have run dry in an epoch's last steps takes part with an empty
   batch, which adds nothing, so no sample is dropped or repeated;
4. checkpoints every `checkpoint_every` global steps and at each epoch end; `resume`
   continues from the newest one;
5. validation per epoch and the final test are reduced across processes
   (model/metric_sums.py); the best epoch on validation is tested once;
6. only rank 0 exports the bundle (ids hashed or vocabularies) and writes report.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.bundle import finite
from model.checkpoint import (
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.config import ModelConfig
from model.contract import cand_input, hist_input
from model.cpu import cores
from model.data.stream import (
    DEFAULT_SHARDS,
    DEFAULT_SHUFFLE_WINDOW,
    LogReader,
    SampleBatch,
    eval_batches,
    eval_blocks,
    sample_counts,
    shard_layout,
)
from model.data.stream_loader import process_batches
from model.data.stream_plan import PLAN_JSON, TEST, TRAIN, VALIDATION, StreamConfig, StreamPlan, plan_stream
from model.distributed import (
    DistContext,
    all_gather_cat,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    distributed,
    end_process,
)
from model.export import export_bundle
from model.inputs import split_inputs
from model.metric_sums import MetricSums
from model.objective import Objective
from model.regularization import REGULARIZERS, HashedCoins, RegularizationConfig
from model.registry import MODELS, build_model, check_attention_softmax

log = logging.getLogger(__name__)
REPORT = "report.json"
SYNTHETIC_FILE = "synthetic.parquet"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DistTrainConfig:
    data: str = field(default="synthetic", metadata=_help("events:PATH (a Parquet log sorted by user and time) or synthetic"))
    model: str = field(default="din", metadata=_help("model type: " + ", ".join(MODELS)))
    epochs: int = field(default=3, metadata=_help("training epochs"))
    batch_size: int = field(default=1024, metadata=_help("global batch size, over all processes"))
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate"))
    seed: int = field(default=0, metadata=_help("seed: split, init, negatives, order"))
    out: Path = field(default=Path("artifacts/bundles"), metadata=_help("directory the bundle is written into"))
    run_dir: Path | None = field(default=None, metadata=_help("checkpoints, data plan, report (default: OUT/../runs/MODEL)"))
    max_history: int = field(default=50, metadata=_help("behaviours per history"))
    embedding_dim: int = field(default=16, metadata=_help("embedding size per id field"))
    attention_softmax: bool = field(default=False, metadata=_help("normalise attention with a softmax"))
    reg: str = field(default="none", metadata=_help("regulariser: " + " | ".join(REGULARIZERS) + " (model/regularization.py)"))
    reg_lambda: float = field(default=0.0, metadata=_help("lambda of --reg l2 / mba"))
    id_dropout: float = field(default=0.5, metadata=_help("drop probability of --reg dropout"))
    negatives: int = field(default=1, metadata=_help("negatives per positive, for logs without labels"))
    eval_batch_size: int = field(default=1024, metadata=_help("batch size of validation and test (memory: activations)"))
    hash_buckets: int | None = field(default=None, metadata=_help("hash ids into this many rows per field (default: vocabularies)"))
    shards: int = field(default=DEFAULT_SHARDS, metadata=_help("virtual data shards (>= processes); fixes the batch order"))
    workers: int = field(default=0, metadata=_help("data-loader worker processes per process"))
    block_events: int = field(default=32_768, metadata=_help("events per data block (the unit of sharding)"))
    shuffle_window: int = field(default=DEFAULT_SHUFFLE_WINDOW, metadata=_help("samples shuffled together per shard"))
    checkpoint_every: int = field(default=0, metadata=_help("checkpoint every N global steps (0: epoch ends only)"))
    resume: bool = field(default=False, metadata=_help("continue the newest checkpoint in the run directory"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda"))
    threads: int | None = field(default=None, metadata=_help("torch threads per process (default: cores / local processes)"))
    progress: bool = field(default=True, metadata=_help("progress bar and log lines on rank 0"))
    max_steps: int | None = field(default=None, metadata=_help("benchmarks only: stop each epoch after N global steps"))
    eval_max_blocks: int | None = field(default=None, metadata=_help("benchmarks only: evaluate at most N blocks per split"))
    export: bool = field(default=True, metadata=_help("export the ONNX bundle at the end"))
    record_samples: bool = field(default=False, metadata=_help("tests: save each process's training sample ids per epoch"))
    verify_replicas: bool = field(default=False, metadata=_help("tests: check after every step that all processes hold identical parameters"))
    crash_after_steps: int | None = field(default=None, metadata=_help("tests: SIGKILL every process after N global steps"))

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if not 0 <= self.seed < 2**32:  # numpy's seeds; `din train --seed` has the same bounds
            raise ValueError(f"seed must be in 0..2^32-1, got {self.seed}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_history", "embedding_dim", "negatives", "shards", "block_events", "shuffle_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < self.shards:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least the number of shards ({self.shards})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"hash_buckets must be >= 1, got {self.hash_buckets}")
        _data_scheme(self.data)
        self.regularization()  # validates reg, reg_lambda, id_dropout
        check_attention_softmax(self.model, self.attention_softmax)

    def regularization(self) -> RegularizationConfig:
        return RegularizationConfig(kind=self.reg, lam=self.reg_lambda, id_dropout=self.id_dropout)

    @property
    def run_path(self) -> Path:
        return self.run_dir if self.run_dir is not None else self.out.parent / "runs" / self.model

    def model_config(self) -> ModelConfig:
        return ModelConfig(embedding_dim=self.embedding_dim, attention_softmax=self.attention_softmax)

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            max_history=self.max_history,
            negatives=self.negatives,
            seed=self.seed,
            hash_buckets=self.hash_buckets,
            block_events=self.block_events,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["run_dir"] = str(self.run_path)
        return d

    def to_argv(self) -> list[str]:
        """Command-line arguments that `main` parses back into this config."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif value is not None:
                argv += [flag, str(value)]
        return argv


# Fields whose type cannot be read off their default.
_OPTIONAL_TYPES = {"run_dir": Path, "hash_buckets": int, "threads": int, "max_steps": int, "eval_max_blocks": int, "crash_after_steps": int}
# What must match for --resume to continue a run (the rest may change, e.g. progress).
_RESUME_KEYS = (
    "data", "model", "epochs", "batch_size", "lr", "seed", "max_history", "embedding_dim", "attention_softmax",
    "reg", "reg_lambda", "id_dropout", "negatives", "hash_buckets", "shards", "block_events", "shuffle_window",
    "checkpoint_every", "max_steps",
)  # fmt: skip

_DEFAULTS_BEFORE_REG = {"reg": "none", "reg_lambda": 0.0, "id_dropout": 0.5}


@dataclass
class DistTrainResult:
    bundle: Path | None
    model: str
    metrics: dict[str, float]  # test split
    validation: list[dict[str, float]]
    best_epoch: int
    world: int
    train_samples: int  # samples trained on in this invocation
    train_seconds: float  # the training steps of this invocation (no planning, evaluation, export)
    samples_per_second: float
    peak_rss_mb: list[float]  # per process
    global_steps: int
    replica_checks: int = 0
    resumed_from: int | None = None  # global step of the checkpoint resumed from
    plan: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["bundle"] = None if self.bundle is None else str(self.bundle)
        return d


# ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])


def _default_threads() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cores() // max(local, 1))


def _named_on_device(batch: SampleBatch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.named_inputs().items()}


def _to_device(batch: SampleBatch, spec, device: torch.device):
    return split_inputs(spec, _named_on_device(batch, device)), torch.from_numpy(batch.label).to(device)


def _global_rows(ctx: DistContext, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MBA's present rows of the GLOBAL batch: the union of every process's rows, per field."""
    if not ctx.distributed:
        return rows
    return {f: torch.unique(all_gather_cat(ctx, r)) for f, r in rows.items()}


def _dropout_salt(seed: int, epoch: int) -> int:
    """Id dropout's coins differ per seed and epoch, never per process (model/regularization.py HashedCoins)."""
    return (seed % 2**31) * 4096 + epoch


def _params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def evaluate_stream(
    model: nn.Module, plan: StreamPlan, reader: LogReader, split: int, ctx: DistContext, batch_size: int, max_blocks: int | None = None
) -> dict[str, float]:
    """AUC, GAUC, logloss of `split`: each process scores its blocks; the sums are all-reduced."""
    model.eval()
    sums = MetricSums()
    blocks = eval_blocks(plan, split, 0, 1)[:max_blocks]
    for block in blocks[ctx.rank :: ctx.world]:
        labels, probs, users = [], [], []
        for batch in eval_batches(plan, reader, block, split, batch_size):
            inputs, label = _to_device(batch, plan.spec, ctx.device)
            logit, _ = model(*inputs)
            probs.append(torch.sigmoid(logit).float().cpu().numpy())
            labels.append(batch.label)
            users.append(batch.user_id)
        if probs:
            sums.update(np.concatenate(labels), np.concatenate(probs), np.concatenate(users))
    return sums.reduce(partial(all_reduce_sum, ctx)).result()


def _data_scheme(data: str) -> tuple[str, str]:
    """("events", PATH) or ("synthetic", ""): the only sources streamed training reads."""
    scheme, _, arg = data.partition(":")
    scheme = scheme.strip().lower()
    if (scheme == "events" and arg) or (scheme == "synthetic" and not arg):
        return scheme, arg
    raise ValueError(
        f"streamed training reads a Parquet log: --data events:PATH (sorted by user and time; "
        f"`din prepare` sorts one) or synthetic, got {data!r}"
    )


def _resolve_data(config: DistTrainConfig, ctx: DistContext) -> Path:
    scheme, arg = _data_scheme(config.data)
    if scheme == "events":
        return Path(arg)
    path = config.run_path / SYNTHETIC_FILE
    if ctx.is_main and not path.is_file():
        from model.data.synthetic import DEFAULT_SYNTHETIC, write_synthetic

        write_synthetic(DEFAULT_SYNTHETIC, path, chunk_users=4096)  # sorted, small row groups
    barrier(ctx)
    return path


def _check_resumable(config: DistTrainConfig, state: dict, world: int, path: Path) -> None:
    old = {**_DEFAULTS_BEFORE_REG, **state["config"]}  # checkpoints from before --reg existed had none
    changed = [k for k in _RESUME_KEYS if old.get(k) != config.to_json().get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {config.to_json().get(k)!r}" for k in changed)
        raise ValueError(f"{path} was written by a run with other settings ({diffs}); resume with the same settings")
    if state["world"] != world:
        raise ValueError(f"{path} was written by {state['world']} process(es); resume it with --nproc {state['world']}")
    if config.reg in ("l2", "mba") and state.get("regularizer") != REGULARIZER_RULE:
        raise ValueError(f"{path} was written when --reg {config.reg} was a term of the loss, not its own step after "
                         f"Adam's (model/objective.py): resuming would change the rule mid-run; start a new run")


REGULARIZER_RULE = "own step after the optimiser's"  # checkpoints before it had the penalty in the loss
MBA_COUNTS = "mba_counts.npz"
ERROR_FILE = "error.txt"  # under torchrun: rank 0's refusal, for `launch` to report


def _mba_counts(config: DistTrainConfig, plan: StreamPlan, reader: LogReader, run_dir: Path, ctx: DistContext):
    """n_j for --reg mba, counted over the training samples as in memory (`sample_counts`).

    One pass over the training blocks, by rank 0, once per data plan: saved beside the plan
    (keyed by the data and the plan's settings), read by the other processes and by resumed
    runs. None for the other regularisers.
    """
    if config.reg != "mba":
        return None
    path = run_dir / MBA_COUNTS
    # "per input": counts kept per id input (hist_f, cand_f); a file of the older per-field counts is recounted
    key = hashlib.sha256(json.dumps([plan.fingerprint, asdict(plan.config), "per input"], sort_keys=True, default=str).encode()).hexdigest()
    names = [name for f in plan.spec.sequence_fields for name in (hist_input(f), cand_input(f))]

    def saved_counts() -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return {name: saved[f"n_{name}"] for name in names} if str(saved["key"]) == key else None

    if ctx.is_main and saved_counts() is None:
        t0 = time.perf_counter()
        counts = sample_counts(plan, reader, progress=config.progress)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, key=np.array(key), **{f"n_{f}": c for f, c in counts.items()})
        tmp.replace(path)
        _info(config, ctx, f"MBA n_j over the training samples in {time.perf_counter() - t0:.1f}s")
    barrier(ctx)
    return saved_counts()


def train_dist(config: DistTrainConfig) -> DistTrainResult:
    """Train in this process (rank from torchrun's environment, or alone); every rank returns the result."""
    with distributed(config.device) as ctx, _deterministic(config.seed, config.threads or _default_threads()):
        return _train(config, ctx)


def _info(config: DistTrainConfig, ctx: DistContext, message: str) -> None:
    if ctx.is_main and config.progress:
        log.info(message)


def _train(config: DistTrainConfig, ctx: DistContext) -> DistTrainResult:
    run_dir = config.run_path
    path = _resolve_data(config, ctx)

    # -- the data plan: rank 0 makes (or, resuming, reloads) it; the others read it ----------
    state = None
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    if config.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start the run without --resume")
    if ctx.is_main:
        if checkpoint is not None and (run_dir / PLAN_JSON).is_file():
            plan = StreamPlan.load(run_dir)
            plan.check_source()
        else:
            t0 = time.perf_counter()
            # the plan validates the log: a run that cannot start leaves the previous one as it was
            plan = plan_stream(path, config.stream_config(), progress=config.progress)
            if not config.resume:
                removed = clear_checkpoints(run_dir)
                if removed:
                    _info(config, ctx, f"new run in {run_dir}: removed {removed} old checkpoint(s)")
                (run_dir / REPORT).unlink(missing_ok=True)
            plan.save(run_dir)
            _info(config, ctx, f"data plan in {time.perf_counter() - t0:.1f}s: {plan.describe()}")
    barrier(ctx)
    if not ctx.is_main:
        plan = StreamPlan.load(run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        _check_resumable(config, state, ctx.world, checkpoint)
    reader = LogReader(plan)

    # -- model, DDP, optimiser ---------------------------------------------------------------
    torch.manual_seed(config.seed)  # the same initial parameters on every rank
    model = build_model(config.model, plan.spec, config.model_config()).to(ctx.device)
    if state is not None:
        model.load_state_dict(state["model"])
    ddp: nn.Module = model
    if ctx.distributed:
        ddp = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    objective = Objective.build(plan.spec, config.regularization(), _mba_counts(config, plan, reader, run_dir, ctx), ctx.device)

    history: list[dict[str, float]] = []
    best_state, best_epoch, best_score = None, 0, -np.inf
    epoch, step, global_step = 1, 0, 0
    resumed_from, resumed_loss = None, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
        history = state["history"]
        best_state, best_epoch, best_score = state["best_state"], state["best_epoch"], state["best_score"]
        set_rng_state(state["rng"][ctx.rank], ctx.device)
        resumed_from = global_step
        resumed_loss = np.asarray(state["loss_sum"], np.float64)
        _info(config, ctx, f"resumed from {checkpoint.name}: epoch {epoch}, step {step}")

    def checkpoint_now(next_epoch: int, next_step: int, epoch_loss: np.ndarray) -> None:
        rngs = all_gather_object(ctx, rng_state(ctx.device))  # collectives: every rank calls them
        epoch_loss = all_reduce_sum(ctx, epoch_loss)
        if ctx.is_main:
            save_checkpoint(
                run_dir,
                global_step,
                {
                    "config": config.to_json(),
                    "world": ctx.world,
                    "regularizer": REGULARIZER_RULE,
                    "plan_fingerprint": plan.fingerprint,
                    "epoch": next_epoch,
                    "step": next_step,
                    "global_step": global_step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "best_score": best_score,
                    "rng": rngs,
                    "loss_sum": epoch_loss,  # training loss of the epoch so far, all ranks
                },
            )
        barrier(ctx)

    # -- training ------------------------------------------------------------------------------
    trained, train_seconds, replica_checks = 0, 0.0, 0
    while epoch <= config.epochs:
        layout = shard_layout(plan, epoch, config.shards, config.batch_size)
        steps = layout.steps if config.max_steps is None else min(layout.steps, config.max_steps)
        ddp.train()
        loss_sum = np.zeros(2)  # summed loss and samples of this rank in this epoch
        if resumed_loss is not None:  # the part of the epoch before the checkpoint, counted once (rank 0)
            loss_sum, resumed_loss = (resumed_loss if ctx.is_main else loss_sum), None
        seen: list[np.ndarray] = []
        bar = tqdm(total=steps, initial=step, desc=f"{config.model} epoch {epoch}/{config.epochs}", unit="step",
                   file=sys.stderr, disable=not (config.progress and ctx.is_main), leave=False)  # fmt: skip
        batches = process_batches(plan, layout, rank=ctx.rank, world=ctx.world, epoch=epoch, start_step=step,
                                  workers=config.workers, shuffle_window=config.shuffle_window)  # fmt: skip
        t0 = time.perf_counter()
        for batch in batches:
            if step >= steps:
                break
            n_global = layout.global_batch_size(step)
            real = len(batch) > 0  # an empty batch (shards ran dry) still takes part: it adds nothing
            named = objective.drop(_named_on_device(batch, ctx.device), HashedCoins(batch.sample_id, _dropout_salt(config.seed, epoch)))
            logit, _ = ddp(*split_inputs(plan.spec, named))
            label = torch.from_numpy(batch.label).to(ctx.device)
            rows = _global_rows(ctx, objective.rows(named))  # every process, every step: a collective
            data_loss = objective(logit, label, share=ctx.world / n_global)
            optimizer.zero_grad(set_to_none=True)
            data_loss.backward()
            optimizer.step()
            objective.regularize(model, rows, config.lr)
            step += 1
            global_step += 1
            if real:
                trained += len(batch)
                loss_sum += (float(data_loss.detach()) * n_global / ctx.world, len(batch))
                if config.record_samples:
                    seen.append(batch.sample_id.copy())
            if config.verify_replicas and ctx.distributed:
                digests = all_gather_object(ctx, _params_digest(model))
                if len(set(digests)) != 1:
                    raise RuntimeError(f"parameters differ across processes after global step {global_step}")
                replica_checks += 1
            bar.update(1)
            if config.checkpoint_every and global_step % config.checkpoint_every == 0:
                checkpoint_now(epoch, step, loss_sum)
            if config.crash_after_steps is not None and global_step == config.crash_after_steps:
                os.kill(os.getpid(), signal.SIGKILL)  # tests: a real, abrupt death
        batches.close()
        train_seconds += time.perf_counter() - t0
        bar.close()
        if config.record_samples:
            ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
            out = run_dir / "samples" / f"epoch{epoch}-rank{ctx.rank}.npy"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, ids)
        total = all_reduce_sum(ctx, loss_sum)
        val = evaluate_stream(model, plan, reader, VALIDATION, ctx, config.eval_batch_size, config.eval_max_blocks)
        history.append({"epoch": epoch, "train_loss": float(total[0] / max(total[1], 1)), **val})
        _info(config, ctx, f"{config.model} epoch {epoch}: train loss {history[-1]['train_loss']:.4f}; validation "
                           f"auc {val['auc']:.4f} gauc {val['gauc']:.4f} logloss {val['logloss']:.4f}")  # fmt: skip
        score = val["gauc"] if np.isfinite(val["gauc"]) else val["auc"]
        if best_state is None or score > best_score:
            best_state, best_epoch, best_score = copy.deepcopy(model.state_dict()), epoch, score
        epoch, step = epoch + 1, 0
        checkpoint_now(epoch, step, np.zeros(2))

    # -- test once, with the best epoch's parameters; rank 0 exports and reports ----------------
    model.load_state_dict(best_state)
    test = evaluate_stream(model, plan, reader, TEST, ctx, config.eval_batch_size, config.eval_max_blocks)
    _info(config, ctx, f"{config.model} test (best epoch {best_epoch}): auc {test['auc']:.4f} gauc {test['gauc']:.4f} logloss {test['logloss']:.4f}")
    trained_all = int(all_reduce_sum(ctx, np.array([trained], np.int64))[0])
    rss = [float(r) for r in all_gather_object(ctx, peak_rss_mb())]
    result = DistTrainResult(
        bundle=None,
        model=config.model,
        metrics=test,
        validation=history,
        best_epoch=best_epoch,
        world=ctx.world,
        train_samples=trained_all,
        train_seconds=train_seconds,
        samples_per_second=trained_all / train_seconds if train_seconds > 0 else 0.0,
        peak_rss_mb=rss,
        global_steps=global_step,
        replica_checks=replica_checks,
        resumed_from=resumed_from,
        plan={"events": plan.events, "blocks": plan.num_blocks, "users": list(plan.users),
              "samples": [plan.num_samples(s) for s in (TRAIN, VALIDATION, TEST)], "fingerprint": plan.fingerprint},  # fmt: skip
    )
    bundle = None
    if ctx.is_main:
        if config.export:
            cpu_model = copy.deepcopy(model).cpu()
            exported = export_bundle(
                cpu_model,
                model_type=config.model,
                spec=plan.spec,
                vocabularies=plan.mappings,
                out_dir=config.out,
                data_fingerprint=plan.fingerprint,
                extra={
                    "model_config": cpu_model.config.to_json(),  # as built: din_dice records its Dice
                    "metrics": {"test": test, "validation": history[best_epoch - 1], "best_epoch": best_epoch},
                    "data_spec": config.data,
                    "train_config": config.to_json(),
                    "num_params": sum(p.numel() for p in model.parameters()),
                    "distributed": {"world": ctx.world, "backend": ctx.backend, "shards": config.shards},
                },
            )
            bundle = exported.bundle
            _info(config, ctx, f"bundle written: {bundle} (ONNX parity {exported.parity_max_abs_diff:.2g})")
        result.bundle = bundle
        report = {**result.to_json(), "config": config.to_json(), "device": str(ctx.device), "backend": ctx.backend}
        tmp = run_dir / f".{REPORT}.tmp"
        tmp.write_text(json.dumps(finite(report), indent=2, allow_nan=False))
        tmp.replace(run_dir / REPORT)
    result.bundle = broadcast_object(ctx, bundle)
    barrier(ctx)
    return result




# ---------------------------------------------------------------------------------------
# Launching: in this process, or N processes under torchrun.
def launch(
    config: DistTrainConfig, nproc: int = 1, *, spawn: bool = False, env: dict | None = None, timeout_s: float | None = None
) -> dict:
    """Run training with `nproc` processes and return rank 0's report (report.json's content).

    nproc == 1 trains in this process (unless `spawn`: benchmarks want a fresh process); more
    start `torchrun --standalone --nproc-per-node N -m model.train_dist` and wait for it. A
    failing run raises RuntimeError with its exit code.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc > config.shards:  # said now, not by every process after the data plan's pass over the log
        raise ValueError(f"{nproc} processes need at least as many data shards, got {config.shards}")
    if nproc == 1 and not spawn and config.crash_after_steps is None:
        result = train_dist(config)
        report = json.loads((config.run_path / REPORT).read_text())
        report["bundle"] = None if result.bundle is None else str(result.bundle)
        return report
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "model.train_dist", *config.to_argv()]  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)  # run this code base, whatever is installed
    run_env = {**os.environ, **(env or {})}
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, run_env.get("PYTHONPATH", "")) if p)
    run_env.setdefault("OMP_NUM_THREADS", str(config.threads or max(1, cores() // nproc)))
    run_env.setdefault("PYTHONFAULTHANDLER", "1")  # a native crash in a process prints its Python stack
    error_file = config.run_path / ERROR_FILE
    error_file.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=run_env, timeout=timeout_s, stdout=sys.stderr)  # our stdout stays for --json
    if proc.returncode != 0:
        if error_file.is_file():  # a refusal the processes explained (bad data, an incompatible resume, ...)
            raise RuntimeError(error_file.read_text().strip())
        raise RuntimeError(f"distributed training exited with code {proc.returncode} ({shutil.which('torchrun') or 'torchrun'} {nproc} processes)")
    return json.loads((config.run_path / REPORT).read_text())


def parse_args(argv: list[str] | None = None) -> DistTrainConfig:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m model.train_dist",
        description="Streamed, data-parallel DIN training with checkpoints (see the module docstring).",
    )
    for f in fields(DistTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata.get("help"))
        else:
            kind = _OPTIONAL_TYPES.get(f.name) or type(default)
            parser.add_argument(flag, type=kind, default=default, help=f.metadata.get("help"))
    try:
        return DistTrainConfig(**vars(parser.parse_args(argv)))
    except ValueError as e:  # a value the config refuses: argparse's one-line error, naming the flag
        names = "|".join(f.name for f in fields(DistTrainConfig))
        parser.error(re.sub(rf"(?<![-\w])({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), str(e), count=1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        result = train_dist(config)
    except (ValueError, FileNotFoundError) as e:  # what the user must fix (LogFormatError too): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        if rank == 0:  # `launch` raises it as the run's error
            config.run_path.mkdir(parents=True, exist_ok=True)
            (config.run_path / ERROR_FILE).write_text(str(e))
        return 2
    if rank == 0:
        print(json.dumps(finite({"bundle": None if result.bundle is None else str(result.bundle), "metrics": result.metrics,
                                  "samples_per_second": result.samples_per_second, "world": result.world})))  # fmt: skip
    return 0


if __name__ == "__main__":
    end_process(main())
