"""HTTP routes: thin translations from HTTP to the scorer and the store."""

from fastapi import APIRouter

from service.routes import admin, events, health, metrics, page, rank, sample
from service.security import ApiKeyDep

api_router = APIRouter()
api_router.include_router(rank.router, dependencies=[ApiKeyDep])
api_router.include_router(health.router)
api_router.include_router(events.router)
api_router.include_router(sample.router, dependencies=[ApiKeyDep])  # the population, like /rank
api_router.include_router(page.router)
api_router.include_router(admin.router)
api_router.include_router(metrics.router)

__all__ = ["api_router"]
