"""Prometheus metrics of the events API (``POST /v1/events``, ``routing.edge.ingest``).

The objects live in prometheus_client's default registry, so whoever serves /metrics exposes
them. Label values are a fixed set of error codes, never anything a client sends.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS_ACCEPTED = Counter(
    "rampart_events_accepted_total",
    "Events written by the events API (first time their event_id was seen).",
)
EVENTS_DUPLICATE = Counter(
    "rampart_events_duplicates_total",
    "Events ignored because their event_id was already stored or repeated in the same batch.",
)
EVENTS_REJECTED = Counter(
    "rampart_events_rejected_total",
    "Events in batches refused as a whole because one of them was invalid.",
)
REQUESTS_REJECTED = Counter(
    "rampart_event_requests_rejected_total",
    "Requests to the events API answered with an error, by error code.",
    ["code"],
)
WRITE_ERRORS = Counter(
    "rampart_event_write_errors_total",
    "Batches whose database transaction failed (answered 503; the client retries).",
)
BATCH_SECONDS = Histogram(
    "rampart_event_batch_seconds",
    "Time to validate and write one accepted batch, from the full body to the answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_EVENTS = Histogram(
    "rampart_event_batch_events",
    "Events per accepted batch.",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
)
