"""Dice, the data-adaptive activation of the paper (section 5.2, eq. 9-10):

    f(s) = p(s) * s + (1 - p(s)) * alpha * s,    p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))

E[s] and Var[s] are per feature (the last dimension). In training they are the statistics
of the mini-batch, over REAL positions only: padded history slots (mask False) would
otherwise pull the mean towards whatever the padding computes. Running averages of them
are kept (like batch norm), and `eval()` uses those, so an exported graph is element-wise
ops on frozen statistics. The variance is the biased one in both places, so a model whose
running statistics have converged on a batch scores that batch the same in both modes.
"""

from __future__ import annotations

import torch
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
        real position, 0 per padded one.
        """
        flat = s.reshape(-1, s.shape[-1])  # (M, C)
        if mask is None:
            weight = torch.full((flat.shape[0],), 1.0 / max(flat.shape[0], 1), dtype=s.dtype)  # (M,)
        else:
            if mask.shape != s.shape[:-1]:
                raise ValueError(f"Dice mask has shape {tuple(mask.shape)}, expected {tuple(s.shape[:-1])}")
            m = mask.reshape(-1).to(s.dtype)  # (M,)
            count = m.sum()
            if count.item() == 0:  # nothing real in the batch: keep the running statistics
                return self.running_mean, self.running_var
            weight = m / count  # (M,)
        mean = weight @ flat  # (C,)
        var = weight @ (flat - mean).square()  # (C,)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        return mean, var
