"""Service settings: one typed object, read from the environment (and an optional .env).

Injected into `create_app(settings)`, never read from an import-time global, so tests and
the CLI build exactly the service they want. Environment variables carry no prefix:
`BUNDLE`, `REDIS_URL`, `DEVICE`, `MAX_CANDIDATES`, ... (case-insensitive). Every field is
validated when the object is built; `settings_error_message` turns a failure into one line
that names the variable (what `din serve` prints instead of a traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from feature_store.connection import RedisAddress
from feature_store.keys import check_name
from model.cpu import cores

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
SECRET_FIELDS = frozenset({"admin_token", "api_keys", "redis_url"})
CPU_BATCH_CANDIDATES = 256  # per-candidate speed on the CPU falls as a call outgrows the caches (docs/benchmarks.md)
GPU_BATCH_CANDIDATES = 8192


def default_intra_op_threads() -> int:
    """The cores but one: the event loop (HTTP, JSON, Redis) needs a core of its own. Measured
    on 2 cores (docs/benchmarks.md): one ONNX Runtime thread served more requests/s than two,
    whose second thread fought the event loop for the same core."""
    return max(1, cores() - 1)


def header_secret_problem(secret: str) -> str | None:
    """Why `secret` cannot be sent in an HTTP header and matched (a bearer token, an X-API-Key), else None.

    Checked against uvicorn and FastAPI: a control character gets the request refused (400); a
    character outside ASCII is refused by httpx (`din reload`) and sent as UTF-8 by curl from a
    UTF-8 shell, while the service reads headers as latin-1, so it does not match (only a client
    that encodes latin-1 gets through, and none with a character beyond latin-1); leading or
    trailing whitespace is stripped from the header. Spaces and tabs inside arrive intact.
    """
    if any(not (" " <= c <= "~" or c == "\t") for c in secret):
        return "holds a character outside printable ASCII (non-ASCII or a control character), which an HTTP header cannot carry"
    if secret != secret.strip():
        return "begins or ends with whitespace, which is stripped from an HTTP header"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # ---------------------------------------------------------------- model and store
    bundle: Path = Field(
        description="Model bundle directory (model.onnx + bundle.json + vocab/), or a directory of bundles: "
        "its newest (`latest`) is served, and `POST /admin/reload` without a path re-reads it."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis holding user histories (redis://, rediss:// for TLS, unix://; a password goes in the "
        "URL: redis://:PASSWORD@host:6379/0). None: no store; every request is ranked with an empty history "
        "and marked degraded.",
    )
    redis_namespace: str = Field(default="din", min_length=1, description="Key namespace in Redis.")
    redis_cluster: bool = Field(
        default=False, description="Use the Redis Cluster client for REDIS_URL (same as a redis+cluster:// URL)."
    )
    ad_cache_size: int = Field(
        default=65_536, ge=1, le=1 << 26, description="Ad features cached in process (slots; rounded up to a power of 2)."
    )
    ad_cache_ttl_s: float = Field(
        default=60.0, gt=0, le=86_400, description="Seconds a cached ad feature (category) is used before re-reading it."
    )
    device: Device = Field(
        default="auto",
        description="auto: CUDA when a GPU is actually usable, else CPU; cpu; cuda; tensorrt (TensorRT "
        "fp16 with an engine cache, CUDA for what TensorRT cannot run). cuda/tensorrt: readiness fails "
        "when that provider cannot be used, instead of serving slowly on the CPU.",
    )
    intra_op_threads: int = Field(
        default_factory=default_intra_op_threads, ge=1, le=1024,
        description="ONNX Runtime intra-op threads (default: the cores but one, which the event loop needs).",
    )

    # ---------------------------------------------------------------- request limits
    max_candidates: int = Field(default=1000, ge=1, le=100_000, description="Candidates per /rank request.")
    max_top_k: int = Field(default=1000, ge=1, le=100_000, description="Largest top_k a request may ask for.")
    max_explain_cells: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="Largest candidates x history an `explain` request may return: returned candidates "
        "(top_k or all) times the model's max_history.",
    )
    max_events: int = Field(
        default=1000, ge=1, le=100_000,
        description="Behaviours per POST /events request: the history-length limit of ingestion.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, le=1 << 30,
        description="Largest request body, counted on the bytes received (chunked uploads too); above: 413.",
    )
    body_read_timeout_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="The whole request body must arrive within this many seconds of the request's headers; "
        "else 408 and the connection is closed (a client dribbling its body would hold a connection and a "
        "request slot without end: uvicorn times out idle connections only).",
    )

    # ---------------------------------------------------------------- feature store failures
    store_timeout_ms: float = Field(
        default=50.0, gt=0, le=60_000,
        description="Deadline for one store call, retries included; past it, /rank ranks degraded.",
    )
    store_connect_timeout_ms: float = Field(
        default=20.0, gt=0, le=60_000, description="TCP/TLS connect timeout of one Redis connection."
    )
    store_read_timeout_ms: float = Field(
        default=20.0, gt=0, le=60_000, description="Socket read/write timeout of one Redis command."
    )
    store_retries: int = Field(
        default=1, ge=0, le=10,
        description="Retries of a Redis command after a connection error or timeout (a pooled connection "
        "broken by a Redis restart reconnects on the retry).",
    )
    store_retry_backoff_ms: float = Field(
        default=1.0, ge=0, le=10_000, description="First retry backoff; doubles per retry (exponential)."
    )
    store_retry_backoff_cap_ms: float = Field(default=10.0, ge=0, le=60_000, description="Largest retry backoff.")
    store_health_check_interval_s: float = Field(
        default=5.0, ge=0, le=3600,
        description="A pooled connection idle this long is PINGed before use (0: never).",
    )
    store_max_connections: int = Field(default=64, ge=1, le=100_000, description="Redis connection pool size.")
    breaker_failure_threshold: int = Field(
        default=5, ge=1, le=10_000,
        description="Consecutive failed store calls that open the circuit (then /rank skips Redis).",
    )
    breaker_reset_ms: float = Field(
        default=1000.0, gt=0, le=3_600_000,
        description="How long the circuit stays open before one trial call (half-open) tests Redis again.",
    )

    # ---------------------------------------------------------------- security
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for admin and event-ingestion routes; unset: those routes are disabled.",
    )
    api_keys: Annotated[tuple[SecretStr, ...] | None, NoDecode] = Field(
        default=None,
        description="Comma-separated API keys; when set, POST /rank needs one in the X-API-Key header.",
    )

    # ---------------------------------------------------------------- micro-batching and overload (service/batcher.py)
    batch_max_candidates: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="A batch goes at once when it holds this many candidates. Default: 256 on the CPU (per-candidate "
        "speed falls as a call's tensors outgrow the caches), 8192 on a GPU.",
    )
    score_chunk_candidates: int | None = Field(
        default=None, ge=0, le=1_000_000,
        description="A batch with more candidates is scored in several ONNX Runtime calls of whole users, each "
        "holding at most this many (a bigger user alone). Default: 256 on the CPU, where cache-sized calls score "
        "faster; 0 (one call) on a GPU. 0: always one call.",
    )
    batch_max_wait_ms: float = Field(
        default=0.2, ge=0, le=1000, description="A lone request waits at most this long for others to batch with."
    )
    batch_pipeline_depth: int = Field(
        default=2, ge=1, le=8,
        description="Batches formed ahead of the scorer: the next batch's histories are fetched while one is scored "
        "(1: fetch and score strictly in turn).",
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

    # ---------------------------------------------------------------- ONNX Runtime (service/scorer.py)
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

    # ---------------------------------------------------------------- process
    host: str = Field(default="127.0.0.1", min_length=1, description="Interface `din serve` binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `din serve` binds.")
    log_level: LogLevel = Field(default="info", description="Log level of the service.")
    log_format: LogFormat = Field(default="json", description="json: one JSON object per line; text: for humans.")
    access_log: bool = Field(default=True, description="One log line per request (with its request id).")
    keep_alive_s: float = Field(
        default=75.0, gt=0, le=3600,
        description="An idle keep-alive connection is closed after this long. Keep it longer than the idle timeout "
        "of whatever sits in front (AWS ALB 60 s, nginx 75 s): a request sent on a connection the service is closing "
        "fails (a 502 at the balancer); uvicorn's own default is 5 s.",
    )
    max_connections: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Open connections uvicorn serves (its limit_concurrency): while more are open, every new "
        "request is answered 503 and its connection closed. Unset: no cap.",
    )
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="On SIGTERM: stop accepting, then wait this long for in-flight requests before closing.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = tuple(k.strip() for k in value.split(",") if k.strip())
            if value.strip() and not keys:  # e.g. " , ": meant to protect /rank, would leave it open
                raise ValueError("holds no key; list keys separated by commas, or leave it empty to keep /rank open")
            return keys or None
        return value or None

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: tuple[SecretStr, ...] | None) -> tuple[SecretStr, ...] | None:
        if keys and any(len(k.get_secret_value()) < 8 for k in keys):
            raise ValueError("every API key must have at least 8 characters")
        for k in keys or ():  # sent as X-API-Key
            if problem := header_secret_problem(k.get_secret_value()):
                raise ValueError(f"an API key {problem}")
        return keys

    @field_validator("admin_token", "redis_url", "max_connections", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`ADMIN_TOKEN=` (as docker compose passes an unset variable) means "not configured"."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_usable(cls, url: str | None) -> str | None:
        """Checked here, not when the service connects: a typo stops `din serve` before the model loads."""
        if url is not None:
            RedisAddress.parse(url)  # raises naming the scheme it cannot use
        return url

    @field_validator("redis_namespace")
    @classmethod
    def _namespace_usable(cls, namespace: str) -> str:
        return check_name(namespace, "namespace")

    @field_validator("admin_token")
    @classmethod
    def _token_long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 8:
            raise ValueError("the admin token must have at least 8 characters")
        if token is not None and (problem := header_secret_problem(token.get_secret_value())):
            raise ValueError(f"the admin token {problem}")  # sent as Authorization: Bearer <token>
        return token

    def doubtful(self) -> list[str]:
        """Valid but probably unintended combinations, logged as warnings when the service starts."""
        found = []
        if self.store_timeout_ms >= self.request_deadline_ms:
            found.append(
                f"STORE_TIMEOUT_MS ({self.store_timeout_ms:g}) is not below REQUEST_DEADLINE_MS "
                f"({self.request_deadline_ms:g}): a slow store makes /rank answer 503 (deadline) instead of "
                "ranking degraded without history"
            )
        return found

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
            trt_fp16=self.trt_fp16, trt_cache_dir=self.trt_cache_dir, chunk_candidates=self.score_chunk_candidates,
        )  # fmt: skip

    def batcher_config(self, on_gpu: bool = False):
        """The micro-batcher's BatcherConfig from these settings (`on_gpu`: where the scorer runs)."""
        from service.batcher import BatcherConfig

        return BatcherConfig(
            max_batch_candidates=self.batch_candidates(on_gpu), max_wait_s=self.batch_max_wait_ms / 1000.0,
            max_queue=self.max_queue, deadline_s=self.request_deadline_ms / 1000.0,
            pipeline_depth=self.batch_pipeline_depth,
        )  # fmt: skip


def settings_error_message(error: ValidationError) -> str:
    """One line naming each bad variable, its value (secrets hidden) and what is wrong."""
    parts = []
    for e in error.errors(include_url=False):
        field = str(e["loc"][0]) if e["loc"] else "?"
        var = field.upper()
        if e["type"] == "missing":
            parts.append(f"{var} is required but not set")
            continue
        shown = "" if field in SECRET_FIELDS or "input" not in e else f"={e['input']!r}"
        parts.append(f"{var}{shown}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(parts)
