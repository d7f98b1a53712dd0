"""GET /: the explain page (docs/explain.md), and its files under /static.

Plain HTML/CSS/JS shipped in the package (service/static/), no build step, no CDN: the page
calls POST /rank with `"explain": true` and GET /api/sample, both by relative URL. With
API_KEYS set, both answer 401/403 without a valid X-API-Key: the page then asks for a key
and sends it on every call, keeping it in the tab's sessionStorage (docs/explain.md).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
INDEX = STATIC_DIR / "index.html"

router = APIRouter(tags=["explain page"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """Serve service/static/ at /static (the page loads static/app.js and static/style.css)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
