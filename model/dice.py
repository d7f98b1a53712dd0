"""Dice, the data-adaptive activation of the paper (section 5.2, eq. 9-10):

    f(s) = p(s) * s + (1 - p(s)) * alpha * s,    p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))

E[s] and Var[s] are per feature (the last dimension). In training they are the statistics
of the mini-batch, over REAL positions only: padded history slots (mask False) would
otherwise pull the mean towards whatever the padding computes. Running averages of them
are kept (like batch norm), and `eval()` uses those, so an exported graph is element-wise
ops on frozen statistics. The variance is the biased one in both places, so a model whose
running statistics have converged on a batch scores that batch the same in both modes.
A batch moves the running averages in proportion to its size (momentum * n / the most real
positions a batch has had): an epoch's short last batch, a handful of samples, would
otherwise weigh as much as a full one in the statistics every later score uses.

Data parallel (torchrun, model/train_dist.py): in training mode inside a process group of
more than one process, the statistics are those of the GLOBAL batch, as SyncBatchNorm's:
each process's masked sums (real positions, weighted sum, weighted squared deviations) are
summed over the processes by an autograd-aware all-reduce, so N processes train the model
one process trains on the same global batches. A process with an empty batch adds zeros;
one process alone makes no collective call and computes exactly what it did before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Dice(nn.Module):
    takes_mask = True  # MLP passes the (…) real-position mask along

    def __init__(self, channels: int, eps: float = 1e-8, momentum: float = 0.1, init: float = 0.25):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.full((channels,), init))  # like PReLU's slope
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        # the most real positions one batch has had (training state: checkpointed, so a resumed
        # run weighs its batches as the uninterrupted one does; unused by eval and the export)
        self.register_buffer("largest_batch", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before `largest_batch` existed: start it again from the next batch
        state_dict.setdefault(prefix + "largest_batch", torch.zeros((), device=self.largest_batch.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, s: Tensor, mask: Tensor | None = None) -> Tensor:
        """s (..., C), mask s.shape[:-1] bool (True = a real position) or None -> (..., C)."""
        if self.training:
            mean, var = self._batch_statistics(s, mask)  # (C,), (C,)
        else:
            mean, var = self.running_mean, self.running_var  # (C,)
        inv_std = torch.rsqrt(var + self.eps)  # (C,)
        p = torch.sigmoid(torch.addcmul(-mean * inv_std, s, inv_std))  # (..., C) = sigmoid((s - E[s]) / sd)
        # p s + (1 - p) alpha s = s (alpha + (1 - alpha) p)
        return s * torch.addcmul(self.alpha, p, 1.0 - self.alpha)

    def _batch_statistics(self, s: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-feature mean and (biased) variance over the real positions; updates the running averages.

        Masked sums as matrix-vector products (no gather of the real rows): a weight of 1 per
        real position, 0 per padded one. Under data-parallel training the sums are over the
        GLOBAL batch (`_all_processes`), so N processes train the model one process trains.
        """
        flat = s.reshape(-1, s.shape[-1])  # (M, C)
        if mask is not None and mask.shape != s.shape[:-1]:
            raise ValueError(f"Dice mask has shape {tuple(mask.shape)}, expected {tuple(s.shape[:-1])}")
        synced = _data_parallel()
        if mask is None:  # every position is real
            n = float(flat.shape[0])
            if synced:
                n = _all_processes(torch.tensor(n, dtype=s.dtype, device=s.device)).item()
            weight = torch.full((flat.shape[0],), 1.0 / max(n, 1.0), dtype=s.dtype, device=s.device)  # (M,)
        else:
            m = mask.reshape(-1).to(s.dtype)  # (M,)
            count = m.sum()
            if synced:
                count = _all_processes(count)
            n = count.item()
            weight = m / count  # (M,)
        if n == 0:  # nothing real in the (global) batch: keep the running statistics
            return self.running_mean, self.running_var
        mean = weight @ flat  # (C,)
        if synced:
            mean = _all_processes(mean)
        var = weight @ (flat - mean).square()  # (C,)
        if synced:
            var = _all_processes(var)
        with torch.no_grad():
            self.largest_batch.clamp_(min=n)
            momentum = self.momentum * n / float(self.largest_batch)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach(), momentum)
        return mean, var


def _data_parallel() -> bool:
    """Inside a process group of more than one process (torchrun, model/distributed.py)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_processes(partial: Tensor) -> Tensor:
    """Sum over the processes (autograd-aware, like SyncBatchNorm's): the global batch's statistic.

    Every process calls it, once per Dice layer and forward, in the same order, also with an
    empty batch (zeros: it adds nothing). The backward of a sum over processes is the sum of
    the gradients, so each process gets d(every process's loss) / d(its own part).
    """
    import torch.distributed._functional_collectives as funcol  # where torch.distributed.nn.functional now points

    return funcol.all_reduce(partial, "sum", dist.group.WORLD).wait()
