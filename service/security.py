"""Who may call what: a bearer token for admin and event-ingestion routes.

Without `ADMIN_TOKEN` configured those routes are disabled (403), never open. The token is
compared in constant time so its prefix cannot be guessed from response timings.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN as a bearer token")


def require_admin(
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
    if not hmac.compare_digest(credentials.credentials.encode(), expected.get_secret_value().encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="wrong bearer token")


AdminDep = Depends(require_admin)
