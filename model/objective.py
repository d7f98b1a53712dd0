"""The training objective of one mini-batch, the one both trainers use (model/train.py, model/train_dist.py).

    data loss   = mean_i BCE(logit_i, y_i)                  a whole batch (the in-memory trainer)
                = share * sum_i BCE(logit_i, y_i)           one process's part of a global batch
    regulariser = l2:  lambda * sum_{every row j} ||w_j||^2
                  mba: lambda * sum_{j in rows} ||w_j||^2 / n_j      (model/regularization.py)
    id dropout  : ids -> PAD_ROW in the inputs, before the forward (`drop`)

The optimiser (Adam) minimises the data loss; the regulariser takes its own plain gradient
step on the id tables after it (`regularize`), w_j <- w_j - lr * d(regulariser)/d(w_j): for
mba that is the paper's update (eq. 8), w_j <- w_j - lr * 2 lambda / n_j * w_j for the rows j
of the batch, and nothing for the others. Added to the loss instead, Adam would rescale it
per coordinate (a row whose gradient is mostly the penalty moves ~lr whatever its n_j) and
its momentum would keep shrinking rows in batches that do not hold them, which is not MBA;
decoupled as AdamW decouples weight decay, it is.

Data parallel (DDP averages the processes' gradients): with share = world / global batch the
data loss's averaged gradient is that of the global batch's mean. The regulariser's step is
taken by EVERY process on its replica and is the same on every process (l2 does not depend
on the batch; mba's `rows` are the union of all processes' rows, model/train_dist.py), so
the replicas stay identical. A process with no samples in a step adds the data loss of an
empty batch (0) and takes the same step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.contract import FeatureSpec
from model.regularization import (
    HashedCoins,
    RegularizationConfig,
    drop_ids,
    id_tables,
    l2_penalty,
    mba_penalty_on_rows,
    present_rows,
)


@dataclass(frozen=True)
class Objective:
    spec: FeatureSpec
    reg: RegularizationConfig
    counts: Mapping[str, Tensor] | None = None  # mba: float n_j per id input

    @classmethod
    def build(
        cls,
        spec: FeatureSpec,
        reg: RegularizationConfig,
        counts: Mapping[str, np.ndarray] | None = None,
        device: torch.device | str = "cpu",
    ) -> "Objective":
        """`counts`: n_j per id input (row occurrences, `id_counts`), needed by mba only."""
        if reg.kind != "mba":
            return cls(spec, reg)
        if counts is None:
            raise ValueError("--reg mba needs the n_j counts of every id input")
        return cls(spec, reg, {name: torch.from_numpy(c).float().to(device) for name, c in counts.items()})

    def drop(self, inputs: Mapping[str, Tensor], coins: torch.Generator | HashedCoins) -> Mapping[str, Tensor]:
        """The inputs the model trains on: ids dropped with --reg dropout, unchanged otherwise."""
        if self.reg.kind != "dropout":
            return inputs
        return drop_ids(self.spec, inputs, self.reg.id_dropout, coins)

    def rows(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """MBA's present rows of these inputs, per id input ({} for the other regularisers)."""
        return present_rows(self.spec, inputs) if self.reg.kind == "mba" else {}

    def __call__(self, logit: Tensor, label: Tensor, share: float | None = None) -> Tensor:
        """The data loss of one batch; `share` None: the batch mean, else sum * share."""
        if share is None:
            return F.binary_cross_entropy_with_logits(logit, label)
        return F.binary_cross_entropy_with_logits(logit, label, reduction="sum") * share

    def penalty(self, model: nn.Module, rows: Mapping[str, Tensor]) -> Tensor | None:
        """The regulariser's value on the bare module's id tables (None: no l2 / mba)."""
        if self.reg.kind == "l2":
            return l2_penalty(model, self.reg.lam)
        if self.reg.kind == "mba":
            return mba_penalty_on_rows(model, rows, self.counts, self.reg.lam)
        return None

    def regularize(self, model: nn.Module, rows: Mapping[str, Tensor], lr: float) -> None:
        """The regulariser's gradient step on the id tables, after the optimiser's step.

        `model` is the bare module (not its DDP wrapper); `rows` as for `penalty`.
        """
        penalty = self.penalty(model, rows)
        if penalty is None:
            return
        weights = [table.weight for table in id_tables(model)]
        grads = torch.autograd.grad(penalty, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.sub_(g, alpha=lr)
