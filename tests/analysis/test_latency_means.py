"""The mean-latency guardrail on the database: users as the unit, strata of constant split."""

from __future__ import annotations

from typing import Any

import pytest

from analysis import services
from analysis.latency_means import user_latency_strata
from analysis.rate_guardrails import settle_s, windows_s
from experiments import services as experiment_services
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


def _row(result: Any) -> dict[str, Any]:
    return next(m for m in result.snapshot.metrics if m["metric"] == "latency-mean")


def _closed(at: Any) -> Any:
    return later(at, windows_s()[1] + settle_s() + 1)


def _ramp_slowing_down_together(key: str) -> tuple[Any, Any]:
    """An A/A canary whose latency doubles from the 10% step to the 50% step.

    Pooled, control's users are mostly fast (900 of 1,400) and the canary's mostly slow
    (500 of 600): the canary looks 35% slower. Within each step the arms are equal.
    """
    experiment = start_experiment(key, ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=MEAN_ONLY)
    at = later(experiment.step_started_at, 1)
    add_exposures(experiment.pk, "v1", (f"c{i}" for i in range(1400)), at)
    add_exposures(experiment.pk, "v2", (f"t{i}" for i in range(1400)), at)
    first, second = at.timestamp(), later(at, 5).timestamp()
    for arm, n, share, seed in (("v1", 900, 0.9, 1), ("v2", 100, 0.1, 2)):
        latencies = lognormal_latencies(n, 100.0, seed=seed)
        add_user_latencies(
            experiment.pk, arm, latencies, first_seen=first, share=share, control_share=0.9
        )
    for arm, seed in (("v1", 3), ("v2", 4)):
        latencies = lognormal_latencies(500, 200.0, seed=seed)
        add_user_latencies(
            experiment.pk, arm, latencies, first_seen=second, share=0.5, control_share=0.5
        )
    return experiment, later(at, 5)


def test_an_aa_ramp_slowing_down_together_is_compared_within_steps(metrics: Any) -> None:
    experiment, last = _ramp_slowing_down_together("mean-drift")

    result = services.analysis_run(experiment_id=experiment.pk, now=_closed(last))

    assert result is not None and result.snapshot.decision != "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "running"
    row = _row(result)
    assert row["status"] == "ok"
    assert (row["n_control"], row["n_treatment"]) == (1400, 600)
    assert abs(row["rel_effect"]) < 0.05  # pooled, it would be about +35%
    assert row["method"].startswith("users as the unit")
    assert "stratified by ramp step" in row["method"]
    assert row["construction"]["method"] == "stratified_by_ramp_step"
    assert row["construction"]["cohorts_used"] == 2


def test_users_whose_window_is_open_wait_and_heavy_users_count_once(metrics: Any) -> None:
    experiment = start_experiment("mean-heavy", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 1)
    seen = at.timestamp()
    heavy = [[1_000.0] * 500]  # one control user with 500 slow requests
    add_user_latencies(
        experiment.pk, "v1", heavy, first_seen=seen, share=0.5, control_share=0.5, prefix="heavy-"
    )
    for arm in ("v1", "v2"):
        add_user_latencies(
            experiment.pk, arm, [100.0] * 50, first_seen=seen, share=0.5, control_share=0.5
        )
    add_user_latencies(  # first seen later: still open at the look
        experiment.pk, "v2", [500.0] * 50, first_seen=seen + 30, share=0.5, control_share=0.5
    )
    now = _closed(at).timestamp()

    strata = user_latency_strata(experiment_id=experiment.pk, now=now, periods=())

    assert set(strata) == {"v1", "v2"} and len(strata["v1"]) == 1
    control, canary = strata["v1"][0], strata["v2"][0]
    assert (control.n, canary.n) == (51, 50)
    assert control.mean == pytest.approx((500 * 1_000 + 50 * 100) / 550)
    assert canary.mean == pytest.approx(100.0)
    # Per user: the heavy user's 500 requests are one unit of the ratio metric.
    assert control.denominator_sum == 550


def test_no_user_with_a_closed_window_holds_the_guardrail(metrics: Any) -> None:
    experiment = start_experiment(
        "mean-wait", ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=MEAN_ONLY
    )
    at = later(experiment.step_started_at, 1)
    for arm in ("v1", "v2"):
        add_user_latencies(
            experiment.pk,
            arm,
            [100.0] * 200,
            first_seen=at.timestamp(),
            share=0.5,
            control_share=0.5,
        )

    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 5))

    assert result is not None and result.snapshot.decision == "continue"
    assert "not enough data: latency-mean/v2" in result.snapshot.reason
    assert "latency window has closed" in result.snapshot.reason
    assert _row(result)["status"] == "insufficient"


def test_three_arms_each_treatment_is_compared_with_control_at_half_the_alpha(
    metrics: Any,
) -> None:
    experiment_services.experiment_create(
        actor="test",
        key="mean-three",
        name="three arms",
        kind="ab",
        variants=[
            experiment_services.VariantInput(
                key=key, upstream_url=f"http://127.0.0.1:900{i}", weight=1 / 3, is_control=i == 0
            )
            for i, key in enumerate(("v1", "v2", "v3"))
        ],
        metrics=[experiment_services.MetricUseInput(metric_key="latency-mean", role="guardrail")],
    )
    experiment = experiment_services.experiment_start(actor="test", key="mean-three").experiment
    at = later(experiment.started_at, 1)
    for arm, median in (("v1", 100.0), ("v2", 101.0), ("v3", 300.0)):
        add_exposures(experiment.pk, arm, (f"{arm}-{i}" for i in range(400)), at)
        add_user_latencies(
            experiment.pk,
            arm,
            lognormal_latencies(400, median, seed=len(arm) + int(median)),
            first_seen=at.timestamp(),
            share=1 / 3,
            control_share=1 / 3,
        )

    result = services.analysis_run(experiment_id=experiment.pk, now=_closed(at))

    assert result is not None and result.snapshot.decision == "rollback"
    assert result.analysis.breach is not None and result.analysis.breach.arm == "v3"
    rows = {m["arm"]: m for m in result.snapshot.metrics if m["metric"] == "latency-mean"}
    assert rows["v2"]["status"] == "ok" and rows["v3"]["status"] == "breach"
    decision = result.analysis.guardrail_decision
    assert decision is not None
    assert [e.alpha for e in decision.evaluations] == [0.025, 0.025]


def test_a_latency_mean_that_is_not_a_guardrail_is_reported_within_steps_too(
    metrics: Any,
) -> None:
    experiment = start_experiment(
        "mean-report",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[
            {"metric": "error-rate", "role": "guardrail"},
            {"metric": "latency-mean", "role": "secondary"},
        ],
    )
    at = later(experiment.step_started_at, 1)
    first, second = at.timestamp(), later(at, 5).timestamp()
    for arm, n, share, seed in (("v1", 900, 0.9, 1), ("v2", 100, 0.1, 2)):
        latencies = lognormal_latencies(n, 100.0, seed=seed)
        add_user_latencies(
            experiment.pk, arm, latencies, first_seen=first, share=share, control_share=0.9
        )
    for arm, seed in (("v1", 3), ("v2", 4)):
        latencies = lognormal_latencies(500, 200.0, seed=seed)
        add_user_latencies(
            experiment.pk, arm, latencies, first_seen=second, share=0.5, control_share=0.5
        )

    result = services.analysis_run(experiment_id=experiment.pk, now=_closed(later(at, 5)))

    assert result is not None
    row = _row(result)
    assert row["role"] == "secondary" and row["status"] == "inconclusive"
    assert (row["n_control"], row["n_treatment"]) == (1400, 600)
    assert row["construction"]["method"] == "stratified_by_ramp_step"
    assert row["ci_always_valid"][0] < 0 < row["ci_always_valid"][1]
