"""DIN: the user's interest is a candidate-weighted sum of their behaviours.

    v_U(A) = sum_j a(e_j, v_A) * e_j          (paper, eq. 3)
    ctr    = sigmoid(MLP([profile, v_U(A), v_A]))

User-batched: each user's history is embedded once (U rows) and gathered per candidate
with `cand_user`; the attention is per (candidate, behaviour) by definition, but its
user-only part is computed once per user too (model/attention.py).

`DINDice` is the same network with Dice instead of PReLU in both MLPs (the attention
unit's and the CTR tower's), as the paper's "DIN with Dice".
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from model.activation import activation_factory
from model.attention import LocalActivationUnit
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.embedding import FieldEmbeddings
from model.mlp import MLP


class DIN(nn.Module):
    has_attention = True

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.embed = FieldEmbeddings(spec, config.embedding_dim)
        d, p = self.embed.behaviour_dim, self.embed.profile_dim
        act = activation_factory(config.activation)
        self.attention = LocalActivationUnit(d, config.attention_hidden, config.attention_softmax, activation=act)
        self.mlp = MLP(p + 2 * d, config.mlp_hidden, out_dim=1, activation=act)

    def forward(
        self,
        hist: dict[str, Tensor],
        profile: dict[str, Tensor],
        cand: dict[str, Tensor],
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """-> (logit (N,), attention (N, T))."""
        # embed: the user side once per user, the ads once per candidate
        e = self.embed.behaviours(hist)  # (U, T, D)
        mask = self.embed.mask(hist)  # (U, T)
        v_a = self.embed.ads(cand)  # (N, D)
        # attend: a(e_j, v_A) for every candidate and each of its user's behaviours
        w = self.attention(e, v_a, cand_user, mask)  # (N, T)
        # pool: v_U(A) = sum_j a(e_j, v_A) e_j
        v_u = (w.unsqueeze(-1) * e.index_select(0, cand_user)).sum(dim=1)  # (N, D)
        # mlp -> logit
        parts = [v_u, v_a]
        if self.embed.profile_fields:
            parts.insert(0, self.embed.profile(profile).index_select(0, cand_user))  # (N, P)
        logit = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (N,)
        return logit, w


class DINDice(DIN):
    """DIN with Dice (paper, section 5.2) in the attention unit and the CTR MLP."""

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__(spec, replace(config, activation="dice"))
