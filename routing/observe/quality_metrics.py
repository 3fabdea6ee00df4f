"""Prometheus metrics of model-quality tracking: predictions the proxy reads, labels the edge takes.

The objects live in prometheus_client's default registry, so whoever serves /metrics exposes
them. Label values are fixed sets (read outcomes, drop causes, error codes), never anything a
client sends. The proxy counts predictions in plain integers and adds them here at each flush
(``routing.observe.predictions``), so a request never pays for a counter's lock.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PREDICTIONS_READ = Counter(
    "rampart_predictions_read_total",
    "Sampled proxied answers by what reading the prediction gave: ok, not_json, missing (no"
    " value at the path), wrong_type (a value that does not fit the kind), streamed (an answer"
    " too large to read whole, not recorded).",
    ["outcome"],
)
PREDICTIONS_WRITTEN = Counter(
    "rampart_predictions_written_total",
    "Prediction rows inserted (a request id already stored for the variant not counted).",
)
PREDICTIONS_DROPPED = Counter(
    "rampart_predictions_dropped_total",
    "Prediction rows dropped: buffer full, experiment gone, or refused by the database.",
    ["cause"],
)
PREDICTIONS_BUFFERED = Gauge(
    "rampart_predictions_buffered",
    "Prediction rows waiting in memory for the next flush (all live workers).",
    multiprocess_mode="livesum",
)
PREDICTIONS_FLUSH_ERRORS = Counter(
    "rampart_prediction_flush_errors_total",
    "Bulk inserts of predictions that failed and were retried.",
)
LABELS_ACCEPTED = Counter(
    "rampart_labels_accepted_total",
    "Labels written by the labels API (first label of their request id).",
)
LABELS_DUPLICATE = Counter(
    "rampart_labels_duplicates_total",
    "Labels ignored because their request id already had one.",
)
LABELS_UNMATCHED = Counter(
    "rampart_labels_unmatched_total",
    "Labels written for a request id with no recorded prediction when they arrived (an unknown"
    " or unsampled request, or one whose prediction was still buffered).",
)
LABEL_REQUESTS_REJECTED = Counter(
    "rampart_label_requests_rejected_total",
    "Requests to the labels API answered with an error, by error code.",
    ["code"],
)
