"""POST /rank: parse, fetch the user's history, score every candidate once, sort, answer.

The body is parsed with `RankRequest.model_validate_json` on the raw bytes (pydantic's
fast path) and the answer serialised with orjson into a plain Response; the OpenAPI
document still shows both models (see `openapi_extra` and `REQUEST_SCHEMAS`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from feature_store.records import UserHistory
from service.ad_features import resolve_categories
from service.deps import ScorerDep, SettingsDep, StoreDep
from service.explain import add_explanation, explain_limit_error
from service.schemas import (
    RankRequest,
    RankResponse,
    ValidationErrorBody,
    too_large_error,
    too_long_error,
)
from service.scorer import RankInput, Scorer, rank_order
from service.store_guard import StoreCallFailed

log = logging.getLogger(__name__)
router = APIRouter(tags=["ranking"])

# Models the route parses by hand; service/app.py adds them to the OpenAPI components.
REQUEST_SCHEMAS = (RankRequest,)
JSON = "application/json"


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, default=str), status_code=status_code, media_type=JSON, headers=headers)


def validation_error_response(errors: list[dict[str, Any]]) -> Response:
    """422 in FastAPI's shape: each error names its field (`loc`) and the limit (`ctx`)."""
    return json_response({"detail": errors}, status_code=422)


def _pydantic_errors(e: ValidationError) -> list[dict[str, Any]]:
    out = []
    for err in e.errors(include_url=False, include_input=False):
        item = {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
        if "ctx" in err:
            item["ctx"] = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in err["ctx"].items()}
        out.append(item)
    return out


async def fetch_history(request: Request, store, user_id: int, timeout_s: float) -> tuple[UserHistory | None, bool]:
    """(history or None for an unknown user, degraded). A failing store never fails the request.

    The call goes through the app's StoreGuard (deadline `timeout_s`, circuit breaker,
    metrics): when the breaker is open the store is not even tried.
    """
    metrics = request.app.state.metrics
    if store is None:
        metrics.degraded_responses.labels("no_store").inc()
        return None, True
    try:
        (history,) = await request.app.state.store_guard.call(
            "get_histories", lambda: store.get_histories([user_id]), timeout_s=timeout_s
        )
    except StoreCallFailed as e:  # unreachable, slow or broken store: rank without history
        metrics.degraded_responses.labels(e.reason).inc()
        return None, True
    return history, False


def to_rank_input(scorer: Scorer, history: UserHistory | None, profile_fields, item_ids, cate_ids) -> RankInput:
    spec = scorer.bundle.spec
    if history is None:
        hist: dict[str, np.ndarray] = {}
        profile: dict[str, int] = {}
    else:
        recs = history.records[: spec.max_history]
        hist = {f: recs[f] for f in spec.sequence_fields}
        profile = dict(zip(profile_fields, history.profile.tolist()))
    return RankInput(history=hist, profile=profile, candidates={"item_id": item_ids, "cate_id": cate_ids})


@router.post(
    "/rank",
    response_model=RankResponse,
    summary="Rank candidate ads for one user by predicted CTR",
    responses={422: {"model": ValidationErrorBody, "description": "The request names a bad field or breaks a limit"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
        }
    },
)
async def rank(request: Request, scorer: ScorerDep, store: StoreDep, settings: SettingsDep) -> Response:
    try:
        req = RankRequest.model_validate_json(await request.body())
    except ValidationError as e:
        return validation_error_response(_pydantic_errors(e))
    n = len(req.candidates)
    errors = []
    if n > settings.max_candidates:
        errors.append(too_long_error("candidates", settings.max_candidates, n, "MAX_CANDIDATES"))
    if req.top_k is not None and req.top_k > settings.max_top_k:
        errors.append(too_large_error("top_k", settings.max_top_k, "MAX_TOP_K"))
    if req.explain:
        returned = min(n, req.top_k or n)
        if too_big := explain_limit_error(returned, scorer.max_history, settings.max_explain_cells):
            errors.append(too_big)
    if errors:
        return validation_error_response(errors)
    request.app.state.metrics.rank_candidates.observe(n)

    # (n, 3): item, category (0 when not sent), 1 = category not sent: looked up in the store
    ids = np.array([(c.item_id, c.cate_id or 0, c.cate_id is None) for c in req.candidates], dtype=np.int64)
    missing = ids[:, 2].astype(bool)
    if missing.any():
        (history, degraded), (cates, unknown, ads_degraded) = await asyncio.gather(
            fetch_history(request, store, req.user_id, settings.store_timeout_s),
            resolve_categories(getattr(request.app.state, "ad_cache", None), store, ids[:, 0], ids[:, 1], missing,
                               settings.store_timeout_s),
        )
        ids[:, 1] = np.where(unknown, -1, cates)  # -1: unknown to the model's vocabulary too
        degraded = degraded or ads_degraded
    else:
        history, degraded = await fetch_history(request, store, req.user_id, settings.store_timeout_s)
        unknown = missing
    profile_fields = store.profile_fields if (store is not None and history is not None) else ()
    inp = to_rank_input(scorer, history, profile_fields, ids[:, 0], ids[:, 1])
    (scored,) = await anyio.to_thread.run_sync(scorer.score_requests, [inp], limiter=request.app.state.scoring_limiter)
    request.app.state.metrics.batch_requests.observe(1)  # one request per call until the micro-batcher
    request.app.state.metrics.batch_candidates.observe(n)

    order = rank_order(scored.ctr, req.top_k)
    cate_out = ids[order, 1].astype(object)
    cate_out[unknown[order]] = None  # sent without a category, and the store has none
    ranked = [
        {"item_id": i, "cate_id": c, "ctr": p}
        for i, c, p in zip(ids[order, 0].tolist(), cate_out.tolist(), scored.ctr[order].tolist())
    ]
    response = {
        "model_version": scorer.model_version,
        "user_id": req.user_id,
        "history_length": scored.history_length,
        "degraded": degraded,
        "ranked": ranked,
    }
    if req.explain:
        add_explanation(response, scored, order, history, scorer.bundle.has_attention)
    return json_response(response)
