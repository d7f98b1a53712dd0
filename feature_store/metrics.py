"""Prometheus counters of the feature store, in the default registry of the process.

The service's registry (service/metrics.py) registers CORRUPT_VALUES too, so GET /metrics
shows `din_store_corrupt_values_total{kind}`; events are counted per app by POST /events
(`din_events_total{outcome}`), the two below serve other embedders of the store.
"""

from __future__ import annotations

from prometheus_client import Counter

CORRUPT_VALUES = Counter(
    "din_store_corrupt_values",
    "Stored values that could not be decoded and were served as unknown (kind: user, ad, or a version's meta)",
    ["kind"],
)
EVENTS_APPLIED = Counter("din_store_events_applied", "Live behaviour events appended to a user's history")
EVENTS_DUPLICATE = Counter(
    "din_store_events_duplicate", "Live events whose event_id the user had already seen (not appended again)"
)
