"""SQL aggregation against independent Python recomputations, incrementality and late rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from analysis.aggregation import (
    aggregate,
    business_stats,
    exposure_counts,
    fold_unit_events,
    note_event_horizon,
    refresh_observations,
)
from analysis.models import AnalysisState
from analysis.stats.moments import MeanStats, ProportionStats, RatioStats
from experiments import selectors as experiment_selectors
from experiments import services as experiment_services
from experiments.models import DEFAULT_WINDOW_S
from routing.models import Event, ObservationBucket
from routing.observe.histogram import LogHistogram
from tests.analysis.conftest import add_bucket, add_events, add_exposures, start_experiment

pytestmark = pytest.mark.django_db


@pytest.fixture
def business(metrics: Any) -> dict[str, Any]:
    """Revenue (mean, winsorised at 100) and clicks per view (ratio) next to conversion."""
    return {
        "revenue": experiment_services.metric_create(
            actor="test",
            key="revenue",
            name="Revenue",
            kind="mean",
            source="purchase",
            direction="higher",
            winsorize_cap=100.0,
        ),
        "ctr": experiment_services.metric_create(
            actor="test",
            key="ctr",
            name="Clicks per view",
            kind="ratio",
            numerator_event="click",
            denominator_event="view",
            direction="higher",
        ),
    }


def _settle(state: AnalysisState, names: list[str]) -> None:
    """Two looks: the first sees the events, the second may fold them (one-run lag)."""
    note_event_horizon(state=state)
    note_event_horizon(state=state)
    windows = [(name, DEFAULT_WINDOW_S) for name in names]
    assert fold_unit_events(state=state, event_windows=windows, limit=10**9) == 0


def test_unit_metrics_match_a_python_recomputation(business: dict[str, Any]) -> None:
    experiment = start_experiment(
        "units",
        kind="ab",
        ramp=[],
        metrics=[
            {"metric": "conversion", "role": "primary"},
            {"metric": "revenue", "role": "secondary"},
            {"metric": "ctr", "role": "secondary"},
        ],
    )
    t0 = experiment.started_at
    rng = np.random.default_rng(3)
    units = {"v1": [f"a{i}" for i in range(60)], "v2": [f"b{i}" for i in range(50)]}
    for variant, ids in units.items():
        add_exposures(experiment.pk, variant, ids, t0 + timedelta(seconds=10))
    # Two units saw both variants: excluded and counted.
    add_exposures(experiment.pk, "v2", ["a0", "a1"], t0 + timedelta(seconds=20))
    events = []
    expected: dict[str, dict[str, list[float]]] = {}
    for variant, ids in units.items():
        per_unit = expected.setdefault(variant, {"buy": [], "rev": [], "click": [], "view": []})
        for unit in ids:
            purchases = [float(x) for x in rng.integers(0, 150, size=rng.integers(0, 3))]
            clicks, views = int(rng.integers(0, 4)), int(rng.integers(0, 6))
            at = t0 + timedelta(seconds=30)
            events += [(unit, "purchase", v, at) for v in purchases]
            events += [(unit, "click", 1.0, at)] * clicks + [(unit, "view", 1.0, at)] * views
            # An event before exposure does not count.
            events.append((unit, "purchase", 1000.0, t0))
            if unit in ("a0", "a1"):
                continue
            per_unit["buy"].append(1.0 if purchases else 0.0)
            per_unit["rev"].append(min(sum(purchases), 100.0))
            per_unit["click"].append(float(clicks))
            per_unit["view"].append(float(views))
    events.append(("stranger", "purchase", 5.0, t0 + timedelta(seconds=30)))
    add_events(events)
    state = AnalysisState.objects.create(experiment_id=experiment.pk)
    _settle(state, ["click", "purchase", "view"])
    view = experiment_selectors.experiment_view_get(key="units")
    stats = business_stats(
        experiment_id=experiment.pk,
        metrics=[u.metric for u in view.metrics],
        tail_after=state.event_cursor,
        now=t0 + timedelta(days=1),  # every window has closed
    )
    for variant, values in expected.items():
        assert stats["conversion"][variant] == ProportionStats.from_values(values["buy"])
        revenue = stats["revenue"][variant]
        reference = MeanStats.from_values(values["rev"])
        assert revenue.n == reference.n
        assert revenue.sum == pytest.approx(reference.sum)
        assert revenue.sum_squares == pytest.approx(reference.sum_squares)
        ratio = stats["ctr"][variant]
        reference_ratio = RatioStats.from_values(values["click"], values["view"])
        assert ratio.n == reference_ratio.n
        assert ratio.cross_sum == pytest.approx(reference_ratio.cross_sum)
        assert ratio.denominator_sum_squares == pytest.approx(
            reference_ratio.denominator_sum_squares
        )
    counts = exposure_counts(
        experiment_id=experiment.pk, control_key="v1", canary=False, since=None
    )
    assert counts.per_variant == {"v1": 58, "v2": 50}
    assert (counts.total_units, counts.multiple, counts.unexpected_multiple) == (110, 2, 2)


def _revenue_reference() -> dict[str, MeanStats]:
    """Per-unit revenue (winsorised at 100) recomputed in Python from every event so far."""
    per_unit: dict[str, list[float]] = {"v1": [0.0] * 40, "v2": [0.0] * 40}
    for unit, value in Event.objects.values_list("unit_id", "value"):
        index = int(unit[1:])
        per_unit["v1" if index < 40 else "v2"][index % 40] += value
    return {
        variant: MeanStats.from_values(np.minimum(values, 100.0))
        for variant, values in per_unit.items()
    }


def test_folded_rollup_plus_tail_equals_the_raw_events(business: dict[str, Any]) -> None:
    experiment = start_experiment(
        "inc", kind="ab", ramp=[], metrics=[{"metric": "revenue", "role": "primary"}]
    )
    t0 = experiment.started_at
    add_exposures(experiment.pk, "v1", [f"u{i}" for i in range(0, 40)], t0)
    add_exposures(experiment.pk, "v2", [f"u{i}" for i in range(40, 80)], t0)
    view = experiment_selectors.experiment_view_get(key="inc")
    metric = [view.metrics[0].metric]
    state = AnalysisState.objects.create(experiment_id=experiment.pk)
    rng = np.random.default_rng(11)
    for batch in range(6):
        rows = [
            (f"u{int(u)}", "purchase", float(v), t0 + timedelta(seconds=5))
            for u, v in zip(rng.integers(0, 80, 30), rng.random(30) * 50, strict=True)
        ]
        add_events(rows, prefix=f"batch{batch}")
        note_event_horizon(state=state)
        # Fold in small uneven chunks, so part of the events is always still in the tail.
        fold_unit_events(state=state, event_windows=[("purchase", DEFAULT_WINDOW_S)], limit=17)
        assert state.event_cursor <= state.event_settled <= state.event_horizon
        stats = business_stats(
            experiment_id=experiment.pk,
            metrics=metric,
            tail_after=state.event_cursor,
            now=t0 + timedelta(days=1),
        )
        for variant, reference in _revenue_reference().items():
            assert stats["revenue"][variant].n == reference.n == 40
            assert stats["revenue"][variant].sum == pytest.approx(reference.sum)
            assert stats["revenue"][variant].sum_squares == pytest.approx(reference.sum_squares)
    assert state.event_cursor > 0
    _settle(state, ["purchase"])
    assert state.event_cursor == state.event_horizon


def test_observations_fold_late_rows_and_merge_histograms(metrics: Any) -> None:
    experiment = start_experiment("obs")
    state = AnalysisState.objects.create(experiment_id=experiment.pk)
    rng = np.random.default_rng(5)
    for i in range(6):
        for variant in ("v1", "v2"):
            latencies = list(rng.lognormal(4.0, 0.5, 50))
            add_bucket(experiment.pk, variant, latencies, errors=i)
    add_bucket(experiment.pk, "v2", [1e6] * 10, shadow=True)  # shadows never count
    totals = refresh_observations(state=state)
    assert state.observation_cursor == 0  # nothing folded yet: all of it is the tail
    # A row that commits late, with an id below what the last run saw (PostgreSQL can do
    # that: ids are taken at INSERT, rows become visible at COMMIT).
    top = ObservationBucket.objects.filter(is_shadow=False).order_by("-id").first()
    assert top is not None
    late_id = top.id - 1
    ObservationBucket.objects.filter(id=late_id).delete()
    latencies = list(rng.lognormal(4.0, 0.5, 50))
    row = add_bucket(experiment.pk, "v1", latencies, errors=2)
    ObservationBucket.objects.filter(id=row.id).update(id=late_id)
    expected = {"v1": LogHistogram(), "v2": LogHistogram()}
    for bucket in ObservationBucket.objects.filter(experiment_id=experiment.pk, is_shadow=False):
        expected[bucket.variant_key].merge(LogHistogram.from_json(bucket.latency_histogram))
    totals = refresh_observations(state=state)
    assert state.observation_cursor == top.id
    totals = refresh_observations(state=state)  # a third run reads the rollup only
    for variant in ("v1", "v2"):
        assert totals[variant].histogram == expected[variant]
        assert totals[variant].count == expected[variant].count
        assert totals[variant].histogram.quantile(0.95) == expected[variant].quantile(0.95)
    errors = sum(
        ObservationBucket.objects.filter(
            experiment_id=experiment.pk, variant_key="v1", is_shadow=False
        ).values_list("error_count", flat=True)
    )
    assert totals["v1"].error_count == errors


def test_canary_ramp_moves_are_not_a_health_problem(metrics: Any) -> None:
    experiment = start_experiment("moves")
    t0 = experiment.started_at
    add_exposures(experiment.pk, "v1", [f"u{i}" for i in range(100)], t0)
    # Ten units moved to the canary at a later step: expected. Two went the other way.
    add_exposures(experiment.pk, "v2", [f"u{i}" for i in range(10)], t0 + timedelta(minutes=5))
    add_exposures(experiment.pk, "v2", ["w1", "w2"], t0)
    add_exposures(experiment.pk, "v1", ["w1", "w2"], t0 + timedelta(minutes=5))
    counts = exposure_counts(
        experiment_id=experiment.pk,
        control_key="v1",
        canary=True,
        since=t0 + timedelta(minutes=1),
    )
    assert counts.per_variant == {"v1": 90}
    assert (counts.multiple, counts.unexpected_multiple) == (12, 2)
    assert counts.new_in_step == {"v1": 0}
    view = experiment_selectors.experiment_view_get(key="moves")
    state = AnalysisState.objects.create(experiment_id=experiment.pk)
    assert aggregate(experiment=view, state=state).exposures.multiple == 12
