"""PNN (inner-product PNN, Qu et al. 2016): a product layer between the embeddings and the MLP.

    fields = [profile_1..P, sum_j e_j (per field), v_A (per field)]    each (N, k)
    ctr    = sigmoid(MLP([fields..., <f_i, f_j> for i < j]))

The BaseModel plus explicit pairwise interactions: "the user's pooled items" x "the
candidate item" etc. are inner products the MLP gets for free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.activation import activation_factory
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.embedding import FieldEmbeddings
from model.interactions import inner_products, pair_index
from model.mlp import MLP
from model.pooling import pooled_input, zero_attention


class PNN(nn.Module):
    has_attention = False

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.embed = FieldEmbeddings(spec, config.embedding_dim)
        n_fields = len(spec.profile_fields) + 2 * len(spec.sequence_fields)
        in_dim = n_fields * config.embedding_dim + n_fields * (n_fields - 1) // 2
        self.mlp = MLP(in_dim, config.mlp_hidden, out_dim=1, activation=activation_factory(config.activation))
        self.register_buffer("pairs", pair_index(n_fields), persistent=False)  # (F(F-1)/2,)

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
        # product layer: every pair of field vectors
        v = torch.stack(self.embed.per_field(x), dim=1)  # (N, F, k)
        products = inner_products(v, self.pairs)  # (N, F(F-1)/2)
        # mlp -> logit
        logit = self.mlp(torch.cat([x, products], dim=-1)).squeeze(-1)  # (N,)
        return logit, zero_attention(mask, cand_user)
