"""The embedding layer: one table per id field; a behaviour and an ad share one space.

Item and category embeddings are concatenated (the paper's `e_j` and `v_A`), so a
behaviour and a candidate ad are vectors of the same size D = embedding_dim * fields.
Row PAD_ROW is zero and never trained; the models still mask padding explicitly, so a
score never depends on what the padding row holds. Row UNK_ROW (ids the vocabulary has
never seen) also starts at zero: vocabularies are fitted on the training events, so no
training sample holds it and it keeps its start. At zero an unseen id adds nothing of its
own (an unseen ad is scored by its category and the user's history, the same way for
every seed) instead of a random vector.

Every table indexed by a field's rows is an `IdTable` that knows its field and the inputs
that index it: that is what the mini-batch aware regulariser (model/regularization.py)
walks over.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.contract import PAD_ROW, UNK_ROW, FeatureSpec, cand_input, hist_input, profile_input

INIT_STD = 0.05


class IdTable(nn.Embedding):
    """One row per id of `field` (rows PAD_ROW and UNK_ROW start at zero); `init_std` 0 = all zeros.

    `inputs` names the model inputs whose ids index it (model/contract.py), so that
    mini-batch aware regularisation penalises exactly the rows a batch uses: a field's
    embedding serves its histories and candidates alike, while lr's first-order weights
    keep "the ad is X" and "the history holds X" apart, in two tables of one input each.
    """

    def __init__(self, field: str, rows: int, dim: int, *, inputs: tuple[str, ...], init_std: float = INIT_STD):
        super().__init__(rows, dim, padding_idx=PAD_ROW)
        self.field = field
        self.inputs = inputs
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        else:
            nn.init.zeros_(self.weight)
        with torch.no_grad():
            self.weight[[PAD_ROW, UNK_ROW][:rows]] = 0.0


def history_mask(hist: dict[str, Tensor], sequence_fields: tuple[str, ...]) -> Tensor:
    """(U, T) bool: True on real behaviours; a slot is padding when its first field's row is PAD_ROW."""
    return hist[sequence_fields[0]] != PAD_ROW


def check_vocab_sizes(spec: FeatureSpec) -> None:
    missing = [f for f in (*spec.sequence_fields, *spec.profile_fields) if f not in spec.vocab_sizes]
    if missing:
        raise ValueError(f"feature spec has no vocabulary size for field(s) {missing}")


class FieldEmbeddings(nn.Module):
    def __init__(self, spec: FeatureSpec, dim: int):
        super().__init__()
        check_vocab_sizes(spec)
        self.sequence_fields = tuple(spec.sequence_fields)
        self.profile_fields = tuple(spec.profile_fields)
        self.tables = nn.ModuleDict(
            {f: IdTable(f, spec.vocab_sizes[f], dim, inputs=(hist_input(f), cand_input(f))) for f in self.sequence_fields}
            | {f: IdTable(f, spec.vocab_sizes[f], dim, inputs=(profile_input(f),)) for f in self.profile_fields}
        )
        self.dim = dim  # k, per field
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
        """(U, T) bool: True on real behaviours."""
        return history_mask(hist, self.sequence_fields)

    def per_field(self, x: Tensor) -> list[Tensor]:
        """(…, F * k) -> F tensors (…, k): a concatenation split back into its fields."""
        return list(x.split(self.dim, dim=-1))
