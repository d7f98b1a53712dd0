"""POST /rank: parse, fill in missing categories, hand the request to the micro-batcher, sort, answer.

The body is decoded from the raw bytes into id columns (service/rank_codec.py: orjson,
pydantic only for bad requests) and the answer encoded with orjson into a plain Response;
the OpenAPI document still shows both models (see `openapi_extra` and `REQUEST_SCHEMAS`).
Candidates sent without `cate_id` get the store's category first (service/ad_features.py:
the in-process cache, then one round trip). The batcher (service/batcher.py) reads the
histories of a whole batch of users in one store round trip (`fetch_histories`, through
the StoreGuard: deadline, circuit breaker, metrics) and scores the batch in one graph call
of the scorer serving at that moment, whose version the answer names; past its queue
bound, or at the request deadline, /rank answers 503 with Retry-After at once.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from model.contract import UNKNOWN_ID
from service.ad_features import resolve_categories
from service.batcher import Batcher, BatcherClosed, DeadlineExceeded, Fetched, QueueFull
from service.deps import ScorerDep, SettingsDep, StoreDep
from service.explain import add_explanation, explain_limit_error
from service.rank_codec import decode_rank_request, encode_rank_response
from service.schemas import (
    ErrorBody,
    RankRequest,
    RankResponse,
    ValidationErrorBody,
    too_large_error,
    too_long_error,
)
from service.scorer import rank_order
from service.store_guard import StoreCallFailed

log = logging.getLogger(__name__)
router = APIRouter(tags=["ranking"])

# Models the route parses by hand; service/app.py adds them to the OpenAPI components.
REQUEST_SCHEMAS = (RankRequest,)
JSON = "application/json"
BATCH_USERS_HEADER = "X-Batch-Users"  # requests scored in the same graph call as this one


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, default=str), status_code=status_code, media_type=JSON, headers=headers)


def validation_error_response(errors: list[dict[str, Any]]) -> Response:
    """422 in FastAPI's shape: each error names its field (`loc`) and the limit (`ctx`)."""
    return json_response({"detail": errors}, status_code=422)


def _text(value: str) -> str:
    """Text JSON can carry: a lone UTF-16 surrogate (a `\\ud800` escape) written as that escape."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _plain(value: Any) -> Any:
    return _text(value) if isinstance(value, str) else value if isinstance(value, (int, float, bool)) else _text(str(value))


def error_items(errors: list[dict[str, Any]], loc_prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """pydantic's errors as 422 items (`loc`, `msg`, `type`, `ctx`), never with the rejected
    `input`: not needed (`loc` names the field), and a lone surrogate in it cannot be encoded."""
    out = []
    for err in errors:
        item = {"loc": [_plain(part) for part in (*loc_prefix, *err.get("loc", ()))], "msg": _text(str(err.get("msg", ""))),
                "type": err.get("type", "value_error")}  # fmt: skip
        if isinstance(err.get("ctx"), dict):
            item["ctx"] = {_text(str(k)): _plain(v) for k, v in err["ctx"].items()}
        out.append(item)
    return out


async def fetch_histories(state, timeout_s: float, user_ids: list[int]) -> Fetched:
    """The batch's histories in one round trip; a failing store never fails the requests.

    The call goes through the app's StoreGuard (deadline `timeout_s`, circuit breaker,
    metrics): when the breaker is open the store is not even tried. Unknown users come
    back as None (not degraded); an unreachable, slow or broken store gives every user of
    the batch an empty history, marked degraded (counted per request, by reason).
    """
    metrics = state.metrics
    store = getattr(state, "store", None)
    if store is None:
        metrics.degraded_responses.labels("no_store").inc(len(user_ids))
        return Fetched(histories=[None] * len(user_ids), degraded=True)
    try:
        histories = await state.store_guard.call(
            "get_histories", lambda: store.get_histories(user_ids), timeout_s=timeout_s
        )
    except StoreCallFailed as e:  # unreachable, slow or broken store: rank without history
        metrics.degraded_responses.labels(e.reason).inc(len(user_ids))
        return Fetched(histories=[None] * len(user_ids), degraded=True)
    return Fetched(histories=histories, profile_fields=store.profile_fields)


def overloaded_response(message: str, retry_after_s: int) -> Response:
    """503 at once, with the seconds a client (or load balancer) should wait."""
    return json_response({"detail": message}, status_code=503, headers={"Retry-After": str(retry_after_s)})


@router.post(
    "/rank",
    response_model=RankResponse,
    summary="Rank candidate ads for one user by predicted CTR",
    responses={
        422: {"model": ValidationErrorBody, "description": "The request names a bad field or breaks a limit"},
        503: {
            "model": ErrorBody,
            "description": "Overloaded (queue full) or not scored within the request deadline, or the model is "
            "not loaded yet; see Retry-After",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
        }
    },
)
async def rank(request: Request, scorer: ScorerDep, store: StoreDep, settings: SettingsDep) -> Response:
    try:
        query = decode_rank_request(await request.body())
    except ValidationError as e:
        return validation_error_response(error_items(e.errors(include_url=False, include_input=False), ("body",)))
    n = query.num_candidates
    errors = []
    if n > settings.max_candidates:
        errors.append(too_long_error("candidates", settings.max_candidates, n, "MAX_CANDIDATES"))
    if query.top_k is not None and query.top_k > settings.max_top_k:
        errors.append(too_large_error("top_k", settings.max_top_k, "MAX_TOP_K"))
    returned = min(n, query.top_k or n)
    if query.explain and (too_big := explain_limit_error(returned, scorer.max_history, settings.max_explain_cells)):
        errors.append(too_big)
    if errors:
        return validation_error_response(errors)
    state = request.app.state
    state.metrics.rank_candidates.observe(n)

    unknown, ads_degraded = None, False
    if query.missing is not None:  # some candidates came without a category: the store's, in one round trip
        cates, unknown, ads_degraded = await resolve_categories(
            getattr(state, "ad_cache", None), store, state.store_guard, query.item_ids, query.cate_ids, query.missing
        )
        query = replace(query, cate_ids=np.where(unknown, UNKNOWN_ID, cates))  # UNK_ROW in any bundle, hashed too

    batcher: Batcher = state.batcher
    try:
        ranked = await batcher.submit(query.user_id, query.candidates(), explain=query.explain)
    except QueueFull as e:
        state.metrics.overload_rejections.labels("queue_full").inc()
        return overloaded_response(str(e), e.retry_after_s)
    except DeadlineExceeded as e:
        state.metrics.overload_rejections.labels("deadline").inc()
        return overloaded_response(str(e), 1)
    except BatcherClosed as e:
        state.metrics.overload_rejections.labels("shutting_down").inc()
        return overloaded_response(str(e), 1)

    if query.explain and (too_big := explain_limit_error(returned, ranked.max_history, settings.max_explain_cells)):
        # A hot reload to a model with a longer max_history landed between the check above and
        # the batch: answer as a retry would be answered, never with more cells than the limit.
        return validation_error_response([too_big])
    scored = ranked.scored
    order = rank_order(scored.ctr, query.top_k)
    body = encode_rank_response(
        model_version=ranked.model_version,  # the scorer that scored this batch (hot reload: maybe not `scorer`)
        user_id=query.user_id,
        history_length=scored.history_length,
        degraded=ranked.degraded or ads_degraded,
        query=query,
        ctr=scored.ctr,
        order=order,
        unknown=unknown,
    )
    headers = {BATCH_USERS_HEADER: str(ranked.batch_users)}
    if not query.explain:
        return Response(body, media_type=JSON, headers=headers)
    response = orjson.loads(body)  # explain only: per-candidate weights are added to the same answer
    add_explanation(response, scored, order, ranked.history, ranked.has_attention)
    return json_response(response, headers=headers)

