"""DeepFM (Guo et al. 2017): an FM replaces Wide&Deep's hand-made wide part; one embedding for both.

    fields = [profile_1..P, sum_j e_j (per field), v_A (per field)]    each (N, k)
    logit  = linear(ids)  +  sum_{i<j} <f_i, f_j>  +  MLP([fields...])

`linear` is logistic regression's first-order terms (model/linear_terms.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.activation import activation_factory
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.embedding import FieldEmbeddings
from model.interactions import fm_interaction
from model.linear_terms import LinearTerms
from model.mlp import MLP
from model.pooling import pooled_input, zero_attention


class DeepFM(nn.Module):
    has_attention = False

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.embed = FieldEmbeddings(spec, config.embedding_dim)
        self.linear = LinearTerms(spec)
        d, p = self.embed.behaviour_dim, self.embed.profile_dim
        self.mlp = MLP(p + 2 * d, config.mlp_hidden, out_dim=1, activation=activation_factory(config.activation))

    def forward(
        self,
        hist: dict[str, Tensor],
        profile: dict[str, Tensor],
        cand: dict[str, Tensor],
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """-> (logit (N,), attention (N, T) of zeros)."""
        # embed and pool, as the BaseModel
        x, mask = pooled_input(self.embed, hist, profile, cand, cand_user)  # (N, F * k)
        # first order + FM second order + deep
        linear = self.linear(hist, profile, cand, cand_user, mask)  # (N,)
        fm = fm_interaction(torch.stack(self.embed.per_field(x), dim=1))  # (N,)
        deep = self.mlp(x).squeeze(-1)  # (N,)
        return linear + fm + deep, zero_attention(mask, cand_user)
