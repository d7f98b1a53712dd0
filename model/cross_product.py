"""Wide&Deep's wide part as the DIN paper sets it up: cross products of the user's behaviours with the ad.

    wide = sum_f sum_j w_f[cross(behaviour_j,f, ad_f)]        (real behaviours j only)

One weight per (behaviour id, candidate id) pair of the same field: "user rated movie X
and the candidate is movie Y" (item x item) and the same for categories. The pair id is
exact, `b * V_f + a`; when V_f^2 exceeds `buckets` it is hashed as `(b * V_f + a) mod
buckets` (buckets a prime). Int64 arithmetic end to end, so the ONNX graph computes the
same rows. These weights are cross features, not ids of a field: the id regularisers
(model/regularization.py) leave them alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.contract import FeatureSpec


class CrossProductWide(nn.Module):
    def __init__(self, spec: FeatureSpec, buckets: int):
        super().__init__()
        self.sequence_fields = tuple(spec.sequence_fields)
        self.vocab = {f: int(spec.vocab_sizes[f]) for f in self.sequence_fields}
        self.rows = {f: min(v * v, buckets) for f, v in self.vocab.items()}
        self.tables = nn.ModuleDict({f: nn.Embedding(self.rows[f], 1) for f in self.sequence_fields})
        for table in self.tables.values():
            nn.init.zeros_(table.weight)

    def cross_rows(self, field: str, hist_rows: Tensor, cand_rows: Tensor) -> Tensor:
        """hist_rows (N, T), cand_rows (N,) -> (N, T) int64 rows of the cross table."""
        pair = hist_rows * self.vocab[field] + cand_rows.unsqueeze(1)  # (N, T) exact pair id
        return torch.remainder(pair, self.rows[field])  # identity when V^2 <= buckets

    def forward(self, hist: dict[str, Tensor], cand: dict[str, Tensor], cand_user: Tensor, mask: Tensor) -> Tensor:
        """mask (U, T) real behaviours -> wide logit (N,)."""
        m = mask.index_select(0, cand_user).to(torch.float32)  # (N, T)
        wide = torch.zeros_like(m[:, 0])  # (N,)
        for f in self.sequence_fields:
            rows = self.cross_rows(f, hist[f].index_select(0, cand_user), cand[f])  # (N, T)
            wide = wide + (self.tables[f](rows).squeeze(-1) * m).sum(dim=1)  # (N,)
        return wide
