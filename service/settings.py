"""Service settings: one typed object, read from the environment (and an optional .env).

Injected into `create_app(settings)`, never read from an import-time global, so tests and
the CLI build exactly the service they want. Environment variables carry no prefix:
`BUNDLE`, `REDIS_URL`, `DEVICE`, `MAX_CANDIDATES`, ... (case-insensitive).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    bundle: Path = Field(description="Model bundle directory (model.onnx + bundle.json + vocab/).")
    redis_url: str | None = Field(
        default=None,
        description="Redis holding user histories (redis://, rediss://, unix://). "
        "None: no store; every request is ranked with an empty history and marked degraded.",
    )
    redis_namespace: str = Field(default="din", min_length=1, description="Key namespace in Redis.")
    redis_cluster: bool = Field(
        default=False, description="Use the Redis Cluster client for REDIS_URL (same as a redis+cluster:// URL)."
    )
    max_events: int = Field(default=1000, ge=1, le=100_000, description="Events per POST /events request.")
    ad_cache_size: int = Field(
        default=65_536, ge=1, le=1 << 26, description="Ad features cached in process (slots; rounded up to a power of 2)."
    )
    ad_cache_ttl_s: float = Field(
        default=60.0, gt=0, le=86_400, description="Seconds a cached ad feature (category) is used before re-reading it."
    )
    device: Device = Field(
        default="auto",
        description="auto: CUDA when a GPU is actually usable, else CPU; cpu; cuda (readiness fails "
        "when CUDA cannot be used).",
    )
    max_candidates: int = Field(default=1000, ge=1, le=100_000, description="Candidates per /rank request.")
    max_top_k: int = Field(default=1000, ge=1, le=100_000, description="Largest top_k a request may ask for.")
    intra_op_threads: int = Field(
        default_factory=_cores, ge=1, le=1024, description="ONNX Runtime intra-op threads (default: the cores)."
    )
    store_timeout_ms: float = Field(
        default=50.0, gt=0, le=60_000, description="Deadline for one history read; past it, rank degraded."
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for admin and event-ingestion routes; unset: those routes are disabled.",
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)

    @property
    def store_timeout_s(self) -> float:
        return self.store_timeout_ms / 1000.0
