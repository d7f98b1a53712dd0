"""Every Prometheus metric of the service, defined in one place (served by GET /metrics).

One `ServiceMetrics` per app, each with its own CollectorRegistry: two apps in one process
(tests, a reload of the app) never clash over metric names. Routes, the micro-batcher, the
store guard and event ingestion update the attributes below; nothing else defines metrics,
except the feature store's corrupt-value counter (feature_store/metrics.py), counted where
values are decoded and registered here too.

Names follow Prometheus conventions (`_seconds`, `_total`, base units). Route labels are
route templates (`/rank`), never raw paths, so a scan of random URLs cannot blow up the
number of series.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client import gc_collector, platform_collector, process_collector

from feature_store import metrics as store_metrics

# Request latency: the budget is ~10 ms, so resolution is finest there.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10_000, 100_000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# din_store_circuit_state values
CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN = 0, 1, 2


class ServiceMetrics:
    """The service's metrics in a registry of its own; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=r)  # memory, CPU, open fds
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)

        # HTTP
        self.request_seconds = Histogram(
            "din_http_request_duration_seconds",
            "Time from request start to the end of the response body; status 499: the client closed the "
            "connection before its response was complete.",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests_in_flight = Gauge(
            "din_http_requests_in_flight", "HTTP requests being handled now.", registry=r
        )
        # Ranking
        self.rank_candidates = Histogram(
            "din_rank_candidates", "Candidates per POST /rank request.", buckets=CANDIDATE_BUCKETS, registry=r
        )
        self.degraded_responses = Counter(
            "din_degraded_responses_total",
            "POST /rank answers ranked without history, by why: no_store, timeout, unavailable, circuit_open, busy, error.",
            ["reason"], registry=r,
        )
        # Scoring (the micro-batcher sets queue depth and batch sizes; one request is a batch of 1)
        self.batch_requests = Histogram(
            "din_scoring_batch_requests", "Requests scored together in one micro-batch.",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_candidates = Histogram(
            "din_scoring_batch_candidates", "Candidates scored in one micro-batch.",
            buckets=CANDIDATE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "din_scoring_queue_depth", "Requests waiting for the scorer.", registry=r
        )
        self.overload_rejections = Counter(
            "din_overload_rejections_total",
            "POST /rank refused with 503 by the micro-batcher, by reason: queue_full (or more queued work than "
            "half the deadline), deadline (not scored in time), shutting_down.",
            ["reason"], registry=r,
        )
        # Feature store
        self.store_seconds = Histogram(
            "din_store_request_duration_seconds", "Duration of successful feature-store calls.",
            ["op"], buckets=STORE_BUCKETS, registry=r,
        )
        self.store_errors = Counter(
            "din_store_errors_total",
            "Failed or skipped feature-store calls, by reason: timeout, unavailable, circuit_open, busy, error.",
            ["op", "reason"], registry=r,
        )
        self.store_circuit_state = Gauge(
            "din_store_circuit_state", "Feature-store circuit breaker: 0 closed, 1 half-open, 2 open.", registry=r
        )
        # din_store_corrupt_values_total{kind}: the store counts these where it decodes values,
        # below the routes, in one process-wide counter; exposed here as it is.
        r.register(store_metrics.CORRUPT_VALUES)
        # Events (POST /events)
        self.events = Counter(
            "din_events_total",
            "POST /events behaviours by outcome: stored (appended), duplicate (event_id already seen), "
            "refused (503: the store could not take them).",
            ["outcome"], registry=r,
        )
        for outcome in ("stored", "duplicate", "refused"):
            self.events.labels(outcome)  # every series from the start, at 0: rate() sees the first events
        # Model
        self.model_info = Info("din_model", "The model serving now.", registry=r)
        self.model_load_seconds = Gauge(
            "din_model_load_duration_seconds", "Load + warm-up time of the model serving now.", registry=r
        )
        self.model_loaded_at = Gauge(
            "din_model_loaded_timestamp_seconds", "Unix time the model serving now was swapped in.", registry=r
        )
        self.model_reloads = Counter(
            "din_model_reloads_total", "Hot reloads by outcome: ok, unchanged, refused.", ["outcome"], registry=r
        )

    def set_model(self, version: str, model_type: str, load_seconds: float) -> None:
        self.model_info.info({"version": version, "type": model_type})
        self.model_load_seconds.set(load_seconds)
        self.model_loaded_at.set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
