"""Sum pooling of a user's behaviours (the BaseModel's), and the all-zero attention of models without one."""

from __future__ import annotations

import torch
from torch import Tensor


def sum_pool(e: Tensor, mask: Tensor) -> Tensor:
    """v_U = sum_j e_j over real slots: e (U, T, D), mask (U, T) -> (U, D)."""
    return (e * mask.unsqueeze(-1).to(e.dtype)).sum(dim=1)


def zero_attention(mask: Tensor, cand_user: Tensor) -> Tensor:
    """(N, T) float32 zeros: the contract's attention output for a model that has none."""
    return torch.zeros_like(mask.index_select(0, cand_user), dtype=torch.float32)
