"""GET /healthz (the process is alive) and GET /readyz (it can rank right now).

A load balancer routes traffic by /readyz: 503 until the model is loaded and warmed (or
when the device asked for cannot be used), so a replica gets traffic only once it can
rank. A Redis outage does not make a replica unready: every replica shares that Redis,
and the service still answers (degraded) without it; /readyz reports the store's state in
its body. An orchestrator restarts on /healthz only, so an outage never restarts healthy
replicas.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response

from feature_store.base import StoreUnavailableError
from service.deps import SettingsDep, StoreDep
from service.routes.rank import json_response
from service.schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def store_status(store, timeout_s: float) -> str:
    if store is None:
        return "not configured (set REDIS_URL)"
    try:
        with anyio.fail_after(timeout_s):
            await store.ping()
    except TimeoutError:
        return f"no answer to PING within {timeout_s * 1000:.0f} ms"
    except StoreUnavailableError as e:
        return f"unreachable: {e}"  # the store's message carries a redacted URL
    except Exception as e:
        return f"unreachable ({type(e).__name__})"
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model loaded and warmed (store state in the body)",
    responses={503: {"model": Readiness, "description": "Not ready; the body names what is not"}},
)
async def readyz(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    scorer = getattr(request.app.state, "scorer", None)
    if scorer is None:
        model = "not loaded"
    elif scorer.device_problem:
        model = scorer.device_problem
    elif not scorer.warmed:
        model = "not warmed up"
    else:
        model = "ok"
    # PING gets a little more than one history read: readiness must not flap on a slow read.
    store_state = await store_status(store, max(settings.store_timeout_s, 0.25))
    guard = getattr(request.app.state, "store_guard", None)
    circuit = guard.state.value if guard is not None else None
    body = Readiness(
        ready=model == "ok",
        model=model,
        store=store_state,
        degraded=store_state != "ok" or circuit not in (None, "closed"),
        store_url=None if store is None else getattr(store, "url", None),  # password hidden
        store_circuit=circuit,
        model_version=None if scorer is None else scorer.model_version,
        providers=[] if scorer is None else scorer.providers,
    )
    return json_response(body.model_dump(), status_code=200 if body.ready else 503)
