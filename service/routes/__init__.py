"""HTTP routes: thin translations from HTTP to the scorer and the store."""

from fastapi import APIRouter

from service.routes import events, health, rank

api_router = APIRouter()
api_router.include_router(rank.router)
api_router.include_router(health.router)
api_router.include_router(events.router)

__all__ = ["api_router"]
