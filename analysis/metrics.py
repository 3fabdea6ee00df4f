"""Prometheus metrics of the analysis pipeline: runs, decisions, rollbacks, ramp steps, alerts.

The objects live in prometheus_client's default registry; whoever serves /metrics (the
edge, or a worker's exporter) exposes them.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ANALYSIS_RUN_SECONDS = Histogram(
    "rampart_analysis_run_seconds",
    "Wall time of one analysis run of one experiment (aggregation, statistics, actions).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ANALYSIS_RUNS = Counter(
    "rampart_analysis_runs",
    "Analysis runs by outcome: the decision taken, or skipped (not running) or error.",
    ["outcome"],
)
ROLLBACKS = Counter(
    "rampart_rollbacks",
    "Experiments rolled back by the analysis, by cause (guardrail or health).",
    ["cause"],
)
RAMP_STEPS = Counter(
    "rampart_ramp_steps",
    "Canary ramp steps taken by the analysis (advance or complete).",
    ["action"],
)
ALERT_DELIVERIES = Counter(
    "rampart_alert_deliveries",
    "Alert delivery attempts by destination type and result (success, failure, dead).",
    ["destination", "result"],
)
