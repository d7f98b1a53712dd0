"""The /rank codec: the fast decoder accepts exactly what pydantic accepts, with the same
values; the encoder writes the RankResponse schema with exact int64 ids."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from service.rank_codec import _fast, decode_rank_request, encode_rank_response, ranked_json
from service.schemas import RankRequest, RankResponse

BIG = 2**63 - 1
C = [{"item_id": 1, "cate_id": 2}]
BODIES = [
    {"user_id": 5, "candidates": [{"item_id": 2**53 + 1, "cate_id": -3}, {"item_id": BIG, "cate_id": -(2**63)}]},
    {"user_id": 5, "candidates": C, "top_k": 3},
    {"user_id": 5, "candidates": C, "top_k": None},
    {"user_id": 5, "candidates": C, "extra": [1, 2]},
    {"user_id": 5, "candidates": [{"item_id": 1, "cate_id": 2, "x": "y"}]},
    {"user_id": 5, "candidates": C, "top_k": 0},
    {"user_id": 5, "candidates": C, "top_k": True},
    {"user_id": 5, "candidates": C, "top_k": 2.0},
    {"user_id": True, "candidates": C},
    {"user_id": 2**63, "candidates": C},
    {"user_id": -(2**63) - 1, "candidates": C},
    {"user_id": 5.0, "candidates": C},
    {"user_id": "5", "candidates": C},
    {"user_id": 5, "candidates": []},
    {"user_id": 5, "candidates": {"item_id": 1, "cate_id": 2}},
    {"user_id": 5, "candidates": [[1, 2]]},
    {"user_id": 5, "candidates": [1]},
    {"user_id": 5, "candidates": [{"item_id": 1}]},
    {"user_id": 5, "candidates": [{"item_id": False, "cate_id": 2}]},
    {"user_id": 5, "candidates": [{"item_id": 1, "cate_id": 2.5}]},
    {"user_id": 5, "candidates": [{"item_id": 1, "cate_id": "2"}]},
    {"user_id": 5, "candidates": [{"item_id": 2**63, "cate_id": 2}]},
    {"user_id": 5, "candidates": [{"item_id": 1, "cate_id": None}]},
    {"user_id": 5, "candidates": [{"item_id": 1, "cate_id": None}, {"item_id": 2, "cate_id": 7}, {"item_id": 3}]},
    {"user_id": 5, "candidates": [{"item_id": 1}, {"item_id": 2, "cate_id": 2**63}]},
    {"user_id": 5, "candidates": [{"item_id": 1}, {"item_id": 2, "cate_id": True}]},
    {"user_id": 5, "candidates": [{"item_id": None, "cate_id": 1}]},
    {"user_id": 5, "candidates": C, "explain": True},
    {"user_id": 5, "candidates": [{"item_id": 1}], "explain": False, "top_k": 1},
    {"user_id": 5, "candidates": C, "explain": 1},
    {"user_id": 5, "candidates": C, "explain": None},
    {"user_id": 5, "candidates": C, "explain": "true"},
    {"candidates": C},
    {"user_id": 5},
    [1, 2],
    "text",
    None,
]
RAW = [b"", b"{not json", b'{"user_id": 5, "candidates": [{"item_id": 1, "cate_id": 2}]', b'{"user_id": 18446744073709551616, "candidates": []}']


def _pydantic(body: bytes):
    try:
        r = RankRequest.model_validate_json(body)
    except ValidationError:
        return None
    return r.user_id, [(c.item_id, c.cate_id) for c in r.candidates], r.top_k, r.explain


def _decoded(q) -> tuple:
    """A RankQuery in pydantic's terms: a category sent as null or not at all is None."""
    missing = q.missing.tolist() if q.missing is not None else [False] * q.num_candidates
    cates = [None if m else c for c, m in zip(q.cate_ids.tolist(), missing)]
    return q.user_id, list(zip(q.item_ids.tolist(), cates)), q.top_k, q.explain


@pytest.mark.parametrize("body", [json.dumps(b).encode() for b in BODIES] + RAW)
def test_fast_decoder_agrees_with_pydantic(body):
    want = _pydantic(body)
    fast = _fast(body)
    if want is None:
        assert fast is None  # never accepts what pydantic refuses
        with pytest.raises(ValidationError):
            decode_rank_request(body)
        return
    got = decode_rank_request(body)
    assert _decoded(got) == want
    assert got.item_ids.dtype == got.cate_ids.dtype == np.int64
    if fast is not None:
        assert _decoded(fast) == want


def test_the_common_request_takes_the_fast_path():
    assert _fast(json.dumps(BODIES[0]).encode()) is not None and _fast(json.dumps(BODIES[1]).encode()) is not None
    # optional categories and explain too
    q = _fast(json.dumps({"user_id": 5, "candidates": [{"item_id": 1}, {"item_id": 2, "cate_id": 9}, {"item_id": 3, "cate_id": None}], "explain": True}).encode())
    assert q is not None and q.explain
    assert q.missing.tolist() == [True, False, True] and q.cate_ids.tolist() == [0, 9, 0]
    assert _fast(json.dumps(BODIES[0]).encode()).missing is None  # every category sent: no mask


def test_unknown_categories_are_written_as_null():
    q = decode_rank_request(json.dumps({"user_id": 5, "candidates": [{"item_id": 1}, {"item_id": 2, "cate_id": 4}, {"item_id": 3}]}).encode())
    q = dataclasses.replace(q, cate_ids=np.array([-1, 4, 8], dtype=np.int64))  # item 1 unknown, item 3 resolved to 8
    ctr = np.array([0.5, 0.25, 0.75], dtype=np.float32)
    raw = encode_rank_response(model_version="m", user_id=5, history_length=0, degraded=False, query=q, ctr=ctr,
                               order=np.array([2, 0, 1]), unknown=np.array([True, False, False]))
    doc = orjson.loads(raw)
    RankResponse.model_validate(doc)
    assert doc["ranked"] == [{"item_id": 3, "cate_id": 8, "ctr": 0.75}, {"item_id": 1, "cate_id": None, "ctr": 0.5},
                             {"item_id": 2, "cate_id": 4, "ctr": 0.25}]


def test_encoded_response_matches_the_schema_and_keeps_int64_ids():
    q = decode_rank_request(json.dumps(BODIES[0]).encode())
    ctr = np.array([0.25, 0.75], dtype=np.float32)
    raw = encode_rank_response(model_version="din-1", user_id=5, history_length=7, degraded=True, query=q, ctr=ctr, order=np.array([1, 0]))
    doc = orjson.loads(raw)
    RankResponse.model_validate(doc)
    assert doc == {
        "model_version": "din-1", "user_id": 5, "history_length": 7, "degraded": True,
        "ranked": [{"item_id": BIG, "cate_id": -(2**63), "ctr": 0.75}, {"item_id": 2**53 + 1, "cate_id": -3, "ctr": 0.25}],
    }  # fmt: skip
    assert ranked_json(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)) == b"[]"


def test_ctr_round_trips_to_the_same_float32():
    ctr = np.random.default_rng(0).random(500).astype(np.float32)
    ids = np.arange(500, dtype=np.int64)
    doc = orjson.loads(ranked_json(ids, ids, ctr))
    np.testing.assert_array_equal(np.array([d["ctr"] for d in doc], dtype=np.float32), ctr)


def test_unknown_keys_take_the_pydantic_path():
    """A field the fast path does not know (e.g. one added to RankRequest later) is never dropped silently."""
    assert _fast(json.dumps({"user_id": 5, "candidates": C, "debug": True}).encode()) is None
    assert _fast(json.dumps({"user_id": 5, "candidates": [{"item_id": 1, "cate_id": 2, "bid": 3}]}).encode()) is None
    assert _fast(json.dumps({"user_id": 5, "candidates": [{"item_id": 1, "bid": 3}]}).encode()) is None  # no cate_id, one more key
    assert _fast(json.dumps({"user_id": 5, "candidates": [{"item_id": 1}, {"item_id": 2, "cate_id": None}], "explain": True}).encode()) is not None
