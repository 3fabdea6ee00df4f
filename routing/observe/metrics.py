"""Prometheus metrics of the edge's decisions, routing snapshot and the two recorders.

The objects live in prometheus_client's default registry; whoever serves /metrics exposes
them. Hot-path counters are incremented through cached label children, so a decision pays
one dict lookup and one lock-protected add, not a label resolution.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

DECISIONS = Counter(
    "rampart_decisions",
    "Decisions answered by the edge, by experiment, variant served and reason.",
    ["experiment", "variant", "reason"],
)

# With PROMETHEUS_MULTIPROC_DIR (several workers per host), one scrape reports, over the
# live processes: the oldest snapshot any of them serves (a worker that fell behind shows),
# the stalest confirmation, and the buffered rows of all of them.
SNAPSHOT_VERSION = Gauge(
    "rampart_snapshot_version",
    "Config version of the routing snapshot served (the oldest over live worker processes).",
    multiprocess_mode="livemin",
)
SNAPSHOT_BUILT = Gauge(
    "rampart_snapshot_built_timestamp_seconds",
    "Unix time at which the routing snapshot in use was built (the oldest over live workers).",
    multiprocess_mode="livemin",
)
SNAPSHOT_AGE = Gauge(
    "rampart_snapshot_age_seconds",
    "Seconds since the snapshot was last confirmed to match the config version (the longest"
    " over live workers).",
    multiprocess_mode="livemax",
)
SNAPSHOT_REBUILDS = Counter(
    "rampart_snapshot_rebuilds", "Routing snapshots built because the config version changed."
)
SNAPSHOT_ERRORS = Counter(
    "rampart_snapshot_refresh_errors",
    "Failed checks or rebuilds of the routing snapshot (the previous snapshot stays in use).",
)
SNAPSHOT_EXPERIMENTS = Gauge(
    "rampart_snapshot_experiments",
    "Experiments in the routing snapshot, by status (the most over live workers).",
    ["status"],
    multiprocess_mode="livemax",
)

RECORDER_ACCEPTED = Counter(
    "rampart_exposures_accepted", "First exposures accepted into the recorder's buffer."
)
RECORDER_BUFFERED = Gauge(
    "rampart_exposures_buffered",
    "Exposure rows waiting in memory for the next flush (all live workers).",
    multiprocess_mode="livesum",
)
RECORDER_WRITTEN = Counter(
    "rampart_exposures_written",
    "Exposure rows inserted (rows the unique constraint turned away as duplicates not counted).",
)
RECORDER_DROPPED = Counter(
    "rampart_exposures_dropped",
    "Exposure rows dropped: buffer full, or the experiment no longer exists.",
    ["cause"],
)
RECORDER_SKIPPED = Counter(
    "rampart_exposures_skipped_cached",
    "Exposures not buffered because this process already recorded the same unit and variant.",
)
RECORDER_FLUSH_ERRORS = Counter(
    "rampart_exposure_flush_errors", "Bulk inserts of exposures that failed and were retried."
)
FLUSH_BACKOFF = Gauge(
    "rampart_flush_backoff_seconds",
    "Seconds a buffered writer (exposures, observations) waits before its next flush after"
    " failed ones; 0 while flushes succeed (the longest over live workers).",
    ["writer"],
    multiprocess_mode="livemax",
)
OBSERVATION_FLUSHES = Counter(
    "rampart_observation_flushes_total",
    "Observation flushes by outcome: ok or failed (rows are kept and retried).",
    ["outcome"],
)
OBSERVATION_ROWS_WRITTEN = Counter(
    "rampart_observation_rows_written_total",
    "ObservationBucket rows written.",
)
OBSERVATION_CELLS_DROPPED = Counter(
    "rampart_observation_cells_dropped_total",
    "Aggregated observation cells dropped because the buffer was full while writes failed.",
)
OBSERVATION_BUFFERED_CELLS = Gauge(
    "rampart_observation_buffered_cells",
    "Aggregated (experiment, variant, bucket) cells waiting to be written (all live processes).",
    multiprocess_mode="livesum",
)

EDGE_CONNECTIONS = Gauge(
    "rampart_edge_connections",
    "Client connections the edge holds (all live workers; updated by the slow-client sweep).",
    multiprocess_mode="livesum",
)
EDGE_SLOW_CLIENTS = Counter(
    "rampart_edge_slow_clients",
    "Connections closed because a request's headers or body did not arrive in time, by phase.",
    ["phase"],
)
EDGE_CONNECTIONS_REFUSED = Counter(
    "rampart_edge_connections_refused",
    "Connections answered 503 and closed at once because the process held EDGE_MAX_CONNECTIONS.",
)

_children: dict[tuple[str, str, str], MetricWrapperBase] = {}
# A route has a handful of (variant, reason) pairs, so the cache stays small; the bound only
# guards against an unbounded set of experiment keys in a long-lived process.
_MAX_CHILDREN = 100_000


def count_decision(experiment: str, variant: str, reason: str) -> None:
    """Add one decision to ``rampart_decisions_total``."""
    labels = (experiment, variant, reason)
    child = _children.get(labels)
    if child is None:
        if len(_children) >= _MAX_CHILDREN:
            _children.clear()
        child = DECISIONS.labels(*labels)
        _children[labels] = child
    child.inc()  # type: ignore[attr-defined]
