"""The training objective of one mini-batch, the one both trainers use (model/train.py, model/train_dist.py).

    loss = data loss + regulariser                          (model/regularization.py)
    data loss   = mean_i BCE(logit_i, y_i)                  a whole batch (the in-memory trainer)
                = share * sum_i BCE(logit_i, y_i)           one process's part of a global batch
    regulariser = l2:  lambda * sum_{every row j} ||w_j||^2
                  mba: lambda * sum_{j in rows} ||w_j||^2 / n_j
    id dropout  : ids -> PAD_ROW in the inputs, before the forward (`drop`)

Data parallel (DDP averages the processes' gradients): with share = world / global batch the
data loss's averaged gradient is that of the global batch's mean; the regulariser is added
at full weight by EVERY process and is the same on every process (l2 does not depend on the
batch; mba's `rows` are the union of all processes' rows, model/train_dist.py), so its
averaged gradient is exactly the 1-process one's. A process with no samples in a step adds
the data loss of an empty batch (0) and the same regulariser.
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

    def __call__(
        self, model: nn.Module, logit: Tensor, label: Tensor, rows: Mapping[str, Tensor], share: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """(loss to minimise, data loss) of one batch; `share` None: the batch mean, else sum * share.

        `model` is the bare module (not its DDP wrapper): the regulariser reads its id tables.
        """
        if share is None:
            data = F.binary_cross_entropy_with_logits(logit, label)
        else:
            data = F.binary_cross_entropy_with_logits(logit, label, reduction="sum") * share
        loss = data
        if self.reg.kind == "l2":
            loss = loss + l2_penalty(model, self.reg.lam)
        elif self.reg.kind == "mba":
            loss = loss + mba_penalty_on_rows(model, rows, self.counts, self.reg.lam)
        return loss, data
