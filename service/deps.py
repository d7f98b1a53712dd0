"""Dependencies of the routes as `Annotated` aliases: what a route needs, not where it lives.

Everything hangs off `app.state`, set by the lifespan in service/app.py; reading it per
request (not capturing it at import) is what lets a hot reload swap the scorer later.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from feature_store.base import HistoryStore
from service.scorer import Scorer
from service.settings import Settings


# `async def` on purpose: FastAPI runs a plain `def` dependency in a worker thread, a thread
# hop per dependency per request (measured on the /rank hot path); these only read app.state.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_scorer(request: Request) -> Scorer:
    scorer = getattr(request.app.state, "scorer", None)
    if scorer is None:  # only before start-up finished or after shutdown began
        raise HTTPException(status_code=503, detail="the model is not loaded yet")
    return scorer


async def get_store(request: Request) -> HistoryStore | None:
    """The history store, or None when none is configured (requests then rank degraded)."""
    return getattr(request.app.state, "store", None)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]
StoreDep = Annotated[HistoryStore | None, Depends(get_store)]
