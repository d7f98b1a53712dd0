"""LR: logistic regression over the same id features, the behaviours as a bag.

    ctr = sigmoid(w_0 + sum_f w_f[ad_f] + sum_p w_p[profile_p] + sum_f sum_j h_f[behaviour_j,f])

No interaction between the user and the ad: within one user, candidates are ranked by their
own weights alone (a popularity-like ranking). The paper's weakest baseline.
"""

from __future__ import annotations

from torch import Tensor, nn

from model.config import ModelConfig
from model.contract import FeatureSpec
from model.embedding import history_mask
from model.linear_terms import LinearTerms
from model.pooling import zero_attention


class LogisticRegression(nn.Module):
    has_attention = False

    def __init__(self, spec: FeatureSpec, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.sequence_fields = tuple(spec.sequence_fields)
        self.linear = LinearTerms(spec)

    def forward(
        self,
        hist: dict[str, Tensor],
        profile: dict[str, Tensor],
        cand: dict[str, Tensor],
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """-> (logit (N,), attention (N, T) of zeros)."""
        mask = history_mask(hist, self.sequence_fields)  # (U, T)
        logit = self.linear(hist, profile, cand, cand_user, mask)  # (N,)
        return logit, zero_attention(mask, cand_user)
