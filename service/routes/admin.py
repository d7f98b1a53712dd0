"""POST /admin/reload: swap in a new model bundle without a restart (service/hot_reload.py)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Request, Response

from service.hot_reload import ReloadRefused
from service.routes.rank import json_response
from service.schemas import ErrorBody, ReloadRefusal, ReloadRequest, ReloadResponse, ValidationErrorBody
from service.security import AdminDep

router = APIRouter(tags=["admin"], dependencies=[AdminDep])

_AUTH_ERRORS = {
    401: {"model": ErrorBody, "description": "No bearer token"},
    403: {"model": ErrorBody, "description": "Wrong token, or no ADMIN_TOKEN configured (route disabled)"},
}


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    summary="Load, warm and swap in a model bundle; the old one keeps serving if the new one is refused",
    responses={
        **_AUTH_ERRORS,
        404: {"model": ReloadRefusal, "description": "The bundle path does not exist"},
        409: {"model": ReloadRefusal, "description": "Another reload is in progress"},
        422: {
            "model": ReloadRefusal | ValidationErrorBody,
            "description": "The bundle is corrupt or incompatible, or the request body is malformed",
        },
    },
)
async def reload_model(request: Request, body: ReloadRequest | None = Body(default=None)) -> Response:
    reloader = request.app.state.reloader
    try:
        result = await reloader.reload(body.bundle if body is not None else None)
    except ReloadRefused as e:
        scorer = getattr(request.app.state, "scorer", None)
        return json_response(
            {"detail": e.message, "model_version": scorer.model_version if scorer else None}, status_code=e.status_code
        )
    return json_response(
        {
            "model_version": result.model_version,
            "previous_version": result.previous_version,
            "changed": result.changed,
            "load_seconds": round(result.load_seconds, 4),
        }
    )
