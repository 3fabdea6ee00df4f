"""The mean-latency guardrail on the database with constant latencies (issue 12, item 2).

The guardrail reads per-user latency sums (`routing.models.UnitOutcome`) whose windows have
closed, so each look here comes after RATE_WINDOW_SLOW_S and the settle time.
"""

from __future__ import annotations

from typing import Any

import pytest

from analysis import services
from analysis.rate_guardrails import settle_s, windows_s
from experiments.models import Experiment
from tests.analysis.conftest import (
    add_exposures,
    add_user_latencies,
    later,
    lognormal_latencies,
    start_experiment,
)

pytestmark = pytest.mark.django_db

MEAN_ONLY = [{"metric": "latency-mean", "role": "guardrail", "margin": 0.1}]


def _mean_row(result: Any) -> dict[str, Any]:
    return next(m for m in result.snapshot.metrics if m["metric"] == "latency-mean")


def _users(experiment: Any, arm: str, latencies: list[float], at: Any) -> None:
    add_user_latencies(
        experiment.pk, arm, latencies, first_seen=at.timestamp(), share=0.5, control_share=0.5
    )


def _closed(at: Any) -> Any:
    """A look after the users first seen at `at` have closed and settled windows."""
    return later(at, windows_s()[1] + settle_s() + 1)


def _start(key: str) -> tuple[Any, Any]:
    experiment = start_experiment(key, ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=MEAN_ONLY)
    at = later(experiment.step_started_at, 30)
    add_exposures(experiment.pk, "v1", (f"c{i}" for i in range(1000)), at)
    add_exposures(experiment.pk, "v2", (f"t{i}" for i in range(1000)), at)
    return experiment, at


def test_constant_slow_canary_against_variable_control_is_rolled_back(metrics: Any) -> None:
    experiment, at = _start("mean-constant")
    _users(experiment, "v1", lognormal_latencies(900, 100.0, seed=3), at)
    _users(experiment, "v2", [1_000.0] * 300, at)

    result = services.analysis_run(experiment_id=experiment.pk, now=_closed(at))

    assert result is not None and result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    row = _mean_row(result)
    assert row["status"] == "breach" and row["p_always_valid"] < 1e-6
    assert row["rel_effect"] > 5


def test_constant_equal_latencies_within_margin_continue(metrics: Any) -> None:
    experiment, at = _start("mean-flat")
    for offset in (0, 10, 20):
        _users(experiment, "v1", [100.0] * 500, later(at, offset))
        _users(experiment, "v2", [105.0] * 500, later(at, offset))

    result = services.analysis_run(experiment_id=experiment.pk, now=_closed(later(at, 20)))

    # 5% slower, exactly and constantly: within the 10% margin, so it continues.
    assert result is not None and result.snapshot.decision != "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "running"
    row = _mean_row(result)
    assert row["status"] == "ok" and row["rel_effect"] == pytest.approx(0.05)


def test_constant_latencies_beyond_margin_are_rolled_back(metrics: Any) -> None:
    experiment, at = _start("mean-flat-slow")
    for offset in (0, 10):
        _users(experiment, "v1", [100.0] * 500, later(at, offset))
        _users(experiment, "v2", [1_000.0] * 500, later(at, offset))

    result = services.analysis_run(experiment_id=experiment.pk, now=_closed(later(at, 10)))

    assert result is not None and result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    assert _mean_row(result)["status"] == "breach"
