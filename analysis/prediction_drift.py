"""Prediction drift between arms, run by run: users' first predictions folded into bets.

For an experiment with quality tracking and prediction drift on, every analysis run takes
the sampled predictions (`routing.models.Prediction`) that became visible since the last
run, keeps each user's first one (`DriftUnit` remembers who was taken), turns it into a
category and bets on it (`analysis.stats.prediction_drift`), once per tested arm.

Categories
    class: the predicted value (at most `MAX_CLASSES` distinct ones; later new values share
    "(other)"). scores: the index of the highest score of a vector; a single probability is
    binned by tenths. number: `NUMBER_BINS` equal-count bins whose edges are fixed from the
    first `CALIBRATION_USERS` control users (those users and every user before the edges
    exist are not bet on). An answer whose prediction could not be read is "(unreadable)".

Which users, and their share
    A user's arm and time are those of its first sampled prediction; its share is the tested
    arm's share among (control, tested arm) in the traffic period then
    (`experiments.periods.step_periods`). Users first seen within `grace_s()` after a period
    starts (while edges still switch to the new split), or in a paused or ended period, are
    taken but not bet on. None of these choices looks at the user's prediction, so the
    e-process stays valid.

Rows with cursor < id <= horizon were visible at the previous run (the recorder's insert
transactions have committed), so folding by id never skips a row that commits late.

The action on a breach (`quality.drift_action`): roll back, hold the ramp, or warn. An arm's
alarm is sticky; a hold or a warning alerts once (`PredictionDriftState.alerted`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from django.conf import settings

from analysis.drift_models import DriftUnit, PredictionDriftCount, PredictionDriftState
from analysis.stats.prediction_drift import (
    DriftBet,
    bin_index,
    fold_users,
    psi,
    quantile_edges,
    shares,
    total_variation,
)
from experiments.contracts import ExperimentView, StepPeriod
from experiments.periods import RUNNING, step_periods
from routing.models import Prediction

MAX_CLASSES = 50
NUMBER_BINS = 10
CALIBRATION_USERS = 100
BUCKET_S = 60.0
FOLD_BATCH = 50_000
UNREADABLE = "(unreadable)"
OTHER = "(other)"
_LOOKUP_CHUNK = 500
_PROBABILITY_EDGES = tuple(i / 10 for i in range(1, 10))


def grace_s() -> float:
    """Seconds after a period starts during which edges may still route with the old split."""
    return 3 * float(settings.SNAPSHOT_REFRESH_S) + 1.0


@dataclass
class _Categorizer:
    """Maps a prediction to its category index, growing the label list as classes appear."""

    kind: str
    labels: list[str]
    edges: list[float] | None
    calibration: list[float]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {label: i for i, label in enumerate(self.labels)}

    def _label_index(self, label: str) -> int:
        found = self.index.get(label)
        if found is not None:
            return found
        if label not in (UNREADABLE, OTHER) and len(self.labels) >= MAX_CLASSES:
            return self._label_index(OTHER)
        self.labels.append(label)
        self.index[label] = len(self.labels) - 1
        return self.index[label]

    def category(self, status: str, value: str) -> int | None:
        """The category, or None while numbers have no bins yet."""
        if self.kind == "number" and self.edges is None:
            return None
        if status != "ok" or not value:
            return self._label_index(UNREADABLE)
        if self.kind == "class":
            return self._label_index(value)
        parsed = orjson.loads(value)
        if self.kind == "scores":
            if isinstance(parsed, list):
                return self._label_index(f"class {int(np.argmax(parsed))}")
            return self._label_index(_bin_label(_PROBABILITY_EDGES, float(parsed)))
        return self._label_index(_bin_label(self.edges or [], float(parsed)))

    def calibrate(self, status: str, value: str) -> None:
        """Collect a control user's number; fix the bins once there are enough."""
        if self.kind != "number" or self.edges is not None or status != "ok" or not value:
            return
        self.calibration.append(float(orjson.loads(value)))
        if len(self.calibration) >= CALIBRATION_USERS:
            self.edges = list(quantile_edges(self.calibration, bins=NUMBER_BINS))


def _bin_label(edges: Sequence[float], value: float) -> str:
    index = int(bin_index([value], edges)[0])
    if 0 < index < len(edges) and edges[index] == np.nextafter(edges[index - 1], np.inf):
        return f"{edges[index - 1]:.6g}"  # the bin of one value (a constant control's)
    low = f"{edges[index - 1]:.4g}" if index > 0 else "-inf"
    high = f"{edges[index]:.4g}" if index < len(edges) else "inf"
    return f"[{low}, {high})"


def _period_of(periods: Sequence[StepPeriod], starts: Sequence[float], at: float) -> StepPeriod:
    return periods[max(bisect.bisect_right(starts, at) - 1, 0)]


def _new_users(experiment_id: int, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Each user's first row among `rows` (id order), leaving out users taken before."""
    first: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        if row[1] and row[1] not in first:
            first[row[1]] = row
    units = list(first)
    for start in range(0, len(units), _LOOKUP_CHUNK):
        for unit in DriftUnit.objects.filter(
            experiment_id=experiment_id, unit_id__in=units[start : start + _LOOKUP_CHUNK]
        ).values_list("unit_id", flat=True):
            first.pop(unit, None)
    DriftUnit.objects.bulk_create(
        [DriftUnit(experiment_id=experiment_id, unit_id=unit) for unit in first],
        ignore_conflicts=True,
    )
    return sorted(first.values(), key=lambda row: row[5])


def _add_counts(experiment_id: int, counts: dict[tuple[str, float], dict[int, int]]) -> None:
    for (arm, bucket), cells in counts.items():
        row, _ = PredictionDriftCount.objects.get_or_create(
            experiment_id=experiment_id, arm=arm, bucket_start=bucket
        )
        merged = list(row.counts)
        for index, n in cells.items():
            merged.extend([0] * (index + 1 - len(merged)))
            merged[index] += n
        row.counts = merged
        row.save(update_fields=["counts"])


def _fold(
    view: ExperimentView,
    state: PredictionDriftState,
    *,
    control: str,
    treatments: Sequence[str],
) -> None:
    """Fold the rows with cursor < id <= horizon into the bets and the per-minute counts."""
    quality = view.quality
    assert quality is not None and quality.drift_tolerance is not None
    periods = step_periods(experiment_id=view.id)
    starts = [period.start.timestamp() for period in periods]
    grace = grace_s()
    categorizer = _Categorizer(
        kind=state.kind,
        labels=list(state.categories),
        edges=None if state.edges is None else list(state.edges),
        calibration=list(state.calibration),
    )
    bets = {arm: DriftBet.from_json(state.bets.get(arm, {})) for arm in treatments}
    fired = {arm: bool((state.bets.get(arm) or {}).get("fired")) for arm in treatments}
    cursor = state.cursor
    while cursor < state.horizon:
        rows = list(
            Prediction.objects.filter(experiment_id=view.id, id__gt=cursor, id__lte=state.horizon)
            .order_by("id")
            .values_list("variant_key", "unit_id", "predicted_at", "status", "value", "id")[
                :FOLD_BATCH
            ]
        )
        if not rows:
            break
        cursor = rows[-1][5]
        counts: dict[tuple[str, float], dict[int, int]] = {}
        taken: list[tuple[str, int, float]] = []
        for arm, _unit, at, status, value, _id in _new_users(view.id, rows):
            category = categorizer.category(status, value)
            if category is None:
                if arm == control:
                    categorizer.calibrate(status, value)
                continue
            cell = counts.setdefault((arm, math.floor(at / BUCKET_S) * BUCKET_S), {})
            cell[category] = cell.get(category, 0) + 1
            period = _period_of(periods, starts, at) if periods else None
            if period is None or period.state != RUNNING or at < period.start.timestamp() + grace:
                continue
            taken.append((arm, category, at))
        size = len(categorizer.labels)
        for arm in treatments:
            cats, treated, share = [], [], []
            for user_arm, category, at in taken:
                if user_arm not in (control, arm):
                    continue
                period = _period_of(periods, starts, at)
                a, b = period.shares.get(control, 0.0), period.shares.get(arm, 0.0)
                if a <= 0 or b <= 0:
                    continue
                cats.append(category)
                treated.append(user_arm == arm)
                share.append(b / (a + b))
            bets[arm] = fold_users(
                bets[arm],
                categories=cats,
                treated=treated,
                share=share,
                tolerance=float(state.tolerance),
                n_categories=size,
            )
        _add_counts(view.id, counts)
    alpha = float(view.alpha) / max(len(treatments), 1)
    for arm in treatments:
        fired[arm] = fired[arm] or bets[arm].max_log_e >= math.log(1 / alpha)
    state.cursor = cursor
    state.categories = categorizer.labels
    state.edges = categorizer.edges
    state.calibration = categorizer.calibration if categorizer.edges is None else []
    state.bets = {arm: {**bets[arm].as_json(), "fired": fired[arm]} for arm in treatments}


def prediction_drift_update(
    view: ExperimentView, *, control: str, treatments: Sequence[str]
) -> PredictionDriftState | None:
    """Fold the new predictions into the drift bets (inside the run's locked transaction).

    None when the experiment has no prediction drift check.
    """
    quality = view.quality
    if quality is None or quality.drift_tolerance is None or not treatments:
        return None
    tolerance = float(quality.drift_tolerance)
    state, _ = PredictionDriftState.objects.get_or_create(
        experiment_id=view.id,
        defaults={"tolerance": tolerance, "kind": quality.prediction_kind},
    )
    if state.kind != quality.prediction_kind:
        state.kind, state.categories, state.edges, state.calibration = (
            quality.prediction_kind,
            [],
            None,
            [],
        )
        state.bets, state.alerted = {}, False
        PredictionDriftCount.objects.filter(experiment_id=view.id).delete()
    if state.tolerance != tolerance:
        state.tolerance, state.bets, state.alerted = tolerance, {}, False
    _fold(view, state, control=control, treatments=treatments)
    latest = (
        Prediction.objects.filter(experiment_id=view.id)
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )
    state.horizon = max(state.horizon, latest or 0)
    state.save()
    return state


# --------------------------------------------------------------------------- report


def _arm_counts(experiment_id: int) -> dict[str, dict[float, list[int]]]:
    found: dict[str, dict[float, list[int]]] = {}
    for arm, bucket, counts in PredictionDriftCount.objects.filter(
        experiment_id=experiment_id
    ).values_list("arm", "bucket_start", "counts"):
        found.setdefault(arm, {})[bucket] = list(counts)
    return found


def _vector(counts: Sequence[int], size: int) -> np.ndarray:
    array = np.zeros(size)
    array[: len(counts)] = counts
    return array


def drift_json(
    view: ExperimentView, state: PredictionDriftState, *, control: str, treatments: Sequence[str]
) -> dict[str, Any]:
    """What the result snapshot's health holds under "prediction_drift"."""
    quality = view.quality
    assert quality is not None
    size = len(state.categories)
    per_arm = _arm_counts(view.id)
    control_buckets = per_arm.get(control, {})
    alpha = float(view.alpha) / max(len(treatments), 1)
    arms: dict[str, Any] = {}
    for arm in (control, *treatments):
        buckets = per_arm.get(arm, {})
        total = sum((_vector(c, size) for c in buckets.values()), np.zeros(size))
        entry: dict[str, Any] = {"users": int(total.sum()), "shares": shares(total).tolist()}
        if arm != control:
            # Control standardised to this arm's minutes (STATS.md 12.2): each minute's control
            # shares weighted by this arm's users then; minutes without control are left out.
            reference = np.zeros(size)
            for bucket, counts in buckets.items():
                base = control_buckets.get(bucket)
                if base is not None and sum(base):
                    reference += sum(counts) * shares(_vector(base, size))
            mine = np.zeros(size)
            for bucket, counts in buckets.items():
                if sum(control_buckets.get(bucket, ())):
                    mine += _vector(counts, size)
            bet = DriftBet.from_json(state.bets.get(arm, {}))
            comparable = mine.sum() > 0 and reference.sum() > 0
            entry.update(
                {
                    "tv": total_variation(shares(mine), shares(reference)) if comparable else None,
                    "psi": psi(shares(mine), shares(reference)) if comparable else None,
                    "bet_users": {"arm": bet.treated_users, "control": bet.control_users},
                    "e_value": math.exp(min(bet.log_e, 700.0)),
                    "max_e_value": math.exp(min(bet.max_log_e, 700.0)),
                    "p": min(1.0, math.exp(-bet.max_log_e)),
                    "threshold": 1 / alpha,
                    "flagged": bool((state.bets.get(arm) or {}).get("fired")),
                }
            )
        arms[arm] = entry
    return {
        "prediction_drift": {
            "tolerance": state.tolerance,
            "action": quality.drift_action,
            "kind": state.kind,
            "control": control,
            "categories": list(state.categories),
            "calibrating": state.kind == "number" and state.edges is None,
            "arms": arms,
            "flagged": [arm for arm in treatments if arms[arm]["flagged"]],
        }
    }
