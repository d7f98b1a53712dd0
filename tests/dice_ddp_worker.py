"""One process of tests/test_dice.py's data-parallel check (started by torchrun, gloo).

Every case is one global batch of 4 users; process r trains Dice on its rows of it (the
`split` of the case; a process may get none) and saves its output, the gradient of its rows
and Dice's parameter gradient (summed over processes, as DDP would before averaging) and the
running statistics to OUT/<case>-rank<r>.npz. The test compares them with one process
holding the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.dice import Dice

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


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case, split in CASES.items():
        for masked in (True, False):
            np.savez(out / f"{case}-{'mask' if masked else 'flat'}-rank{rank}.npz", **run(split[rank], masked))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
