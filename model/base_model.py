"""BaseModel (the paper's Embedding & MLP baseline): sum pooling, the same for every ad.

    v_U    = sum_j e_j                        (padding masked out)
    ctr    = sigmoid(MLP([profile, v_U, v_A]))

The pooled vector is computed once per user and does not depend on the candidate; that is
exactly the limitation DIN's local activation removes.
"""

from __future__ import annotations

from torch import Tensor, nn

from model.activation import activation_factory
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.embedding import FieldEmbeddings
from model.mlp import MLP
from model.pooling import pooled_input, zero_attention


class BaseModel(nn.Module):
    has_attention = False

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.embed = FieldEmbeddings(spec, config.embedding_dim)
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
        # embed, and pool v_U = sum_j e_j once per user: [profile, v_U, v_A] per candidate
        x, mask = pooled_input(self.embed, hist, profile, cand, cand_user)  # (N, P + 2D)
        # mlp -> logit
        logit = self.mlp(x).squeeze(-1)  # (N,)
        return logit, zero_attention(mask, cand_user)
