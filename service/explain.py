"""Explain a ranking: the attention of each returned candidate over the user's behaviours.

DIN's local activation (the paper's Figure 5) for a live request. The graph already
returns `attention [N, T]` on every call; the scorer cuts the padding columns off
(`Scored.attention` is (n, history_length)), so explaining costs no extra graph run, only
the bytes of the answer. That is why it is opt-in (`"explain": true`) and bounded: the
returned candidates times the model's `max_history` must stay within MAX_EXPLAIN_CELLS.
The bound uses max_history, not the user's actual history, so whether a request is
accepted never depends on whose history it is.

Weights are float32 and travel as the shortest decimal that reads back as the same
float32 (orjson's numpy path), so the answer is about half the size of float64 text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from feature_store.records import UserHistory
from service.scorer import Scored

MAX_EXPLAIN_CELLS = "MAX_EXPLAIN_CELLS"


def explain_limit_error(returned: int, max_history: int, limit: int) -> dict[str, Any] | None:
    """A 422 error item when explaining `returned` candidates could exceed `limit` cells, else None."""
    cells = returned * max_history
    if cells <= limit:
        return None
    fit = limit // max_history
    advice = (
        f"set top_k (at most {fit}) or send fewer candidates"
        if fit
        else f"not even one candidate fits: the service must raise {MAX_EXPLAIN_CELLS} to at least {max_history}"
    )
    return {
        "loc": ["body", "explain"],
        "msg": (
            f"explain returns candidates x history weights: {returned} candidates x max_history {max_history} "
            f"= {cells} is above {MAX_EXPLAIN_CELLS}={limit}; {advice}"
        ),
        "type": "too_large",
        "ctx": {"setting": MAX_EXPLAIN_CELLS, "limit": limit, "cells": cells},
    }


def _floats32(row: np.ndarray) -> orjson.Fragment:
    """A float32 row as a ready JSON array (shortest round-trip decimals)."""
    row = np.ascontiguousarray(row, dtype=np.float32)
    return orjson.Fragment(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))


def add_explanation(
    response: dict[str, Any],
    scored: Scored,
    order: np.ndarray,
    history: UserHistory | None,
    has_attention: bool,
) -> None:
    """Add `history`, `attention_available` and each ranked candidate's `attention` to `response`.

    `response["ranked"]` is in `order` (indices into the request's candidates); `history`
    is what the scorer saw (None: unknown user or degraded, i.e. history_length 0). A model
    without attention gets `attention_available: false` and no weights, never zeros.
    """
    t = scored.history_length
    response["history"] = []
    if history is not None and t > 0:
        recs = history.records[:t]  # the behaviours the scorer used, newest first
        response["history"] = [
            {"item_id": i, "cate_id": c, "timestamp": s}
            for i, c, s in zip(recs["item_id"].tolist(), recs["cate_id"].tolist(), recs["timestamp"].tolist())
        ]
    response["attention_available"] = has_attention
    if not has_attention:
        return
    weights = scored.attention[order]  # (k, T): ranked order, padding columns already removed
    if weights.shape[1] != t:
        raise ValueError(f"attention has {weights.shape[1]} columns for a history of {t}")
    for item, row in zip(response["ranked"], weights):
        item["attention"] = _floats32(row)
