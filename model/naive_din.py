"""DIN scored the way public model zoos score it: the history repeated for every candidate.

The benchmark's baseline (`din bench scoring`: torch_eager_naive, and onnx_naive = this
exported as it is). Same weights and the same function as model/din.py; only the
evaluation order differs: each candidate is a sample carrying its own copy of the
history ids (as a model zoo's data pipeline builds them), every (candidate, behaviour)
pair builds the full [e, v, e - v, e * v] row (4D wide) and runs the whole attention MLP
on it, so the first layer costs 4x the pair work of the split in model/attention.py, and
the user side is recomputed per candidate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NaiveDIN(nn.Module):
    has_attention = True

    def __init__(self, din: nn.Module):
        super().__init__()
        self.din = din

    def forward(
        self,
        hist: dict[str, Tensor],
        profile: dict[str, Tensor],
        cand: dict[str, Tensor],
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """-> (logit (N,), attention (N, T)), as DIN.forward."""
        din = self.din
        att = din.attention
        hist_n = {f: rows.index_select(0, cand_user) for f, rows in hist.items()}  # (N, T): one sample per candidate
        keys = din.embed.behaviours(hist_n)  # (N, T, D): the history embedded again for every candidate
        mask = din.embed.mask(hist_n)  # (N, T)
        v_a = din.embed.ads(cand)  # (N, D)
        queries = v_a.unsqueeze(1).expand_as(keys)  # (N, T, D)
        x = torch.cat([keys, queries, keys - queries, keys * queries], dim=-1)  # (N, T, 4D)
        w = att.rest(att.first_act(att.first(x))).squeeze(-1)  # (N, T)
        if att.softmax:
            w = w.masked_fill(~mask, -1e9).softmax(dim=-1)
        w = w.masked_fill(~mask, 0.0)  # (N, T)
        v_u = (w.unsqueeze(-1) * keys).sum(dim=1)  # (N, D)
        parts = [v_u, v_a]
        if din.embed.profile_fields:
            parts.insert(0, din.embed.profile(profile).index_select(0, cand_user))  # (N, P)
        logit = din.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (N,)
        return logit, w
