"""First-order terms: one weight per id, the behaviours as a bag (logistic regression's model).

    linear = w_0 + sum_f w_f[ad_f] + sum_p w_p[profile_p] + sum_f sum_j h_f[behaviour_j,f]

"The candidate is item X" and "the history holds item X" are different features, so an
ad weight and a behaviour weight of the same id live in different tables (`ad`, `bag`).
Used alone by `lr`, and as DeepFM's first-order part.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.contract import FeatureSpec, cand_input, hist_input, profile_input
from model.embedding import IdTable, check_vocab_sizes


class LinearTerms(nn.Module):
    def __init__(self, spec: FeatureSpec):
        super().__init__()
        check_vocab_sizes(spec)
        self.sequence_fields = tuple(spec.sequence_fields)
        self.profile_fields = tuple(spec.profile_fields)
        table = lambda f, input: IdTable(f, spec.vocab_sizes[f], 1, inputs=(input,), init_std=0)  # noqa: E731
        self.ad = nn.ModuleDict({f: table(f, cand_input(f)) for f in self.sequence_fields})
        self.bag = nn.ModuleDict({f: table(f, hist_input(f)) for f in self.sequence_fields})
        self.user = nn.ModuleDict({f: table(f, profile_input(f)) for f in self.profile_fields})
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        hist: dict[str, Tensor],
        profile: dict[str, Tensor],
        cand: dict[str, Tensor],
        cand_user: Tensor,
        mask: Tensor,
    ) -> Tensor:
        """mask (U, T) real behaviours -> linear logit (N,)."""
        m = mask.to(torch.float32)  # (U, T)
        user = sum((self.bag[f](hist[f]).squeeze(-1) * m).sum(dim=1) for f in self.sequence_fields)  # (U,)
        for f in self.profile_fields:
            user = user + self.user[f](profile[f]).squeeze(-1)  # (U,)
        ad = sum(self.ad[f](cand[f]).squeeze(-1) for f in self.sequence_fields)  # (N,)
        return self.bias + user.index_select(0, cand_user) + ad  # (N,)
