"""Shadow verdicts: fold each shadow's paired buckets, judge it, alert once when judged.

Each analysis run of an experiment with shadow variants calls :func:`shadow_analyses_update`
in the transaction that holds the experiment's ``AnalysisState`` row (so runs never race).
Per shadow it folds the settled shadow buckets (``routing.models.ObservationBucket`` rows with
``is_shadow``, ``cursor < id <= horizon``: the one-run lag of ``analysis.aggregation``, for the
same reason) into ``ShadowAnalysis``, adds the unsettled tail, and asks
``analysis.stats.shadow_pairs.shadow_verdict`` for a verdict with the tolerances of the
``SHADOW_*`` settings. The first verdict other than "collecting" is kept and alerted once
(the outbox's dedupe key names the shadow); later looks only refresh the intervals shown.
Experiments without shadows cost nothing here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Max, Sum

from analysis import alerts
from analysis.models import ShadowAnalysis
from analysis.shadow_quality import shadow_quality_pairs
from analysis.stats.shadow_pairs import (
    PairedLatency,
    QualityPairs,
    ShadowInputs,
    ShadowResult,
    Tolerances,
    shadow_verdict,
)
from experiments.contracts import ExperimentView
from routing.models import ObservationBucket
from routing.observe.shadow_pairs import PairCell

# The pair count at which the latency and quantile boundaries are tightest; fixed for the life
# of an experiment (changing it between looks would void the time-uniform guarantee).
SHADOW_N_STAR = 2000.0
_CHUNK = 500


def tolerances() -> Tolerances:
    return Tolerances(
        latency_increase=float(settings.SHADOW_MAX_LATENCY_INCREASE),
        p95_increase=float(settings.SHADOW_MAX_P95_INCREASE),
        disagreement=float(settings.SHADOW_MAX_DISAGREEMENT),
        min_pairs=int(settings.SHADOW_MIN_PAIRS),
    )


@dataclass
class _Totals:
    pairs: PairCell = field(default_factory=PairCell)
    compared: int = 0
    disagreements: int = 0
    abs_diff_sum: float = 0.0
    abs_diff_sum_sq: float = 0.0

    def add_row(self, row: ShadowAnalysis) -> None:
        if row.pairs:
            self.pairs.merge(PairCell.from_json(row.pairs))
        self.compared += row.compared
        self.disagreements += row.disagreements
        self.abs_diff_sum += row.abs_diff_sum
        self.abs_diff_sum_sq += row.abs_diff_sum_sq


def _fold(totals: _Totals, experiment_id: int, variant_key: str, low: int, high: int | None) -> int:
    """Add the shadow buckets with low < id (<= high) to totals; returns the largest id seen."""
    rows = ObservationBucket.objects.filter(
        experiment_id=experiment_id, variant_key=variant_key, is_shadow=True, id__gt=low
    )
    if high is not None:
        rows = rows.filter(id__lte=high)
    sums = rows.aggregate(
        compared=Sum("compared_count"),
        disagreements=Sum("disagreement_count"),
        abs_sum=Sum("abs_diff_sum"),
        abs_sq=Sum("abs_diff_sum_sq"),
        top=Max("id"),
    )
    if sums["top"] is None:
        return low
    totals.compared += int(sums["compared"] or 0)
    totals.disagreements += int(sums["disagreements"] or 0)
    totals.abs_diff_sum += float(sums["abs_sum"] or 0.0)
    totals.abs_diff_sum_sq += float(sums["abs_sq"] or 0.0)
    texts = rows.exclude(pairs="").values_list("pairs", flat=True)
    for text in texts.iterator(chunk_size=_CHUNK):
        totals.pairs.merge(PairCell.from_json(text))
    return int(sums["top"])


def _inputs(totals: _Totals, quality: tuple[QualityPairs, ...] = ()) -> ShadowInputs:
    """The users' pairs (one per user, STATS.md 12.1) as the statistics' inputs."""
    cell = totals.pairs
    return ShadowInputs(
        pairs=PairedLatency(
            n=cell.n,
            control_sum=cell.c,
            shadow_sum=cell.s,
            control_sum_sq=cell.cc,
            shadow_sum_sq=cell.ss,
            cross_sum=cell.x,
        ),
        control_histogram=cell.control,
        shadow_histogram=cell.shadow,
        ratio_histogram=cell.ratio,
        compared=cell.n,
        disagreements=cell.d,
        abs_diff_sum=cell.a,
        abs_diff_sum_sq=cell.aa,
        numeric=cell.a > 0.0,
        quality=quality,
    )


def _shadow_update(view: ExperimentView, variant_key: str, now: datetime) -> ShadowAnalysis:
    row, _ = ShadowAnalysis.objects.get_or_create(experiment_id=view.id, variant_key=variant_key)
    if row.horizon > row.cursor:
        settled = _Totals()
        _fold(settled, view.id, variant_key, row.cursor, row.horizon)
        settled.add_row(row)
        row.pairs = settled.pairs.to_json() if settled.pairs.n else ""
        row.compared = settled.compared
        row.disagreements = settled.disagreements
        row.abs_diff_sum = settled.abs_diff_sum
        row.abs_diff_sum_sq = settled.abs_diff_sum_sq
        row.cursor = row.horizon
    totals = _Totals()
    totals.add_row(row)
    row.horizon = _fold(totals, view.id, variant_key, row.cursor, None)
    quality = shadow_quality_pairs(view, variant_key, now=now)
    result = shadow_verdict(
        _inputs(totals, quality), tolerances(), alpha=view.alpha, n_star=SHADOW_N_STAR
    )
    # Every compared request (not only the users' pairs), for context on the page.
    requests: dict[str, float] = {
        "compared": totals.compared,
        "disagreements": totals.disagreements,
    }
    if totals.abs_diff_sum > 0.0 and totals.compared:
        requests["mean_abs_diff"] = totals.abs_diff_sum / totals.compared
    row.result = {**result.as_json(), "requests": requests}
    row.updated_at = now
    if row.verdict == "collecting" and result.verdict != "collecting":
        row.verdict = result.verdict
        row.reason = result.reason
        row.reached_at = now
        _alert(view, variant_key, result)
    row.save()
    return row


def _alert(view: ExperimentView, variant_key: str, result: ShadowResult) -> None:
    ready = result.verdict == "ready"
    payload = alerts.alert_payload(
        kind="shadow_verdict",
        experiment_key=view.key,
        experiment_name=view.name,
        action="shadow ready to canary" if ready else "shadow worse than control",
        reason=f"shadow `{variant_key}`: {result.reason}",
        details={"arm": variant_key, "control_arm": view.control.key, **result.as_json()},
    )
    alerts.alert_enqueue(
        experiment_id=view.id,
        kind="shadow_verdict",
        payload=payload,
        dedupe=f"shadow-verdict:{view.id}:{variant_key}",
    )


def shadow_analyses_update(*, view: ExperimentView, now: datetime) -> list[ShadowAnalysis]:
    """Refresh every shadow's verdict (call inside the analysis run's locked transaction)."""
    shadows = [variant.key for variant in view.variants if variant.is_shadow]
    return [_shadow_update(view, key, now) for key in shadows]


def shadow_analyses_json(rows: Iterable[ShadowAnalysis]) -> list[dict[str, Any]]:
    """What the results API and the experiment page show per shadow."""
    return [
        {
            "variant": row.variant_key,
            "verdict": row.verdict,
            "reason": row.reason,
            "reached_at": row.reached_at.isoformat() if row.reached_at else None,
            "latest": row.result,
            "updated_at": row.updated_at.isoformat() if row.updated_at else None,
        }
        for row in rows
    ]


def shadow_analyses_list(*, experiment_id: int) -> list[dict[str, Any]]:
    """The stored verdicts of an experiment's shadows, by variant key."""
    rows = ShadowAnalysis.objects.filter(experiment_id=experiment_id).order_by("variant_key")
    return shadow_analyses_json(rows)
