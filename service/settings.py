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

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
CPU_BATCH_CANDIDATES = 256  # per-candidate speed on the CPU falls as a call outgrows the caches (docs/benchmarks.md)
GPU_BATCH_CANDIDATES = 8192


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
    device: Device = Field(
        default="auto",
        description="auto: CUDA when a GPU is actually usable, else CPU; cpu; cuda; tensorrt (TensorRT "
        "fp16 with an engine cache, CUDA for what TensorRT cannot run). cuda/tensorrt: readiness fails "
        "when that provider cannot be used, instead of serving slowly on the CPU.",
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
    # Micro-batching and overload (service/batcher.py).
    batch_max_candidates: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="A batch goes at once when it holds this many candidates. Default: 256 on the CPU (per-candidate "
        "speed falls as a call's tensors outgrow the caches), 8192 on a GPU.",
    )
    batch_max_wait_ms: float = Field(
        default=0.2, ge=0, le=1000, description="A lone request waits at most this long for others to batch with."
    )
    max_queue: int = Field(
        default=256, ge=1, le=1_000_000, description="Requests waiting for the scorer; past it, 503 with Retry-After."
    )
    request_deadline_ms: float = Field(
        default=500.0, gt=0, le=600_000,
        description="A request not scored within this is answered 503 (Retry-After); one that the queue cannot serve "
        "within half of it is refused at once.",
    )
    gil_switch_interval_ms: float = Field(
        default=0.2, gt=0, le=100,
        description="Python's GIL switch interval while serving (its default is 5 ms): how long the scoring thread "
        "may wait for the GIL while the event loop is busy, e.g. parsing requests under overload.",
    )
    # ONNX Runtime (service/scorer.py).
    ort_spinning: bool = Field(
        default=False, description="Intra-op threads busy-wait between ops (faster alone, steals the event loop's core)."
    )
    ort_optimized_model_dir: Path | None = Field(
        default=None, description="Save ONNX Runtime's optimised graph here (for inspection)."
    )
    shape_buckets: bool | None = Field(
        default=None, description="Pad candidates to powers of two and histories to max_history; default: on for GPUs."
    )
    trt_fp16: bool = Field(default=True, description="TensorRT in fp16 (DEVICE=tensorrt).")
    trt_cache_dir: Path | None = Field(
        default=None, description="TensorRT engine and timing cache; default: .trt-cache beside the bundle."
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)

    @property
    def store_timeout_s(self) -> float:
        return self.store_timeout_ms / 1000.0

    def batch_candidates(self, on_gpu: bool) -> int:
        """BATCH_MAX_CANDIDATES, or its default for the device the scorer runs on."""
        return self.batch_max_candidates or (GPU_BATCH_CANDIDATES if on_gpu else CPU_BATCH_CANDIDATES)

    def runtime_options(self):
        """The scorer's RuntimeOptions from these settings."""
        from service.scorer import RuntimeOptions

        return RuntimeOptions(
            device=self.device, intra_op_threads=self.intra_op_threads, allow_spinning=self.ort_spinning,
            optimized_model_dir=self.ort_optimized_model_dir, shape_buckets=self.shape_buckets,
            max_batch_candidates=max(self.batch_candidates(on_gpu=self.device in ("cuda", "tensorrt", "auto")), self.max_candidates),
            trt_fp16=self.trt_fp16, trt_cache_dir=self.trt_cache_dir,
        )  # fmt: skip

    def batcher_config(self, on_gpu: bool = False):
        """The micro-batcher's BatcherConfig from these settings (`on_gpu`: where the scorer runs)."""
        from service.batcher import BatcherConfig

        return BatcherConfig(
            max_batch_candidates=self.batch_candidates(on_gpu), max_wait_s=self.batch_max_wait_ms / 1000.0,
            max_queue=self.max_queue, deadline_s=self.request_deadline_ms / 1000.0,
        )  # fmt: skip
