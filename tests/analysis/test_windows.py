"""Exposure windows of per-unit metrics: events outside the window and open windows wait."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from analysis.aggregation import business_stats, fold_unit_events, note_event_horizon
from analysis.models import AnalysisState, UnitEventRollup
from analysis.stats.moments import ProportionStats
from analysis.unit_metrics import metric_event_windows
from experiments import selectors as experiment_selectors
from experiments import services as experiment_services
from tests.analysis.conftest import add_events, add_exposures, start_experiment

pytestmark = pytest.mark.django_db


@pytest.fixture
def windowed(metrics: Any) -> dict[str, Any]:
    """Two metrics on the same event: purchases within 5 minutes, and within an hour."""
    return {
        "fast": experiment_services.metric_create(
            actor="test",
            key="buy-5m",
            name="Bought within 5 minutes",
            kind="binomial",
            source="purchase",
            direction="higher",
            window_s=300,
        ),
        "slow": experiment_services.metric_create(
            actor="test",
            key="spend-1h",
            name="Spend within an hour",
            kind="mean",
            source="purchase",
            direction="higher",
            window_s=3600,
        ),
    }


def _stats(experiment: Any, state: AnalysisState, now: Any) -> dict[str, Any]:
    view = experiment_selectors.experiment_view_get(key=experiment.key)
    return business_stats(
        experiment_id=experiment.pk,
        metrics=[use.metric for use in view.metrics],
        tail_after=state.event_cursor,
        now=now,
    )


def test_only_events_inside_the_window_count_and_open_windows_wait(
    windowed: dict[str, Any],
) -> None:
    experiment = start_experiment(
        "windows",
        kind="ab",
        ramp=[],
        metrics=[
            {"metric": "buy-5m", "role": "primary"},
            {"metric": "spend-1h", "role": "secondary"},
        ],
    )
    t0 = experiment.started_at
    # Early units (exposed at t0) and late ones (exposed 50 minutes later).
    add_exposures(experiment.pk, "v1", ["a1", "a2", "a3"], t0)
    add_exposures(experiment.pk, "v2", ["b1", "b2"], t0)
    add_exposures(experiment.pk, "v1", ["late-a"], t0 + timedelta(minutes=50))
    add_exposures(experiment.pk, "v2", ["late-b"], t0 + timedelta(minutes=50))
    add_events(
        [
            ("a1", "purchase", 10.0, t0 + timedelta(seconds=299)),  # inside both windows
            ("a2", "purchase", 20.0, t0 + timedelta(seconds=301)),  # after 5 min, inside 1 h
            ("a3", "purchase", 40.0, t0 + timedelta(seconds=3601)),  # after both windows
            ("a3", "purchase", 99.0, t0 - timedelta(seconds=1)),  # before exposure
            ("b1", "purchase", 5.0, t0 + timedelta(seconds=10)),
            ("late-a", "purchase", 7.0, t0 + timedelta(minutes=51)),
            ("late-b", "purchase", 9.0, t0 + timedelta(minutes=51)),
        ]
    )
    state = AnalysisState.objects.create(experiment_id=experiment.pk)
    # 20 minutes in: the early units' 5-minute windows have closed, no 1-hour window has.
    at_20m = _stats(experiment, state, t0 + timedelta(minutes=20))
    assert at_20m["buy-5m"] == {
        "v1": ProportionStats(n=3, sum=1.0),
        "v2": ProportionStats(n=2, sum=1.0),
    }
    assert at_20m["spend-1h"] == {}
    # 80 minutes in: the late units' 5-minute windows closed too; early 1-hour windows closed.
    at_80m = _stats(experiment, state, t0 + timedelta(minutes=80))
    assert at_80m["buy-5m"] == {
        "v1": ProportionStats(n=4, sum=2.0),
        "v2": ProportionStats(n=3, sum=2.0),
    }
    spend = at_80m["spend-1h"]
    assert (spend["v1"].n, spend["v1"].sum, spend["v1"].sum_squares) == (3, 30.0, 500.0)
    assert (spend["v2"].n, spend["v2"].sum) == (2, 5.0)
    # Folded into the rollup (once per (event, window) pair), the answer is the same.
    view = experiment_selectors.experiment_view_get(key=experiment.key)
    windows = metric_event_windows([use.metric for use in view.metrics])
    assert windows == [("purchase", 300), ("purchase", 3600)]
    note_event_horizon(state=state)
    note_event_horizon(state=state)
    assert fold_unit_events(state=state, event_windows=windows, limit=10**9) == 0
    sums = {
        (row.unit_id, row.window_s): row.value_sum
        for row in UnitEventRollup.objects.filter(experiment_id=experiment.pk)
    }
    assert sums[("a1", 300)] == 10.0 and sums[("a2", 3600)] == 20.0
    assert ("a2", 300) not in sums and ("a3", 300) not in sums and ("a3", 3600) not in sums
    assert _stats(experiment, state, t0 + timedelta(minutes=80)) == at_80m


def test_the_default_window_is_ten_minutes(metrics: Any) -> None:
    assert metrics["conversion"].window_s == 600
