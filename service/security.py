"""Who may call what: a bearer token for admin and event-ingestion routes, API keys for /rank.

Without `ADMIN_TOKEN` configured the admin and ingestion routes are disabled (403), never
open. `API_KEYS` is optional: unset, /rank is open (a private network); set, every /rank
needs one of them in `X-API-Key`. Secrets are compared as SHA-256 digests with
`hmac.compare_digest`, so neither their prefix nor their length can be guessed from
response timings, and every configured key is compared (no early exit on a match).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN as a bearer token")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of API_KEYS (when API_KEYS is set)")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(given: str, expected: list[str] | tuple[str, ...]) -> bool:
    """Constant-time: does `given` equal one of `expected`? Every candidate is compared."""
    g = _digest(given)
    found = False
    for secret in expected:
        found |= hmac.compare_digest(g, _digest(secret))
    return found


# The checks are `async def` although they do no I/O: FastAPI runs a plain `def` dependency
# in a worker thread, a hand-off there and back on every request (measured on /rank: about
# 1 ms of CPU per request on a third thread, and the throughput that goes with it).
async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected = request.app.state.settings.admin_token
    if expected is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="this route is disabled: the service has no ADMIN_TOKEN configured"
        )
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing bearer token (Authorization: Bearer <ADMIN_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secret_matches(credentials.credentials, (expected.get_secret_value(),)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="wrong bearer token")


async def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key)]) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing API key (header X-API-Key)",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    if not secret_matches(key, tuple(k.get_secret_value() for k in keys)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="unknown API key")


AdminDep = Depends(require_admin)
ApiKeyDep = Depends(require_api_key)
