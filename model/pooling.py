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


def pooled_input(embed, hist: dict[str, Tensor], profile: dict[str, Tensor], cand: dict[str, Tensor],
                 cand_user: Tensor) -> tuple[Tensor, Tensor]:
    """The Embedding & MLP input per candidate, [profile, v_U, v_A] (N, P + 2D), and the (U, T) mask.

    Shared by the BaseModel and the baselines built on it (Wide&Deep, PNN, DeepFM): the user
    part (profile, v_U = sum_j e_j) is computed once per user, then gathered per candidate.
    `embed` is the model's FieldEmbeddings.
    """
    e = embed.behaviours(hist)  # (U, T, D)
    mask = embed.mask(hist)  # (U, T)
    user = sum_pool(e, mask)  # (U, D)
    if embed.profile_fields:
        user = torch.cat([embed.profile(profile), user], dim=-1)  # (U, P + D)
    return torch.cat([user.index_select(0, cand_user), embed.ads(cand)], dim=-1), mask  # (N, P + 2D)
