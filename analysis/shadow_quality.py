"""A shadow's model quality paired with control's: both predictions of one request, one label.

With quality tracking on, the proxy records a shadow's prediction of a sampled request that
control answered under the same request id as control's (``routing.proxy.predictions``). When
the request's label arrives, both predictions are scored against it (``analysis.stats.quality``)
and form a pair. The label window and ``missing_label`` rules are the quality metrics'
(``analysis.quality_metrics``): a pair counts once its label arrived within the metric's window
or the window passed (then scored against ``missing_label``, or left out when there is none);
pairs still in their window wait.

The user is the unit (STATS.md 12.1): each user contributes the pair of its first request with
both predictions readable, chosen by time, never by the label or the scores; a user whose first
pair has not settled yet waits. Its sums go to ``analysis.stats.shadow_pairs`` as a
``PairedLatency`` of (control's score, the shadow's score), whose ratio CS then bounds
E shadow / E control of the metric.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from analysis.sql import fetch, table
from analysis.stats.quality import SCORES
from analysis.stats.shadow_pairs import PairedLatency, QualityPairs
from experiments.contracts import ExperimentView
from routing.models import Label, Prediction


def _first_pairs(
    experiment_id: int, control_key: str, shadow_key: str
) -> dict[str, tuple[float, Any, Any, Any, float | None]]:
    """Per user, its first request with both predictions readable (and that request's label)."""
    sql = f"""
        SELECT c.unit_id, c.predicted_at, c.value, s.value, l.value, l.labelled_at
        FROM {table(Prediction)} c
        JOIN {table(Prediction)} s
          ON s.request_id = c.request_id AND s.experiment_id = c.experiment_id
         AND s.variant_key = %s AND s.status = 'ok'
        LEFT JOIN {table(Label)} l ON l.request_id = c.request_id
        WHERE c.experiment_id = %s AND c.variant_key = %s AND c.status = 'ok'
    """
    first: dict[str, tuple[float, Any, Any, Any, float | None]] = {}
    for unit, predicted_at, control, shadow, label, labelled_at in fetch(
        sql, [shadow_key, experiment_id, control_key]
    ):
        at = float(predicted_at)
        seen = first.get(unit)
        if seen is None or at < seen[0]:
            first[unit] = (
                at,
                orjson.loads(control),
                orjson.loads(shadow),
                None if label is None else orjson.loads(label),
                None if labelled_at is None else float(labelled_at),
            )
    return first


def shadow_quality_pairs(
    view: ExperimentView, shadow_key: str, *, now: datetime
) -> tuple[QualityPairs, ...]:
    """Per quality metric of the experiment, the users' settled (control, shadow) score pairs."""
    uses = [use for use in view.metrics if use.metric.is_quality]
    if view.quality is None or not uses:
        return ()
    first = _first_pairs(view.id, view.control.key, shadow_key)
    now_s = now.timestamp()
    result = []
    for use in uses:
        metric = use.metric
        score = SCORES[metric.source]
        window = float(metric.window_s)
        default = orjson.loads(metric.missing_label) if metric.missing_label else None
        sums = [0, 0.0, 0.0, 0.0, 0.0, 0.0]
        for predicted_at, control, shadow, label, labelled_at in first.values():
            closes = predicted_at + window
            if labelled_at is not None and labelled_at < closes:
                truth = label
            elif closes <= now_s and default is not None:
                truth = default
            else:
                continue
            c, s = score(control, truth), score(shadow, truth)
            if c is None or s is None:
                continue
            sums[0] += 1
            sums[1] += c
            sums[2] += s
            sums[3] += c * c
            sums[4] += s * s
            sums[5] += c * s
        result.append(
            QualityPairs(
                metric=metric.key,
                name=metric.name,
                higher_is_better=metric.direction == "higher",
                margin=use.margin,
                pairs=PairedLatency(int(sums[0]), *sums[1:]),
            )
        )
    return tuple(result)
