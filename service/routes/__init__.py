"""HTTP routes: thin translations from HTTP to the scorer and the store."""

from fastapi import APIRouter

from service.routes import health, page, rank, sample

api_router = APIRouter()
api_router.include_router(rank.router)
api_router.include_router(health.router)
api_router.include_router(sample.router)
api_router.include_router(page.router)

__all__ = ["api_router"]
