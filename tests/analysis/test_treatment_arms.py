"""Two treatment arms: the error-rate guardrail's rollback and promotion, and every kind."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from analysis import services
from analysis.arm_lanes import treatment_lanes
from analysis.models import RateBetState
from analysis.rate_guardrails import settle_s, windows_s
from experiments import services as experiment_services
from experiments.contracts import StepPeriod
from routing.models import UnitOutcome
from tests.analysis.conftest import (
    add_bucket,
    add_exposures,
    add_user_latencies,
    later,
    lognormal_latencies,
)

pytestmark = pytest.mark.django_db


def _period(index: int, shares: dict[str, float]) -> StepPeriod:
    start = datetime(2026, 12, 4, 12, index, tzinfo=UTC)
    return StepPeriod(
        index=index, start=start, end=None, state="running", step_position=index, shares=shares
    )


def test_lanes_are_the_arms_constant_shares_of_the_non_control_traffic():
    ramp = [
        _period(0, {"a": 0.99, "b": 0.0025, "c": 0.0075}),
        _period(1, {"a": 0.75, "b": 0.0625, "c": 0.1875}),
        _period(2, {"a": 1.0, "b": 0.0, "c": 0.0}),  # paused
    ]
    lanes = treatment_lanes(ramp, control="a", treatments=("b", "c"))
    assert lanes == pytest.approx({"b": 0.25, "c": 0.75})
    assert treatment_lanes(ramp[:1], control="a", treatments=("b",)) == {"b": 1.0}
    reweighted = [*ramp, _period(3, {"a": 0.5, "b": 0.25, "c": 0.25})]
    assert treatment_lanes(reweighted, control="a", treatments=("b", "c")) is None


def _users(experiment: Any, arm: str, count: int, *, failed: float, at: float) -> None:
    """One request per user; three equal arms, so every share is 1/3."""
    UnitOutcome.objects.bulk_create(
        UnitOutcome(
            experiment_id=experiment.pk,
            unit_id=f"{arm}-{i}",
            variant_key=arm,
            first_seen=at + i * 1e-4,
            share=1 / 3,
            control_share=1 / 3,
            requests_fast=1,
            errors_fast=int(i < failed * count),
            requests_slow=1,
            errors_slow=int(i < failed * count),
        )
        for i in range(count)
    )


def _three_arms(key: str) -> Any:
    experiment_services.experiment_create(
        actor="test",
        key=key,
        name="three arms",
        kind="ab",
        variants=[
            experiment_services.VariantInput(
                key=arm, upstream_url=f"http://127.0.0.1:900{i}", weight=1 / 3, is_control=i == 0
            )
            for i, arm in enumerate(("v1", "v2", "v3"))
        ],
        metrics=[
            experiment_services.MetricUseInput(
                metric_key="error-rate", role="guardrail", margin=0.2
            )
        ],
    )
    return experiment_services.experiment_start(actor="test", key=key).experiment


@pytest.mark.parametrize(("v3_failed", "decision"), [(0.0, "safe_to_promote"), (0.5, "rollback")])
def test_each_treatment_arm_is_bet_on_alone(metrics: Any, v3_failed: float, decision: str) -> None:
    experiment = _three_arms(f"rate-three-{decision}")
    at = later(experiment.started_at, 1)
    for arm, failed in (("v1", 0.2), ("v2", 0.0), ("v3", v3_failed)):
        add_exposures(experiment.pk, arm, (f"{arm}-{i}" for i in range(600)), at)
        _users(experiment, arm, 600, failed=failed, at=at.timestamp())
    now = later(at, windows_s()[1] + settle_s() + 1)

    result = services.analysis_run(experiment_id=experiment.pk, now=now)

    assert result is not None and result.snapshot.decision == decision
    evidence = {e.arm: e for e in result.analysis.guardrail_decision.evaluations}
    assert evidence["v2"].status == "safe"  # v2 never fails: non-inferior at alpha / 2
    assert evidence["v3"].status == ("safe" if v3_failed == 0 else "harm")
    assert {e.alpha for e in evidence.values()} == {0.025}
    lanes = RateBetState.objects.values_list("state__mirror_lane", flat=True)
    assert list(lanes) == pytest.approx([0.5] * 4)  # two arms, two windows


def test_a_mirror_bet_placed_without_the_lane_never_shows_non_inferiority(metrics: Any) -> None:
    experiment = _three_arms("rate-three-old")
    at = later(experiment.started_at, 1)
    # States folded before lanes were recorded (with 1 - control's share for control users).
    for window in windows_s():
        RateBetState.objects.create(
            experiment=experiment,
            metric_key="error-rate",
            arm="v2",
            window_s=window,
            margin=0.2,
            cursor=at.timestamp() - 0.5,
            state={},
        )
    for arm, failed in (("v1", 0.2), ("v2", 0.0), ("v3", 0.0)):
        add_exposures(experiment.pk, arm, (f"{arm}-{i}" for i in range(600)), at)
        _users(experiment, arm, 600, failed=failed, at=at.timestamp())
    now = later(at, windows_s()[1] + settle_s() + 1)

    result = services.analysis_run(experiment_id=experiment.pk, now=now)

    assert result is not None and result.snapshot.decision == "continue"
    evidence = {e.arm: e for e in result.analysis.guardrail_decision.evaluations}
    assert evidence["v2"].status == "inconclusive" and evidence["v3"].status == "safe"


def test_every_guardrail_kind_compares_each_of_two_treatment_arms_with_control(
    metrics: Any,
) -> None:
    """p95, mean latency, error rate and conversion, three arms: eight pairs at alpha / 8."""
    kinds = {"latency-p95": 0.1, "latency-mean": 0.1, "error-rate": 0.2, "conversion": 0.1}
    experiment_services.experiment_create(
        actor="test",
        key="every-kind",
        name="three arms, every guardrail kind",
        kind="ab",
        variants=[
            experiment_services.VariantInput(
                key=arm, upstream_url=f"http://127.0.0.1:900{i}", weight=1 / 3, is_control=i == 0
            )
            for i, arm in enumerate(("v1", "v2", "v3"))
        ],
        metrics=[
            experiment_services.MetricUseInput(metric_key=key, role="guardrail", margin=margin)
            for key, margin in kinds.items()
        ],
    )
    experiment = experiment_services.experiment_start(actor="test", key="every-kind").experiment
    at = later(experiment.started_at, 1)
    slow = {"v1": 1.0, "v2": 1.0, "v3": 3.0}  # v3 is three times slower
    for arm, factor in slow.items():
        add_exposures(experiment.pk, arm, (f"{arm}-{i}" for i in range(600)), at)
        latencies = [x * factor for x in lognormal_latencies(600, 100.0, seed=len(arm))]
        add_bucket(experiment.pk, arm, latencies, at=at)
        add_user_latencies(
            experiment.pk,
            arm,
            latencies,
            # After the observation bucket at `at` has closed: the p95 guardrail's threshold
            # comes from control's buckets that ended before a user's first request.
            first_seen=at.timestamp() + 30,
            share=1 / 3,
            control_share=1 / 3,
            prefix="lat-",
        )
        _users(experiment, arm, 600, failed=0.0, at=at.timestamp())
    now = later(at, 30 + windows_s()[1] + settle_s() + 1)

    result = services.analysis_run(experiment_id=experiment.pk, now=now)

    assert result is not None and result.snapshot.decision == "rollback"
    decision = result.analysis.guardrail_decision
    pairs = {(e.metric_key, e.arm): e for e in decision.evaluations}
    assert set(pairs) == {(key, arm) for key in kinds for arm in ("v2", "v3")}
    assert {e.alpha for e in pairs.values()} == {0.05 / 8}
    for key in ("latency-p95", "latency-mean"):
        assert pairs[(key, "v3")].status == "harm", key
        assert pairs[(key, "v2")].status != "harm", key
    assert {e.arm for e in decision.tripped_all} == {"v3"}
