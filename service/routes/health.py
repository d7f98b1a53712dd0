"""GET /healthz (the process is alive) and GET /readyz (it can rank well right now).

A load balancer routes traffic by /readyz; an orchestrator restarts on /healthz only, so a
Redis outage (degraded ranking) never restarts healthy replicas.
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
    summary="Readiness: model loaded and warmed, history store answering",
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
    body = Readiness(
        ready=model == "ok" and store_state == "ok",
        model=model,
        store=store_state,
        model_version=None if scorer is None else scorer.model_version,
        providers=[] if scorer is None else scorer.providers,
    )
    return json_response(body.model_dump(), status_code=200 if body.ready else 503)
