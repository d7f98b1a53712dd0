"""Wide&Deep: a linear model over cross features next to the BaseModel's deep tower.

    logit = wide(cross products of behaviours x ad)  +  MLP([profile, sum_j e_j, v_A])

The deep part is exactly the BaseModel; the wide part (model/cross_product.py) is what the
DIN paper feeds it: cross products of the user's behaviours with the candidate.
"""

from __future__ import annotations

from torch import Tensor, nn

from model.activation import activation_factory
from model.config import ModelConfig
from model.contract import FeatureSpec
from model.cross_product import CrossProductWide
from model.embedding import FieldEmbeddings
from model.mlp import MLP
from model.pooling import pooled_input, zero_attention


class WideDeep(nn.Module):
    has_attention = False

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.embed = FieldEmbeddings(spec, config.embedding_dim)
        d, p = self.embed.behaviour_dim, self.embed.profile_dim
        self.mlp = MLP(p + 2 * d, config.mlp_hidden, out_dim=1, activation=activation_factory(config.activation))
        self.wide = CrossProductWide(spec, config.wide_buckets)

    def forward(
        self,
        hist: dict[str, Tensor],
        profile: dict[str, Tensor],
        cand: dict[str, Tensor],
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """-> (logit (N,), attention (N, T) of zeros)."""
        # deep: the BaseModel
        x, mask = pooled_input(self.embed, hist, profile, cand, cand_user)  # (N, P + 2D)
        deep = self.mlp(x).squeeze(-1)  # (N,)
        # wide: cross products of the behaviours with the ad
        wide = self.wide(hist, cand, cand_user, mask)  # (N,)
        return wide + deep, zero_attention(mask, cand_user)
