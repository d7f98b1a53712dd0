"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model's state (parameters and buffers: Dice's running statistics
are buffers), the optimiser's state, the data position (the epoch and global step to
continue from; model/data/stream.py turns it into what each shard skips), the validation
history and best state so far, and every process's RNG states. Rank 0 writes it to
`<run>/checkpoints/step-<global step>.pt` atomically (temp file, then rename), so a run
killed mid-write still has its previous checkpoint; the newest `keep` are kept.

The files are pickles written by this trainer (`torch.load(weights_only=False)`): load only
checkpoints of your own runs.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, global_step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `global_step` (atomic), then drop all but the newest `keep`."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{global_step:010d}.pt"
    tmp = d / f".{final.name}.tmp"
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    return state


def clear_checkpoints(run_dir: Path) -> int:
    """Remove a run's checkpoints (a new run in the same directory); returns how many."""
    found = list_checkpoints(run_dir)
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: torch (CPU and its CUDA device), numpy's global, Python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
