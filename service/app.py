"""The FastAPI application factory: `create_app(settings)`.

The lifespan loads the bundle (a bad one stops start-up with a BundleError that says
what is wrong), opens and warms the ONNX Runtime session, and connects the history store;
shutdown closes the store. Nothing happens at import time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from feature_store.records import RECORD_FIELDS
from model.bundle import Bundle, BundleError, load_bundle
from service.routes import api_router
from service.batcher import Batcher
from service.routes.rank import REQUEST_SCHEMAS, fetch_histories
from service.schemas import Candidate
from service.scorer import Scorer
from service.settings import Settings

log = logging.getLogger(__name__)

REF_TEMPLATE = "#/components/schemas/{model}"


def check_servable(bundle: Bundle) -> None:
    """The API and the store must carry every field the model reads; say which one is missing."""
    for f in bundle.spec.sequence_fields:
        if f not in Candidate.model_fields:
            raise BundleError(
                f"bundle {bundle.path} scores candidates by {f!r}, which POST /rank does not carry "
                f"(candidates have {sorted(Candidate.model_fields)})"
            )
        if f not in RECORD_FIELDS:
            raise BundleError(
                f"bundle {bundle.path} reads behaviour field {f!r}, which the history store does not keep "
                f"(records have {list(RECORD_FIELDS)})"
            )


def _connect_store(settings: Settings):
    if settings.redis_url is None:
        log.warning("REDIS_URL is not set: every request is ranked without history (degraded)")
        return None
    from feature_store.redis_store import RedisHistoryStore

    return RedisHistoryStore.from_url(settings.redis_url, namespace=settings.redis_namespace)


def _install_openapi(app: FastAPI, settings: Settings) -> None:
    """Add the models routes parse by hand (for speed) to the OpenAPI components.

    Limits that are settings (candidates per request, top_k) are written into the schema,
    so the document states the limits this instance enforces.
    """

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_SCHEMAS:
                js = model.model_json_schema(ref_template=REF_TEMPLATE, mode="validation")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            request = components["RankRequest"]["properties"]
            request["candidates"]["maxItems"] = settings.max_candidates
            request["top_k"]["anyOf"][0]["maximum"] = settings.max_top_k
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ranking service; `settings` default to the environment (and .env)."""
    settings = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = load_bundle(settings.bundle)
        check_servable(bundle)
        scorer = await anyio.to_thread.run_sync(partial(Scorer.load, bundle, options=settings.runtime_options()))
        await anyio.to_thread.run_sync(scorer.warm_up)
        store = _connect_store(settings)
        # One graph run at a time: each already uses every intra-op thread.
        app.state.scoring_limiter = anyio.CapacityLimiter(1)
        app.state.store_failing = False
        app.state.store = store
        app.state.scorer = scorer
        batcher = Batcher(
            get_scorer=lambda: app.state.scorer,
            fetch=partial(fetch_histories, app.state, settings.store_timeout_s),
            config=settings.batcher_config(on_gpu=scorer.on_gpu),
        )
        batcher.start()
        app.state.batcher = batcher
        # The scoring thread needs the GIL around each graph run; with Python's default 5 ms
        # switch interval a busy event loop would hold it that long, every time (measured:
        # goodput fell by half under overload). Process-wide, so the app that owns the process sets it.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
        log.info("ready: model %s, store %s", scorer.model_version, "redis" if store else "none")
        try:
            yield
        finally:
            sys.setswitchinterval(switch_interval)
            await batcher.close()
            app.state.scorer = None
            app.state.store = None
            if store is not None:
                await store.close()

    app = FastAPI(
        title="DIN ranking service",
        version="0.1.0",
        description="Ranks candidate ads for a user by the CTR a Deep Interest Network predicts.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(api_router)
    _install_openapi(app, settings)
    return app
