"""The embedding layer: one table per id field; a behaviour and an ad share one space.

Item and category embeddings are concatenated (the paper's `e_j` and `v_A`), so a
behaviour and a candidate ad are vectors of the same size D = embedding_dim * fields.
Row PAD_ROW is zero and never trained; the models still mask padding explicitly, so a
score never depends on what the padding row holds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.contract import PAD_ROW, FeatureSpec

INIT_STD = 0.05


class FieldEmbeddings(nn.Module):
    def __init__(self, spec: FeatureSpec, dim: int):
        super().__init__()
        missing = [f for f in (*spec.sequence_fields, *spec.profile_fields) if f not in spec.vocab_sizes]
        if missing:
            raise ValueError(f"feature spec has no vocabulary size for field(s) {missing}")
        self.sequence_fields = tuple(spec.sequence_fields)
        self.profile_fields = tuple(spec.profile_fields)
        self.tables = nn.ModuleDict()
        for f in (*self.sequence_fields, *self.profile_fields):
            table = nn.Embedding(spec.vocab_sizes[f], dim, padding_idx=PAD_ROW)
            nn.init.normal_(table.weight, std=INIT_STD)
            with torch.no_grad():
                table.weight[PAD_ROW].zero_()
            self.tables[f] = table
        self.behaviour_dim = dim * len(self.sequence_fields)  # D
        self.profile_dim = dim * len(self.profile_fields)  # P

    def behaviours(self, hist: dict[str, Tensor]) -> Tensor:
        """e_j for every history slot: (U, T) rows per field -> (U, T, D)."""
        return torch.cat([self.tables[f](hist[f]) for f in self.sequence_fields], dim=-1)

    def ads(self, cand: dict[str, Tensor]) -> Tensor:
        """v_A for every candidate: (N,) rows per field -> (N, D)."""
        return torch.cat([self.tables[f](cand[f]) for f in self.sequence_fields], dim=-1)

    def profile(self, profile: dict[str, Tensor]) -> Tensor:
        """(U,) rows per profile field -> (U, P); call only when there are profile fields."""
        return torch.cat([self.tables[f](profile[f]) for f in self.profile_fields], dim=-1)

    def mask(self, hist: dict[str, Tensor]) -> Tensor:
        """(U, T) bool: True on real behaviours; a slot is padding when its item row is PAD_ROW."""
        return hist[self.sequence_fields[0]] != PAD_ROW
