"""Label health of one look: labelled share and label delay per arm, and the balance warning.

For experiments with a quality metric, the result snapshot's ``health`` gets a ``labels``
entry (``label_health_json``): per arm the predictions, unreadable answers, labelled ones,
those waiting in their window and those whose window passed without a label, the labelled
share and the mean label delay, for the first quality metric's window; and two anytime-valid
``analysis.stats.label_balance`` tests across the routed arms, on predictions whose window has
closed: ``balance`` (labelled in the window or not) and ``delay`` (among labelled ones,
labelled within half the window or not). A flagged test is a warning on the experiment page
(the comparison may be biased); it never holds or rolls back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from analysis.quality_metrics import QualityCoverage, quality_cohort_stats
from analysis.stats.label_balance import label_balance
from experiments.contracts import ExperimentView


def label_health_json(view: ExperimentView, *, now: datetime) -> dict[str, Any]:
    """``{"labels": {...}}`` for the snapshot's health, or ``{}`` without quality metrics."""
    quality = [use.metric for use in view.metrics if use.metric.is_quality]
    if not quality:
        return {}
    metric = quality[0]
    routed = [variant.key for variant in view.routed_variants]
    _, coverage = quality_cohort_stats(
        experiment_id=view.id, metrics=[metric], now=now, variants=routed
    )
    by_arm = coverage.get(metric.key, {})
    arms = {key: by_arm[key].as_json() for key in routed if key in by_arm}
    seen = [by_arm[key] for key in routed if key in by_arm]
    balance = delay = None
    if len(seen) >= 2:
        balance = _test_json([arm.settled_labelled for arm in seen], [arm.settled for arm in seen])
        delay = _test_json([arm.early for arm in seen], [arm.settled_labelled for arm in seen])
        delay["early_shares"] = dict(zip(arms, _early_shares(seen), strict=True))
    return {
        "labels": {
            "metric": metric.key,
            "window_s": metric.window_s,
            "arms": arms,
            "balance": balance,
            "delay": delay,
        }
    }


def _early_shares(seen: list[QualityCoverage]) -> list[float | None]:
    """Per arm, the share of settled labelled predictions labelled within half the window."""
    return [arm.early / arm.settled_labelled if arm.settled_labelled else None for arm in seen]


def _test_json(hits: list[int], totals: list[int]) -> dict[str, Any]:
    result = label_balance(hits, totals)
    return {
        "p": result.p_value,
        "e_value_log": result.log_e_value,
        "flagged": result.flagged,
        "enough_data": result.enough_data,
        "threshold": result.threshold,
    }
