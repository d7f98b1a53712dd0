"""POST /events: append live behaviours to users' histories (admin bearer token).

Acknowledged (200) only after Redis ran every user's append script; a store that cannot
take them answers 503 with Retry-After, and the sender retries the same batch: event ids
make the retry harmless (docs/feature-store.md, "Live appends").
"""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, HTTPException

from feature_store.base import StoreUnavailableError
from feature_store.events import EventBatch
from feature_store.redis_store import StoreError
from service.deps import SettingsDep, StoreDep
from service.schemas import EventsRequest, EventsResponse, too_long_error
from service.security import AdminDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"])

APPEND_TIMEOUT_S = 5.0  # a batch is many scripts; past this the store counts as unavailable


@router.post(
    "/events",
    response_model=EventsResponse,
    dependencies=[AdminDep],
    summary="Append behaviour events (idempotent per event_id)",
    responses={
        401: {"description": "No bearer token"},
        403: {"description": "Wrong token, or no ADMIN_TOKEN configured (the route is disabled)"},
        503: {"description": "The feature store cannot take the events now; nothing was acknowledged, retry"},
    },
)
async def post_events(body: EventsRequest, store: StoreDep, settings: SettingsDep) -> EventsResponse:
    if len(body.events) > settings.max_events:
        raise HTTPException(422, detail=[too_long_error("events", settings.max_events, len(body.events), "MAX_EVENTS")])
    if store is None:
        raise HTTPException(503, detail="no feature store configured (REDIS_URL): events cannot be stored",
                            headers={"Retry-After": "5"})
    ev = body.events
    batch = EventBatch.from_columns(
        [e.user_id for e in ev], [e.item_id for e in ev], [e.cate_id for e in ev],
        [e.timestamp for e in ev], [e.event_id for e in ev],
    )
    try:
        with anyio.fail_after(APPEND_TIMEOUT_S):
            report = await store.append_events(batch)
    except (StoreUnavailableError, TimeoutError) as e:
        log.warning("events refused, store unavailable: %s", e)
        raise HTTPException(503, detail="the feature store is unavailable: the events were not stored, retry",
                            headers={"Retry-After": "1"}) from None
    except StoreError as e:  # e.g. data loaded by an older `din load`: says what to do
        log.error("events refused: %s", e)
        raise HTTPException(503, detail=f"the events were not stored: {e}") from None
    return EventsResponse(**report.to_json())
