"""One process of the data-parallel checks of tests/test_dice.py and tests/test_train_dist.py.

    torchrun --standalone --nproc-per-node 2 -m tests.ddp_worker dice OUT
    torchrun --standalone --nproc-per-node 2 -m tests.ddp_worker mba OUT RUN_DIR

`dice`: every case is one global batch of 4 users; process r trains Dice on its rows of it
(the `split` of the case; a process may get none) and saves its output, the gradient of its
rows, Dice's parameter gradient (summed over processes, as DDP sums before averaging) and
the running statistics. `mba`: each process takes its part of the first global step of a
saved stream plan and saves the gradient of the streamed trainer's MBA penalty. The tests
compare both with one process holding the whole batch (the same functions, called alone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.data.stream import LogReader, sample_counts, shard_layout
from model.data.stream_loader import process_batches
from model.data.stream_plan import StreamPlan
from model.dice import Dice
from model.distributed import distributed, end_process
from model.objective import Objective
from model.registry import build_model
from model.regularization import RegularizationConfig, id_tables
from model.train_dist import _global_rows, _named_on_device

# case -> rows of the global batch (4 users) per process
CASES = {"halves": ((0, 2), (2, 4)), "one_empty": ((0, 4), (4, 4)), "uneven": ((0, 1), (1, 4))}


def global_batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s (4, 6, 3), mask (4, 6), upstream gradient (4, 6, 3)): user 2 has no real behaviour."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(4, 6, 3, generator=g) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([0.5, -1.0, 2.0])
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 0, 1])[:, None]
    return s, mask, torch.randn(4, 6, 3, generator=g)


def run(rows: tuple[int, int], masked: bool) -> dict[str, np.ndarray]:
    """Dice forward and backward on rows [a, b) of the global batch (masked: (U, T, C); else (U*T, C))."""
    s, mask, upstream = global_batch()
    a, b = rows
    s, mask, upstream = s[a:b], mask[a:b], upstream[a:b]
    if not masked:
        s, upstream, mask = s.reshape(-1, 3), upstream.reshape(-1, 3), None
    s = s.clone().requires_grad_(True)
    dice = Dice(3).train()
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([-0.3, 0.2, 0.7]))
    out = dice(s, mask)
    (out * upstream).sum().backward()
    alpha_grad = dice.alpha.grad.clone()
    if dist.is_initialized():
        dist.all_reduce(alpha_grad)
    return {"out": out.detach().numpy(), "grad": s.grad.numpy(), "alpha_grad": alpha_grad.numpy(),
            "running_mean": dice.running_mean.numpy(), "running_var": dice.running_var.numpy()}  # fmt: skip


MBA_LAMBDA, MBA_SHARDS, MBA_BATCH = 0.3, 4, 64


def mba_gradient(run_dir: Path) -> dict[str, np.ndarray]:
    """The streamed trainer's MBA step at global step 0 of epoch 1, on this process's part.

    Alone (no process group) the process holds the whole global batch. Saved per field: the
    rows its own part uses, the table's weight and the regulariser's step on it with lr = 1
    (before - after: the penalty's gradient).
    """
    plan = StreamPlan.load(run_dir)
    with distributed("cpu") as ctx:
        layout = shard_layout(plan, 1, MBA_SHARDS, MBA_BATCH)
        batch = next(process_batches(plan, layout, rank=ctx.rank, world=ctx.world, epoch=1))
        torch.manual_seed(0)
        model = build_model("din", plan.spec, ModelConfig(embedding_dim=4))
        with torch.no_grad():
            for table in id_tables(model):
                table.weight.normal_()  # no zero rows: a zero step must come from absence
        objective = Objective.build(plan.spec, RegularizationConfig("mba", MBA_LAMBDA), sample_counts(plan, LogReader(plan)))
        local = objective.rows(_named_on_device(batch, ctx.device))
        before = {table.field: table.weight.detach().clone() for table in id_tables(model)}
        objective.regularize(model, _global_rows(ctx, local), lr=1.0)
        out = {}
        for table in id_tables(model):
            out[f"rows_{table.field}"] = np.union1d(*(local[name].numpy() for name in table.inputs))  # DIN: hist and cand
            out[f"weight_{table.field}"] = before[table.field].numpy()
            out[f"grad_{table.field}"] = (before[table.field] - table.weight.detach()).numpy()
        return out


def launch(kind: str, out: Path, *args: str) -> None:
    """Run `kind` in 2 gloo processes under torchrun (the tests' side); their files land in `out`."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # an abort shows each rank's stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tests.ddp_worker", kind, str(out), *args]
    proc = subprocess.run(cmd, cwd=root, env=env, timeout=180, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {kind} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")


def main(kind: str, out: Path, args: list[str]) -> None:
    if kind == "mba":
        np.savez(out / f"mba-rank{int(os.environ['RANK'])}.npz", **mba_gradient(Path(args[0])))
        return
    with distributed("cpu") as ctx:  # the trainer's process group (and its careful teardown)
        for case, split in CASES.items():
            for masked in (True, False):
                np.savez(out / f"{case}-{'mask' if masked else 'flat'}-rank{ctx.rank}.npz", **run(split[ctx.rank], masked))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
    end_process(0)  # as model/train_dist.py ends its workers
