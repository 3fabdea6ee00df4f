"""The error-rate guardrail with the user as the unit, on the database."""

from __future__ import annotations

import math
from typing import Any

import pytest
from django.conf import settings

from analysis import services
from analysis.models import AlertOutbox, RateBetState
from analysis.rate_guardrails import settle_s
from analysis.stats.betting import RateBet, fold_users
from experiments.models import AuditEntry, Experiment
from routing.models import UnitOutcome
from tests.analysis.conftest import later, start_experiment, traffic

pytestmark = pytest.mark.django_db

ERRORS_ONLY = [{"metric": "error-rate", "role": "guardrail", "margin": 0.0}]


def users(experiment: Any, arm: str, count: int, *, failed: float, at: float, share: float) -> None:
    """UnitOutcome rows as the edge writes them: one request per user in both windows."""
    control_share = share if arm == "v1" else 1 - share
    UnitOutcome.objects.bulk_create(
        UnitOutcome(
            experiment_id=experiment.pk,
            unit_id=f"{arm}-{at}-{i}",
            variant_key=arm,
            first_seen=at + i * 1e-3,
            share=share,
            control_share=control_share,
            requests_fast=1,
            errors_fast=int(i < failed * count),
            requests_slow=1,
            errors_slow=int(i < failed * count),
        )
        for i in range(count)
    )


def test_a_canary_failing_every_request_is_rolled_back_once(metrics: Any, slack_url: str) -> None:
    experiment = start_experiment("dead", ramp=[(0.1, 3600, 10), (1.0, 0, 0)], metrics=ERRORS_ONLY)
    start = experiment.step_started_at
    t0 = later(start, 1).timestamp()
    users(experiment, "v1", 60, failed=0.0, at=t0, share=0.9)
    users(experiment, "v2", 6, failed=1.0, at=t0, share=0.1)

    # Before the fast window has closed and settled, nothing is bet on.
    early = services.analysis_run(experiment_id=experiment.pk, now=later(start, 2))
    assert early is not None and early.snapshot.decision != "rollback"

    now = later(start, 1 + settings_fast() + settle_s() + 0.5)
    result = services.analysis_run(experiment_id=experiment.pk, now=now)
    assert result is not None and result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    row = next(m for m in result.snapshot.metrics if m["metric"] == "error-rate")
    assert row["method"].startswith("betting e-process on users")
    assert row["status"] == "breach"
    assert (row["n_control"], row["n_treatment"]) == (60, 6)
    assert row["p_always_valid"] < 0.05
    evidence = AuditEntry.objects.get(experiment=experiment, action="rollback").after["evidence"]
    assert evidence["metric"] == "error-rate" and evidence["arm"] == "v2"
    assert AlertOutbox.objects.filter(experiment=experiment, kind="rollback").count() == 1
    # Each user is bet on once: the states' cursors moved past them.
    assert RateBetState.objects.filter(experiment=experiment).count() == 2
    assert services.analysis_run(experiment_id=experiment.pk, now=later(now, 5)) is None


def settings_fast() -> float:
    from django.conf import settings

    return float(settings.RATE_WINDOW_FAST_S)


def test_error_free_control_against_a_ten_percent_canary_with_per_request_counts_too(
    metrics: Any,
) -> None:
    # The per-request counts (0 / 9,000 vs 100 / 1,000) held the old guardrail in burn-in.
    experiment = start_experiment(
        "tenpct", ramp=[(0.1, 3600, 10), (1.0, 0, 0)], metrics=ERRORS_ONLY
    )
    at = later(experiment.step_started_at, 1)
    traffic(experiment, control_n=9000, canary_n=1000, canary_error_rate=0.1, at=at)
    users(experiment, "v1", 9000, failed=0.0, at=at.timestamp(), share=0.9)
    users(experiment, "v2", 1000, failed=0.1, at=at.timestamp() + 0.0005, share=0.1)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 120))
    assert result is not None and result.snapshot.decision == "rollback"


def test_a_healthy_canary_is_not_rolled_back_and_bets_only_on_closed_windows(
    metrics: Any,
) -> None:
    experiment = start_experiment("fine", ramp=[(0.5, 3600, 10), (1.0, 0, 0)], metrics=ERRORS_ONLY)
    at = later(experiment.step_started_at, 1)
    users(experiment, "v1", 500, failed=0.02, at=at.timestamp(), share=0.5)
    users(experiment, "v2", 500, failed=0.02, at=at.timestamp() + 0.0005, share=0.5)
    users(experiment, "v2", 50, failed=1.0, at=at.timestamp() + 1000, share=0.5)  # still open
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 100))
    assert result is not None and result.snapshot.decision != "rollback"
    row = next(m for m in result.snapshot.metrics if m["metric"] == "error-rate")
    assert (row["n_control"], row["n_treatment"]) == (500, 500)
    assert row["status"] == "ok"


def test_a_state_of_the_previous_bets_continues_from_its_e_value(metrics: Any) -> None:
    # A run in flight when the harm bets changed: 24 equal-weight bet sizes, no version.
    experiment = start_experiment("carry", ramp=[(0.1, 3600, 10), (1.0, 0, 0)], metrics=ERRORS_ONLY)
    at = later(experiment.step_started_at, 1).timestamp()
    # Users before the cursor were bet on already; failing control users there would lower
    # the e-value if they were bet on again.
    users(experiment, "v1", 40, failed=0.5, at=at, share=0.9)
    cursor = at + 1.0
    old = {
        "harm": [1.0] * 12 + [2.0] * 12,
        "safe": [0.0] * 24,
        "treated_users": 4,
        "control_users": 40,
        "treated_sum": 1.0,
        "control_sum": 20.0,
    }
    for window in (settings.RATE_WINDOW_FAST_S, settings.RATE_WINDOW_SLOW_S):
        RateBetState.objects.create(
            experiment=experiment,
            metric_key="error-rate",
            arm="v2",
            window_s=float(window),
            margin=0.0,
            cursor=cursor,
            state=old,
        )
    users(experiment, "v1", 30, failed=0.0, at=cursor + 1, share=0.9)
    users(experiment, "v2", 3, failed=1.0, at=cursor + 2, share=0.1)
    services.analysis_run(experiment_id=experiment.pk, now=later(experiment.step_started_at, 600))

    carried = RateBet.from_json(old)
    expected = fold_users(
        carried,
        outcome=[0.0] * 30 + [1.0] * 3,
        treated=[False] * 30 + [True] * 3,
        treated_share=[0.1] * 33,
        control_share=[0.9] * 33,
        margin=0.0,
    )
    for state in RateBetState.objects.filter(experiment=experiment):
        bet = RateBet.from_json(state.state)
        assert state.state["version"] == 2
        assert (bet.control_users, bet.treated_users) == (70, 7)
        assert bet.harm_log_e == pytest.approx(expected.harm_log_e)
    # The carried-over e-value is the previous grid's (its equal-weight mean).
    assert carried.harm_log_e == pytest.approx(1.0 + math.log((1 + math.e) / 2))
