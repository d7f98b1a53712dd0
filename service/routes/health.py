"""GET /healthz (the process is alive) and GET /readyz (it can rank right now).

A load balancer routes traffic by /readyz: 503 until the model is loaded and warmed (or
when the device asked for cannot be used), so a replica gets traffic only once it can
rank. A Redis outage does not make a replica unready: every replica shares that Redis,
and the service still answers (degraded) without it; /readyz reports the store's state in
its body. An orchestrator restarts on /healthz only, so an outage never restarts healthy
replicas.

Nor does an empty store (a fresh deployment, or a Redis restarted without its data): the
body's `store_data` says whether a data version is loaded, from the data version pointer
that the PING of /readyz reads anyway (at most once a second), so an operator can tell
"every user is new" from "the histories are gone". A pointer that Redis holds but that
is unusable (garbage, wrong type) is `store` "error: ..." with the store's message, not
"unreachable": Redis answered.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from pydantic import Field

from feature_store.base import CONNECTION_WAIT, ConnectionWait, StoreBusyError, StoreError, StoreUnavailableError
from service.deps import SettingsDep, StoreDep
from service.routes.rank import json_response
from service.schemas import Readiness

router = APIRouter(tags=["health"])

LOADED, NONE_LOADED = "loaded", "none loaded"
OK = "ok"
# A burst of store calls holds every connection of this process: the PING queued behind them
# and Redis was not asked. Calls queue, they do not fail, so this is no outage either.
BUSY = "busy: every Redis connection of this process is in use (PING not sent; not an outage)"


class StoreReadiness(Readiness):
    """Readiness, plus whether the store holds data (readiness does not depend on it)."""

    store_data: str | None = Field(
        default=None,
        description=f'"{LOADED}": the store has a data version, "{NONE_LOADED}": it has none (every user is '
        "served as new: run `din load`, or send events); null: not known (no store, it did not answer, or its "
        "data version pointer is unusable).",
    )


def store_data(store, store_state: str) -> str | None:
    """Whether the store has a data version, as its last pointer read found (no extra read)."""
    if store_state not in (OK, BUSY) or not hasattr(store, "version"):
        return None
    return LOADED if store.version is not None else NONE_LOADED


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def store_status(store, timeout_s: float) -> str:
    if store is None:
        return "not configured (set REDIS_URL)"
    wait = ConnectionWait()  # the store marks it while the PING queues for a connection
    token = CONNECTION_WAIT.set(wait)
    try:
        with anyio.fail_after(timeout_s):
            await store.ping()
    except TimeoutError:
        return BUSY if wait.waiting else f"no answer to PING within {timeout_s * 1000:.0f} ms"
    except StoreBusyError:
        return BUSY
    except StoreUnavailableError as e:
        return f"unreachable: {e}"  # the store's message carries a redacted URL
    except StoreError as e:  # Redis answered, but its data is unusable (e.g. a garbage version pointer)
        return f"error: {e}"  # the store's message says what is wrong and what to run
    except Exception as e:
        return f"unreachable ({type(e).__name__})"
    finally:
        CONNECTION_WAIT.reset(token)
    return OK


@router.get(
    "/readyz",
    response_model=StoreReadiness,
    summary="Readiness: model loaded and warmed (store state in the body)",
    responses={503: {"model": StoreReadiness, "description": "Not ready; the body names what is not"}},
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
    body = StoreReadiness(
        ready=model == "ok",
        model=model,
        store=store_state,
        store_data=store_data(store, store_state),  # (PING read the pointer: no extra round trip)
        degraded=store_state not in (OK, BUSY) or circuit not in (None, "closed"),
        store_url=None if store is None else getattr(store, "url", None),  # password hidden
        store_circuit=circuit,
        model_version=None if scorer is None else scorer.model_version,
        providers=[] if scorer is None else scorer.providers,
    )
    return json_response(body.model_dump(), status_code=200 if body.ready else 503)
