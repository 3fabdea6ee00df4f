"""The p95 guardrail on the database: users as the unit, degenerate latencies, drift.

The guardrail bets on users (`analysis.quantile_guardrails`): each test writes what the proxy
writes, a 10-second bucket's histogram per arm and one `UnitOutcome` row per user with its
latencies per histogram bucket. Users whose first request came before any closed control
bucket have no threshold and are not bet on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pytest

from analysis import services
from experiments.models import Experiment
from tests.analysis.conftest import (
    add_bucket,
    add_exposures,
    add_unit_latencies,
    later,
    lognormal_latencies,
    start_experiment,
)

pytestmark = pytest.mark.django_db

P95_ONLY = [{"metric": "latency-p95", "role": "guardrail", "margin": 0.1}]


def add_users(
    experiment: Any, variant: str, latencies: list[float], *, at: datetime, canary_share: float
) -> None:
    """One bucket of the proxy's records: the histogram and one user (one request) per latency."""
    add_bucket(experiment.pk, variant, latencies, at=at)
    add_unit_latencies(
        experiment.pk,
        variant,
        latencies,
        at=at,
        canary_share=canary_share,
        prefix=f"{at.timestamp()}-",
    )


def _exposures(experiment: Any, at: datetime, units: int = 1000) -> None:
    add_exposures(experiment.pk, "v1", (f"c{i}" for i in range(units)), at)
    add_exposures(experiment.pk, "v2", (f"t{i}" for i in range(units)), at)


def _p95_row(result: Any) -> dict[str, Any]:
    return next(m for m in result.snapshot.metrics if m["metric"] == "latency-p95")


def test_constant_slow_canary_against_variable_control_is_rolled_back(metrics: Any) -> None:
    experiment = start_experiment("constant", ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=P95_ONLY)
    at = later(experiment.step_started_at, 30)
    _exposures(experiment, at)
    for offset, seed in ((0, 3), (10, 4)):
        moment = later(at, offset)
        add_users(
            experiment,
            "v1",
            lognormal_latencies(900, 100.0, seed=seed),
            at=moment,
            canary_share=0.1,
        )
        add_users(experiment, "v2", [1_000.0] * 100, at=moment, canary_share=0.1)

    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 30))

    assert result is not None and result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    row = _p95_row(result)
    assert row["status"] == "breach" and row["p_always_valid"] < 1e-6
    assert row["method"].startswith("betting e-process on users")
    # Only the second bucket's users had control data before them: they were bet on.
    assert (row["n_control"], row["n_treatment"]) == (900, 100)
    assert row["rel_effect"] > 5
    # 1,000 ms is about 6 x control's p95 (about 163 ms, a harm of about +510%): the bound is
    # the largest nested harm bet below that (69 buckets, +298%), not only the margin.
    lower = row["ci_always_valid"][0]
    assert lower == pytest.approx((1.01 / 0.99) ** 69 - 1) and lower < 5.1


def test_constant_equal_latencies_within_margin_continue(metrics: Any) -> None:
    experiment = start_experiment("flat", ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=P95_ONLY)
    at = later(experiment.step_started_at, 30)
    _exposures(experiment, at)
    for offset in (0, 10, 20):
        add_users(experiment, "v1", [100.0] * 500, at=later(at, offset), canary_share=0.5)
        add_users(experiment, "v2", [100.0] * 500, at=later(at, offset), canary_share=0.5)

    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 35))

    # Equal constant latencies are evidence that the canary is within the margin: every
    # control user is at (or above) control's p95 bucket, no canary user 10% above it.
    assert result is not None and result.snapshot.decision == "safe_to_promote"
    assert Experiment.objects.get(pk=experiment.pk).status == "running"
    row = _p95_row(result)
    assert row["status"] == "ok" and row["p_always_valid"] == 1.0
    assert row["rel_effect"] == pytest.approx(0.0)


def _drifting_traffic(experiment: Any, at: datetime) -> None:
    # Latency doubles between two buckets for both versions alike, but most of control's
    # requests come from the fast bucket and most of the canary's from the slow one. Pooled,
    # the canary's p95 looks far worse; compared within buckets, it is the same.
    # The users' shares follow the counts, as a ramp step's would.
    _exposures(experiment, at)
    rng = np.random.default_rng(7)
    for offset, scale, control_n, canary_n in ((0, 1.0, 3000, 300), (10, 2.0, 1000, 3000)):
        for variant, n in (("v1", control_n), ("v2", canary_n)):
            values = (100.0 * scale * np.exp(0.3 * rng.standard_normal(n))).tolist()
            share = canary_n / (control_n + canary_n)
            add_users(experiment, variant, values, at=later(at, offset), canary_share=share)


def test_drift_shared_by_both_arms_is_not_a_regression(metrics: Any) -> None:
    experiment = start_experiment("drift", ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=P95_ONLY)
    at = later(experiment.step_started_at, 30)
    _drifting_traffic(experiment, at)

    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 25))

    assert result is not None and result.snapshot.decision != "rollback"
    row = _p95_row(result)
    pooled = row["treatment_estimate"] / row["control_estimate"] - 1
    assert pooled > 0.2  # what a pooled comparison would report
    assert abs(row["rel_effect"]) < 0.05  # the contemporaneous (standardised) effect
    assert row["status"] == "ok" and row["p_always_valid"] > 0.05


def test_p95_metric_row_compares_within_time_windows(metrics: Any) -> None:
    experiment = start_experiment(
        "drift-report",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[{"metric": "latency-p95", "role": "secondary"}],
    )
    at = later(experiment.step_started_at, 30)
    _drifting_traffic(experiment, at)

    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 25))

    assert result is not None
    row = _p95_row(result)
    assert row["method"] == "exceedance e-process, per time window"
    assert abs(row["rel_effect"]) < 0.05 and row["status"] == "inconclusive"
    lower, upper = row["ci_always_valid"]
    assert lower < 0 < upper and upper < 0.2
    assert row["p_always_valid"] > 0.05
