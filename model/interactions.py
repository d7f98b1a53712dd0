"""Second-order interactions between field vectors: PNN's inner-product layer and the FM term.

Both take the fields as one tensor v (N, F, k): F field vectors of size k per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_index(fields: int) -> Tensor:
    """Flat positions i * F + j of the pairs i < j in an (F, F) matrix, (F(F-1)/2,) int64.

    A constant built once (triu_indices has no ONNX export): models keep it as a buffer.
    """
    i, j = torch.triu_indices(fields, fields, offset=1)
    return i * fields + j


def inner_products(v: Tensor, pairs: Tensor) -> Tensor:
    """<v_i, v_j> for every field pair i < j (PNN's product layer): (N, F, k) -> (N, F(F-1)/2).

    `pairs` is pair_index(F).
    """
    f = v.shape[1]
    gram = torch.bmm(v, v.transpose(1, 2)).reshape(v.shape[0], f * f)  # (N, F*F)
    return gram.index_select(1, pairs)  # (N, F(F-1)/2)


def fm_interaction(v: Tensor) -> Tensor:
    """sum_{i<j} <v_i, v_j> (the FM's second order) = 1/2 sum_k ((sum_i v_i)^2 - sum_i v_i^2): (N, F, k) -> (N,)."""
    square_of_sum = v.sum(dim=1).pow(2)  # (N, k)
    sum_of_squares = v.pow(2).sum(dim=1)  # (N, k)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=-1)  # (N,)
