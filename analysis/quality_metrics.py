"""Quality metrics per unit from recorded predictions and their labels (label windows, cohorts).

Label window
    A quality metric's ``window_s`` is how long a prediction waits for its label. A prediction
    counts once its label has arrived with a timestamp in [.., predicted_at + window), or once
    the window has passed without one; then the metric's ``missing_label`` decides: "" (the
    default) leaves it out, a JSON label (``"legitimate"``, ``0``) scores it against that label
    ("no chargeback means legitimate"). Predictions still in their window without a label wait.
    A label that arrives later with a timestamp inside the window replaces the default at the
    next run, as a late business event does.

Per unit
    Each counted prediction gets its score (``analysis.stats.quality``); a unit's value is the
    mean of its scores, and an arm's statistic is ``MeanStats`` over its units, grouped by the
    cohort (ramp step) of the unit's first recorded prediction, as ``analysis.unit_metrics``
    groups business metrics by first exposure, so ``analysis.cohorts`` compares arms within
    cohorts. Answers that could not be read (``status`` not ``ok``) and labels that cannot be
    scored against the prediction are left out and counted in ``QualityCoverage``.

Cost
    One pass over the experiment's sampled predictions joined to their labels, every run:
    storage and work grow with sampled predictions (``quality_sample_rate``), not with traffic.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from analysis.sql import fetch, table
from analysis.stats.moments import MeanStats, MetricStats
from analysis.stats.quality import SCORES
from experiments.contracts import MetricView
from routing.models import Label, Prediction

# metric key -> variant -> cohort index -> statistic (as analysis.unit_metrics.CohortStats)
CohortStats = dict[str, dict[str, dict[int, MetricStats]]]


@dataclass
class QualityCoverage:
    """What one arm's predictions have become: labelled, waiting, missing, unreadable."""

    predictions: int = 0
    unreadable: int = 0
    labelled: int = 0
    waiting: int = 0
    missing: int = 0
    delay_sum_s: float = 0.0
    settled_labelled: int = 0  # labelled, and the window has closed
    early: int = 0  # of those, labelled within half the window

    @property
    def decided(self) -> int:
        """Predictions whose outcome is known: labelled, or their window passed."""
        return self.labelled + self.missing

    @property
    def settled(self) -> int:
        """Predictions whose window has closed, labelled in it or not (label-balance input)."""
        return self.settled_labelled + self.missing

    @property
    def labelled_share(self) -> float | None:
        return self.labelled / self.decided if self.decided else None

    @property
    def mean_delay_s(self) -> float | None:
        return self.delay_sum_s / self.labelled if self.labelled else None

    def as_json(self) -> dict[str, Any]:
        return {
            "predictions": self.predictions,
            "unreadable": self.unreadable,
            "labelled": self.labelled,
            "waiting": self.waiting,
            "missing": self.missing,
            "labelled_share": self.labelled_share,
            "mean_label_delay_s": self.mean_delay_s,
        }


@dataclass(frozen=True, slots=True)
class _Row:
    variant: str
    unit: str
    predicted_at: float
    status: str
    prediction: Any
    label: Any
    labelled_at: float | None


def _rows(experiment_id: int, variants: Sequence[str] | None = None) -> Iterator[_Row]:
    """Predictions with their labels; only those of ``variants`` when given (routed arms:
    shadows' predictions of the same requests are compared in ``analysis.shadow_quality``)."""
    only = ""
    params: list[Any] = [experiment_id]
    if variants is not None:
        # An empty list selects nothing ("IN ()" is not SQL).
        marks = ", ".join(["%s"] * len(variants)) or "NULL"
        only = f"AND p.variant_key IN ({marks})"
        params.extend(variants)
    sql = f"""
        SELECT p.variant_key, p.unit_id, p.predicted_at, p.status, p.value,
               l.value, l.labelled_at
        FROM {table(Prediction)} p
        LEFT JOIN {table(Label)} l ON l.request_id = p.request_id
        WHERE p.experiment_id = %s {only}
    """
    for variant, unit, predicted_at, status, value, label, labelled_at in fetch(sql, params):
        yield _Row(
            variant=variant,
            unit=unit,
            predicted_at=float(predicted_at),
            status=status,
            prediction=orjson.loads(value) if status == "ok" and value else None,
            label=orjson.loads(label) if label is not None else None,
            labelled_at=None if labelled_at is None else float(labelled_at),
        )


def quality_cohort_stats(
    *,
    experiment_id: int,
    metrics: Sequence[MetricView],
    now: datetime,
    cohort_starts: Sequence[datetime] = (),
    variants: Sequence[str] | None = None,
) -> tuple[CohortStats, dict[str, dict[str, QualityCoverage]]]:
    """Per quality metric, variant and cohort, the per-unit statistics; and label coverage.

    Coverage is per metric (its window decides what is missing) and variant. ``variants``:
    only these (the routed arms; None: every variant with predictions).
    """
    quality = [metric for metric in metrics if metric.is_quality]
    if not quality:
        return {}, {}
    rows = list(_rows(experiment_id, variants))
    now_s = now.timestamp()
    starts = [start.timestamp() for start in cohort_starts]
    first_seen: dict[tuple[str, str], float] = {}
    for row in rows:
        key = (row.variant, row.unit)
        seen = first_seen.get(key)
        if seen is None or row.predicted_at < seen:
            first_seen[key] = row.predicted_at
    result: CohortStats = {}
    coverage: dict[str, dict[str, QualityCoverage]] = {}
    for metric in quality:
        score = SCORES[metric.source]
        window = float(metric.window_s)
        default = orjson.loads(metric.missing_label) if metric.missing_label else None
        per_unit: dict[tuple[str, str], list[float]] = {}
        arms: dict[str, QualityCoverage] = {}
        for row in rows:
            arm = arms.get(row.variant)
            if arm is None:
                arm = arms[row.variant] = QualityCoverage()
            arm.predictions += 1
            if row.status != "ok":
                arm.unreadable += 1
                continue
            closes = row.predicted_at + window
            if row.labelled_at is not None and row.labelled_at < closes:
                arm.labelled += 1
                delay = max(row.labelled_at - row.predicted_at, 0.0)
                arm.delay_sum_s += delay
                if closes <= now_s:
                    arm.settled_labelled += 1
                    arm.early += int(delay < window / 2)
                label = row.label
            elif closes <= now_s:
                arm.missing += 1
                if default is None:
                    continue
                label = default
            else:
                arm.waiting += 1
                continue
            value = score(row.prediction, label)
            if value is None:
                continue
            entry = per_unit.get((row.variant, row.unit))
            if entry is None:
                per_unit[(row.variant, row.unit)] = [value, 1.0]
            else:
                entry[0] += value
                entry[1] += 1.0
        sums: dict[str, dict[int, list[float]]] = {}
        for (variant, unit), (total, count) in per_unit.items():
            mean = total / count
            cohort = bisect.bisect_right(starts, first_seen[(variant, unit)])
            cell = sums.setdefault(variant, {}).setdefault(cohort, [0.0, 0.0, 0.0])
            cell[0] += 1.0
            cell[1] += mean
            cell[2] += mean * mean
        result[metric.key] = {
            variant: {
                cohort: MeanStats(n=int(n), sum=total, sum_squares=squares)
                for cohort, (n, total, squares) in by_cohort.items()
            }
            for variant, by_cohort in sums.items()
        }
        coverage[metric.key] = arms
    return result, coverage
