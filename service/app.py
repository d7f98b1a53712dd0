"""The FastAPI application factory: `create_app(settings)`.

The lifespan loads the bundle (a bad one stops start-up with a BundleError that says
what is wrong), opens and warms the ONNX Runtime session, and connects the history store;
shutdown (after uvicorn has drained in-flight requests) closes the store. Nothing happens
at import time. Around the routes: RequestContextMiddleware (request id, access log,
latency metrics, last-resort 500) outermost, then the body size limit. A request that
fails FastAPI's validation gets a 422 naming the field, without echoing the rejected input.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from feature_store.ad_cache import AdFeatureCache
from service.batcher import Batcher, BatchStats
from service.body_limit import BodySizeLimitMiddleware
from service.hot_reload import ModelReloader, check_servable, load_scorer, resolve_bundle
from service.metrics import ServiceMetrics
from service.request_context import RequestContextMiddleware, internal_error_body
from service.routes import api_router
from service.routes.page import mount_static
from service.routes.rank import REQUEST_SCHEMAS, error_items, fetch_histories, validation_error_response
from service.schemas import ErrorBody
from service.settings import Settings
from service.store_guard import StoreGuard

__all__ = ["check_servable", "create_app"]

log = logging.getLogger(__name__)

REF_TEMPLATE = "#/components/schemas/{model}"


def _connect_store(settings: Settings):
    if settings.redis_url is None:
        log.warning("REDIS_URL is not set: every request is ranked without history (degraded)")
        return None
    from feature_store.redis_store import RedisHistoryStore

    store = RedisHistoryStore.from_url(
        settings.redis_url,
        namespace=settings.redis_namespace,
        cluster=settings.redis_cluster or None,
        socket_timeout=settings.store_read_timeout_ms / 1000,
        socket_connect_timeout=settings.store_connect_timeout_ms / 1000,
        max_connections=settings.store_max_connections,
        retries=settings.store_retries,
        retry_backoff_s=settings.store_retry_backoff_ms / 1000,
        retry_backoff_cap_s=settings.store_retry_backoff_cap_ms / 1000,
        health_check_interval=settings.store_health_check_interval_s,
    )
    log.info("history store: %s (namespace %s)", store.url, settings.redis_namespace)  # password hidden
    return store


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
            _document_common_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_common_errors(schema: dict) -> None:
    """Answers any route may give, written into every operation of the document.

    413 and 408 (and 400 for bytes that are not even text) where there is a body, 401/403 where a
    credential is asked for, 500 (the generic error body) everywhere: clients and schema
    fuzzers see every status we send.
    """
    components = schema["components"]["schemas"]
    components.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template=REF_TEMPLATE))
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            responses = op.setdefault("responses", {})
            responses.setdefault("500", {"description": "Internal error (generic body with the request id)", **ref})
            if "requestBody" in op:
                responses.setdefault("413", {"description": "Body larger than MAX_BODY_BYTES", **ref})
                responses.setdefault("408", {"description": "Body not received within BODY_READ_TIMEOUT_S", **ref})
                responses.setdefault("400", {"description": "Body that cannot be decoded at all (not UTF-8)", **ref})
            if op.get("security"):
                responses.setdefault("401", {"description": "Credential missing", **ref})
                responses.setdefault("403", {"description": "Credential wrong, or the route is disabled", **ref})


def _observe_batch(metrics: ServiceMetrics, batch: BatchStats) -> None:
    """The batcher's hook: the size of one ONNX Runtime call."""
    metrics.batch_requests.observe(batch.users)
    metrics.batch_candidates.observe(batch.candidates)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ranking service; `settings` default to the environment (and .env)."""
    settings = settings if settings is not None else Settings()

    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for doubt in settings.doubtful():
            log.warning("%s", doubt)
        scorer, seconds = await load_scorer(resolve_bundle(settings.bundle), settings)
        metrics.set_model(scorer.model_version, scorer.bundle.model_type, seconds)
        store = _connect_store(settings)
        app.state.store_guard = StoreGuard.build(
            failure_threshold=settings.breaker_failure_threshold,
            reset_s=settings.breaker_reset_ms / 1000,
            timeout_s=settings.store_timeout_s,
            metrics=metrics,
        )
        app.state.store = store
        app.state.ad_cache = AdFeatureCache(settings.ad_cache_size, settings.ad_cache_ttl_s)
        app.state.scorer = scorer
        app.state.reloader = ModelReloader(app.state, settings, metrics)
        # The scorer is read once per batch, so a hot reload takes effect at the next batch.
        batcher = Batcher(
            get_scorer=lambda: app.state.scorer,
            fetch=partial(fetch_histories, app.state, settings.store_timeout_s),
            config=settings.batcher_config(on_gpu=scorer.on_gpu),
        )
        batcher.on_batch = partial(_observe_batch, metrics)
        metrics.queue_depth.set_function(lambda: batcher.queue_depth)
        batcher.start()
        app.state.batcher = batcher
        # The scoring thread needs the GIL around each graph run; with Python's default 5 ms
        # switch interval a busy event loop would hold it that long, every time (measured:
        # goodput fell by half under overload). Process-wide, so the app that owns the process sets it.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
        # What is alive now (modules, the model, the app: ~90k objects) lives as long as the
        # process. Frozen, the collector's full passes skip it: each would otherwise walk all
        # of it (measured 15-30 ms, a stall of every request in flight) whenever one runs.
        gc.collect()
        gc.freeze()
        log.info("ready: model %s, store %s", scorer.model_version, "redis" if store else "none")
        try:
            yield
        finally:
            gc.unfreeze()
            sys.setswitchinterval(switch_interval)
            await batcher.close()
            app.state.scorer = None
            app.state.store = None
            if store is not None:
                await store.close()
            log.info("shut down: store closed" if store is not None else "shut down")

    app = FastAPI(
        title="DIN ranking service",
        version="0.1.0",
        description="Ranks candidate ads for a user by the CTR a Deep Interest Network predicts.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(api_router)
    mount_static(app)
    _install_openapi(app, settings)
    # Last added is outermost: the request id and metrics also cover 413s.
    app.add_middleware(
        BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_read_timeout_s=settings.body_read_timeout_s
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics, access_log_enabled=settings.access_log)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


async def _request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    """422 in FastAPI's shape, without the rejected `input` FastAPI's own handler echoes (a lone
    surrogate in it made that a 500): as POST /rank's hand-parsed 422s."""
    return validation_error_response(error_items(exc.errors()))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Last resort behind RequestContextMiddleware's own: a generic body, never a traceback."""
    rid = request.scope.get("state", {}).get("request_id")
    return Response(internal_error_body(rid), status_code=500, media_type="application/json")
