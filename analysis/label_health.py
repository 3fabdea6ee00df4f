"""Label health of one look: labelled share and label delay per arm, and the balance warning.

For experiments with a quality metric, the result snapshot's ``health`` gets a ``labels``
entry (``label_health_json``): per arm the predictions, unreadable answers, labelled ones,
those waiting in their window and those whose window passed without a label, the labelled
share and the mean label delay, for the first quality metric's window; and the
``analysis.stats.label_balance`` test across the routed arms. A flagged test is a warning
on the experiment page (the comparison may be biased); it never holds or rolls back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from analysis.quality_metrics import quality_cohort_stats
from analysis.stats.label_balance import label_balance
from experiments.contracts import ExperimentView


def label_health_json(view: ExperimentView, *, now: datetime) -> dict[str, Any]:
    """``{"labels": {...}}`` for the snapshot's health, or ``{}`` without quality metrics."""
    quality = [use.metric for use in view.metrics if use.metric.is_quality]
    if not quality:
        return {}
    metric = quality[0]
    _, coverage = quality_cohort_stats(experiment_id=view.id, metrics=[metric], now=now)
    by_arm = coverage.get(metric.key, {})
    routed = [variant.key for variant in view.routed_variants]
    arms = {key: by_arm[key].as_json() for key in routed if key in by_arm}
    balance: dict[str, Any] | None = None
    if len(arms) >= 2:
        result = label_balance(
            [by_arm[key].labelled for key in routed if key in by_arm],
            [by_arm[key].decided for key in routed if key in by_arm],
        )
        balance = {
            "p": result.p_value,
            "flagged": result.flagged,
            "enough_data": result.enough_data,
            "threshold": result.threshold,
        }
    return {
        "labels": {
            "metric": metric.key,
            "window_s": metric.window_s,
            "arms": arms,
            "balance": balance,
        }
    }
