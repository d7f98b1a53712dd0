"""POST /events: append live behaviours to users' histories (admin bearer token).

Acknowledged (200) only after Redis ran every user's append script; a store that cannot
take them answers 503 with Retry-After, and the sender retries the same batch: event ids
make the retry harmless (docs/feature-store.md, "Live appends"). The append goes through
the app's StoreGuard like every store call (deadline STORE_TIMEOUT_MS but at least 1 s,
the circuit breaker, din_store_errors_total); din_events_total counts events by outcome.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request

from feature_store.events import EventBatch
from service.deps import SettingsDep, StoreDep
from service.schemas import EventsRequest, EventsResponse, too_long_error
from service.security import AdminDep
from service.settings import Settings
from service.store_guard import StoreCallFailed, store_unavailable_error

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"])

MIN_APPEND_TIMEOUT_S = 1.0  # a batch is one script per user (up to MAX_EVENTS): more than a read's 50 ms


def append_timeout_s(settings: Settings) -> float:
    """The append's deadline: STORE_TIMEOUT_MS, but at least MIN_APPEND_TIMEOUT_S (README)."""
    return max(settings.store_timeout_s, MIN_APPEND_TIMEOUT_S)


@router.post(
    "/events",
    response_model=EventsResponse,
    dependencies=[AdminDep],
    summary="Append behaviour events (idempotent per event_id)",
    responses={
        401: {"description": "No bearer token"},
        403: {"description": "Wrong token, or no ADMIN_TOKEN configured (the route is disabled)"},
        503: {"description": "The feature store cannot take the events now; nothing was acknowledged, retry "
                             "after Retry-After seconds"},
    },
)
async def post_events(request: Request, body: EventsRequest, store: StoreDep, settings: SettingsDep) -> EventsResponse:
    if len(body.events) > settings.max_events:
        raise HTTPException(422, detail=[too_long_error("events", settings.max_events, len(body.events), "MAX_EVENTS")])
    counter = request.app.state.metrics.events
    if store is None:
        counter.labels("refused").inc(len(body.events))
        raise HTTPException(503, detail="no feature store configured (REDIS_URL): events cannot be stored",
                            headers={"Retry-After": "5"})
    ev = body.events
    batch = EventBatch.from_columns(
        [e.user_id for e in ev], [e.item_id for e in ev], [e.cate_id for e in ev],
        [e.timestamp for e in ev], [e.event_id for e in ev],
    )
    try:
        report = await request.app.state.store_guard.call(
            "append_events", lambda: store.append_events(batch), timeout_s=append_timeout_s(settings)
        )
    except StoreCallFailed as e:  # down, slow, circuit open, or Redis refused (OOM, no data version)
        log.warning("events refused (%s): %s", e.reason, e)
        counter.labels("refused").inc(len(batch))
        raise store_unavailable_error(e, "the batch") from None
    counter.labels("stored").inc(report.applied)
    counter.labels("duplicate").inc(report.duplicates)
    return EventsResponse(**report.to_json())
