"""GET /api/sample: users from the loaded population and ads from the catalogue, for the explain page.

The store keeps no ad catalogue yet, so the catalogue is derived from what it has: the
behaviours of a sample of users. One request, bounded work: SCAN the current data version
for up to POOL_USERS user keys (walking at most about 20,000 keys; Redis's hash order, so an
arbitrary but stable subset of the population), pick up to max(n, CATALOGUE_USERS) of them
at random, read their histories in one MGET, and answer
    user_ids:   n of those users that have behaviours (random order),
    candidates: n distinct (item_id, cate_id) pairs from their histories, at random,
capped so that ranking them with `explain` fits MAX_CANDIDATES and MAX_EXPLAIN_CELLS.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from feature_store.base import StoreError, StoreUnavailableError
from service.deps import ScorerDep, SettingsDep, StoreDep
from service.routes.rank import json_response
from service.schemas import Candidate

router = APIRouter(tags=["explain page"])

MAX_SAMPLE = 200
POOL_USERS = 1000
CATALOGUE_USERS = 64
TIMEOUT_S = 2.0  # a demo endpoint: SCAN may take longer than one history read
ATTEMPTS = 4  # within TIMEOUT_S; backoff 50, 100, 200 ms
_rng = np.random.default_rng()


class Sample(BaseModel):
    user_ids: list[int] = Field(description="Users of the loaded population that have behaviours.")
    candidates: list[Candidate] = Field(description="Ads seen in a sample of users' histories.")


def _unavailable(detail: str) -> Response:
    return json_response({"detail": detail}, status_code=503)


async def _read_sample(store, n: int) -> tuple[np.ndarray, list]:
    """Some users of the population and their histories, retrying a store that failed.

    The store's per-command timeouts are /rank's (tens of milliseconds, so /rank degrades
    fast); this route's budget is TIMEOUT_S. A command cut off by a moment's stall (a busy
    machine, a paused Redis) is tried again with backoff instead of failing the page.
    """
    for attempt in range(ATTEMPTS):
        try:
            pool = np.array(await store.scan_user_ids(POOL_USERS), dtype=np.int64)
            picked = _rng.permutation(pool)[: max(n, CATALOGUE_USERS)]
            return picked, await store.get_histories(picked.tolist())
        except StoreUnavailableError:
            if attempt == ATTEMPTS - 1:
                raise
            await anyio.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


@router.get(
    "/api/sample",
    response_model=Sample,
    summary="Sample users and candidate ads from the loaded data (for the explain page)",
    responses={503: {"description": "No history store, or it does not answer"}},
)
async def sample(
    scorer: ScorerDep,
    store: StoreDep,
    settings: SettingsDep,
    n: Annotated[int, Query(ge=1, le=MAX_SAMPLE, description="How many users and candidates.")] = 20,
) -> Response:
    if store is None:
        return _unavailable("no history store is configured (set REDIS_URL): there is no population to sample")
    try:
        with anyio.fail_after(TIMEOUT_S):
            picked, histories = await _read_sample(store, n)
    except NotImplementedError as e:
        return _unavailable(f"this history store cannot list its users: {e}")
    except TimeoutError:
        return _unavailable(f"the history store did not answer within {TIMEOUT_S:.0f} s")
    except (StoreUnavailableError, StoreError) as e:  # down, or up with data it cannot use (a garbage pointer)
        return _unavailable(str(e))

    kept = [(int(u), h.records) for u, h in zip(picked.tolist(), histories) if h is not None and len(h)]
    user_ids = [u for u, _ in kept[:n]]
    pairs = np.zeros((0, 2), dtype=np.int64)
    if kept:
        recs = np.concatenate([r for _, r in kept])
        pairs = np.unique(np.stack([recs["item_id"], recs["cate_id"]], axis=1), axis=0)  # (P, 2) distinct
    k = min(n, settings.max_candidates, max(1, settings.max_explain_cells // scorer.max_history), len(pairs))
    chosen = pairs[_rng.choice(len(pairs), size=k, replace=False)] if k else pairs
    candidates = [{"item_id": i, "cate_id": c} for i, c in chosen.tolist()]
    return json_response({"user_ids": user_ids, "candidates": candidates})
