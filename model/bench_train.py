"""Training benchmarks: samples/s with 1 and N processes, and peak memory on a 20M-event log.

`din bench train` times the streamed trainer (model/train_dist.py) on a synthetic log:
a fixed number of global steps of one epoch per process count, samples/s counted over the
training loop only (data reading and sample building included; the one-off planning pass,
evaluation and export excluded). The log is cached in the work directory.

`din bench train-memory` generates a large synthetic log (20M events by default, streamed
to Parquet in bounded memory), then trains on it in a fresh process: the full planning
pass over every event, `steps` training steps, and validation/test on the first
`eval_blocks` blocks; it reports that process's peak RSS. Memory does not grow with the
number of steps or evaluated blocks (everything is streamed), only time does.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from model.cpu import cores
from model.data.synthetic import DEFAULT_SYNTHETIC, SyntheticConfig, write_synthetic
from model.train_dist import REPORT, DistTrainConfig, launch

MEMORY_LIMIT_MB = 2048.0
_MEAN_EVENTS_PER_USER = sum(DEFAULT_SYNTHETIC.events_per_user) / 2


@dataclass(frozen=True)
class TrainBenchConfig:
    work_dir: Path
    users: int = 20_000  # synthetic users (about 30 events each)
    procs: tuple[int, ...] = (1, 2)
    model: str = "din"
    batch_size: int = 1024
    steps: int = 60  # timed global steps per run
    device: str = "cpu"
    workers: int = 0
    threads: int = 1  # torch threads per process (intra-op threads suffer most on a busy machine)
    seed: int = 0


def _log(work_dir: Path, synthetic: SyntheticConfig) -> Path:
    path = work_dir / f"synthetic-{synthetic.users}u-{synthetic.items}i-s{synthetic.seed}.parquet"
    if not path.is_file():
        write_synthetic(synthetic, path, chunk_users=4096)  # sorted by user and time; small row groups
    return path


def _versions() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": cores()}


def bench_train(config: TrainBenchConfig) -> dict:
    """Samples/s and peak RSS of `steps` DIN training steps with each process count in `procs`."""
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    synthetic = replace(DEFAULT_SYNTHETIC, users=config.users, seed=config.seed)
    path = _log(work, synthetic)
    runs = []
    for n in config.procs:
        train = DistTrainConfig(
            data=f"events:{path}", model=config.model, epochs=1, batch_size=config.batch_size, seed=config.seed,
            out=work / "bundles", run_dir=work / f"run-{n}proc", max_steps=config.steps, eval_max_blocks=1,
            export=False, progress=False, device=config.device, workers=config.workers, threads=config.threads,
        )  # fmt: skip
        report = launch(train, n, spawn=True)  # a fresh process each: comparable RSS and threads
        runs.append({
            "nproc": n,
            "samples_per_second": round(report["samples_per_second"], 1),
            "train_samples": report["train_samples"],
            "train_seconds": round(report["train_seconds"], 3),
            "threads_per_process": config.threads,
            "peak_rss_mb": round(max(report["peak_rss_mb"]), 1),
            "peak_rss_mb_per_process": [round(r, 1) for r in report["peak_rss_mb"]],
            "backend": report["backend"],
            "device": report["device"],
        })  # fmt: skip
    base = runs[0]["samples_per_second"]
    for r in runs:
        r["speedup"] = round(r["samples_per_second"] / base, 3) if base else None
    return {
        "benchmark": "train",
        "model": config.model,
        "data": {"synthetic_users": synthetic.users, "items": synthetic.items, "log": str(path)},
        "batch_size": config.batch_size,
        "steps": config.steps,
        "runs": runs,
        **_versions(),
        "command": f"din bench train --users {config.users} --procs {','.join(map(str, config.procs))} "
        f"--steps {config.steps} --batch-size {config.batch_size} --threads {config.threads} --device {config.device} --json",
    }


@dataclass(frozen=True)
class MemoryBenchConfig:
    work_dir: Path
    events: int = 20_000_000
    items: int = 200_000
    categories: int = 1_000
    steps: int = 200
    batch_size: int = 1024
    eval_blocks: int = 8
    keep_log: bool = False
    extra: dict = field(default_factory=dict)  # more DistTrainConfig fields, e.g. hash_buckets


def bench_train_memory(config: MemoryBenchConfig, progress: bool = True) -> dict:
    """Generate a log of about `events` events, train on it in a fresh process, report its peak RSS."""
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    users = max(1, int(round(config.events / _MEAN_EVENTS_PER_USER)))
    synthetic = replace(DEFAULT_SYNTHETIC, users=users, items=config.items, categories=config.categories)
    path = work / f"synthetic-{users}u.parquet"
    t0 = time.perf_counter()
    if not path.is_file():
        write_synthetic(synthetic, path, chunk_users=4096, progress=progress)
    generate_seconds = time.perf_counter() - t0
    train = DistTrainConfig(
        data=f"events:{path}", epochs=1, batch_size=config.batch_size, out=work / "bundles", run_dir=work / "run",
        max_steps=config.steps, eval_max_blocks=config.eval_blocks, export=False, progress=progress, device="cpu",
        threads=1, **config.extra,
    )  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "model.train_dist", *train.to_argv()], env=env, stdout=subprocess.DEVNULL)
    train_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the training process exited with code {proc.returncode}")
    report = json.loads((train.run_path / REPORT).read_text())
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    peak = max(report["peak_rss_mb"])
    out = {
        "benchmark": "train-memory",
        "events": report["plan"]["events"],
        "blocks": report["plan"]["blocks"],
        "users": sum(report["plan"]["users"]),
        "log_bytes": path.stat().st_size,
        "generate_seconds": round(generate_seconds, 1),
        "train_process_seconds": round(train_wall, 1),
        "train_steps": report["global_steps"],
        "train_samples": report["train_samples"],
        "samples_per_second": round(report["samples_per_second"], 1),
        "peak_rss_mb": round(peak, 1),
        "largest_child_peak_rss_mb": round(children_peak, 1),
        "limit_mb": MEMORY_LIMIT_MB,
        "under_limit": peak < MEMORY_LIMIT_MB,
        **_versions(),
        "command": f"din bench train-memory --events {config.events} --steps {config.steps} --eval-blocks {config.eval_blocks}",
    }
    if not config.keep_log:
        path.unlink(missing_ok=True)
    return out
