"""Per-unit business metrics by ramp-step cohort: read, combine, and say how (STATS.md 12.2).

A unit belongs to the period in force at its first exposure (`experiments.periods`): a ramp
step, a pause, the time after the end. `unit_metric_aggregates` reads each metric's windowed
statistics per (variant, cohort) (`analysis.unit_metrics.cohort_stats`) and combines the
cohorts with the fixed weights of `analysis.stats.strata.standardize`. An experiment with a
single period (an A/B test never paused) is analysed "pooled"; any other is "stratified by
ramp step". Rows of the result snapshot carry the construction (`annotate_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from analysis.quality_metrics import quality_cohort_stats
from analysis.stats.moments import MetricStats
from analysis.stats.strata import POOLED, STRATIFIED, Standardized, standardize
from analysis.unit_metrics import cohort_stats, is_unit_metric, pool_cohorts
from experiments.contracts import ExperimentView, StepPeriod
from experiments.periods import step_periods

CONSTRUCTION_LABELS = {
    POOLED: "pooled (the experiment never ramped or paused)",
    STRATIFIED: "stratified by ramp step (arms compared within each cohort of first exposure)",
}


def unit_metric_aggregates(
    *,
    experiment: ExperimentView,
    tail_after: int,
    now: datetime,
    periods: Sequence[StepPeriod] | None = None,
) -> tuple[dict[str, dict[str, MetricStats]], dict[str, Standardized]]:
    """Per metric: the statistic of each arm to compare, and how it was built."""
    metrics = [
        use.metric
        for use in experiment.metrics
        if is_unit_metric(use.metric) or use.metric.is_quality
    ]
    if not metrics:
        return {}, {}
    if periods is None:
        periods = step_periods(experiment_id=experiment.id)
    starts = [period.start for period in periods[1:]]
    construction = STRATIFIED if len(periods) > 1 else POOLED
    by_cohort = cohort_stats(
        experiment_id=experiment.id,
        metrics=metrics,
        tail_after=tail_after,
        now=now,
        cohort_starts=starts,
    )
    # Model-quality metrics: per unit too, from predictions and their labels.
    routed = [variant.key for variant in experiment.routed_variants]
    quality, _ = quality_cohort_stats(
        experiment_id=experiment.id,
        metrics=metrics,
        now=now,
        cohort_starts=starts,
        variants=routed,
    )
    by_cohort.update(quality)
    business: dict[str, dict[str, MetricStats]] = {}
    constructions: dict[str, Standardized] = {}
    for metric in metrics:
        strata = by_cohort.get(metric.key, {})
        # Arms with no user yet (a canary before its first one, a weight of 0) wait; with
        # fewer than two arms there is nothing to compare, and each arm shows its own data.
        arms = [arm for arm in routed if strata.get(arm)]
        if len(arms) < 2:
            business[metric.key] = pool_cohorts(strata)
            continue
        combined = standardize(strata, arms=arms, construction=construction)
        business[metric.key] = dict(combined.stats)
        constructions[metric.key] = combined
    return business, constructions


def construction_json(combined: Standardized) -> dict[str, Any]:
    """What a result row says about the construction (API field `construction`)."""
    return {
        "method": combined.construction,
        "label": CONSTRUCTION_LABELS[combined.construction],
        "cohorts_used": combined.cohorts_used,
        "cohorts_seen": combined.cohorts_seen,
        "units_left_out": dict(sorted(combined.left_out.items())),
    }


def annotate_rows(
    rows: Sequence[dict[str, Any]], constructions: Mapping[str, Standardized]
) -> None:
    """Add `construction` to the rows of per-unit metrics (in place)."""
    for row in rows:
        combined = constructions.get(str(row.get("metric", "")))
        if combined is not None:
            row["construction"] = construction_json(combined)
