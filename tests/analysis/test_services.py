"""The analysis loop on the database: rollback, hold, ramp steps, stickiness, snapshots."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from analysis import folding, selectors, services
from analysis.models import AlertOutbox, AnalysisState, ResultSnapshot, SequentialState
from analysis.rate_guardrails import settle_s, windows_s
from experiments.models import DEFAULT_WINDOW_S, AuditEntry, Experiment
from tests.analysis.conftest import (
    add_user_latencies,
    later,
    lognormal_latencies,
    start_experiment,
    traffic,
)

pytestmark = pytest.mark.django_db

SNAPSHOT_METRIC_FIELDS = {
    "metric",
    "name",
    "kind",
    "role",
    "direction",
    "arm",
    "control_arm",
    "n_control",
    "n_treatment",
    "control_estimate",
    "treatment_estimate",
    "abs_effect",
    "rel_effect",
    "ci_fixed",
    "ci_always_valid",
    "p_value",
    "p_always_valid",
    "harm_bound",
    "method",
    "margin",
    "status",
    "summary",
    "not_enough_data",
}


def _experiment(key: str) -> Experiment:
    return Experiment.objects.get(key=key)


def test_slow_canary_is_rolled_back_once_with_evidence(metrics: Any, slack_url: str) -> None:
    experiment = start_experiment("slow", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 30)
    # The p95 guardrail bets on users, each against control's p95 before its first request:
    # a first bucket gives the users of the second one their thresholds.
    traffic(experiment, control_n=500, canary_n=500, at=later(at, -10), unit_prefix="w", users=True)
    traffic(experiment, control_n=2000, canary_n=2000, canary_slowdown=1.4, at=at, users=True)

    # A user is bet on once its fast window has closed and settled.
    waiting = services.analysis_run(experiment_id=experiment.pk, now=later(at, 5))
    assert waiting is not None and not waiting.action_taken
    row = next(m for m in waiting.snapshot.metrics if m["metric"] == "latency-p95")
    assert row["status"] == "insufficient" and "not enough data" in row["summary"]
    assert (row["n_control"], row["n_treatment"]) == (0, 0)  # the first bucket's users: none

    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 15))

    assert result is not None and result.action_taken
    assert result.snapshot.decision == "rollback"
    assert _experiment("slow").status == "rolled_back"
    entries = AuditEntry.objects.filter(experiment=experiment, action="rollback")
    assert entries.count() == 1
    evidence = entries.get().after["evidence"]
    assert evidence["metric"] == "latency-p95" and evidence["arm"] == "v2"
    assert evidence["n"] == {"v1": 2000, "v2": 2000}
    # The p95 of the canary is 40% higher (in the second bucket); the always-valid bound is
    # above the margin (quantile_users.bound_levels).
    lower, upper = evidence["interval"]
    assert 0.1 < lower < 0.4 and upper is None and 0.2 < evidence["rel_effect"] < 0.5
    assert entries.get().actor == "rampart:analysis"
    alert = AlertOutbox.objects.get(experiment=experiment)
    assert alert.kind == "rollback" and alert.destination == "slack"
    assert alert.payload["details"]["metric"] == "latency-p95"
    assert slack_url not in str(alert.payload)
    row = next(m for m in result.snapshot.metrics if m["metric"] == "latency-p95")
    assert set(row) == SNAPSHOT_METRIC_FIELDS
    assert row["status"] == "breach"
    assert "p95 latency is" in row["summary"] and "higher on v2" in row["summary"]
    assert row["method"].startswith("betting e-process on users")
    assert row["p_always_valid"] is not None and row["p_always_valid"] < 1e-6
    assert evidence["p_value"] == row["p_always_valid"] and evidence["method"] == row["method"]

    # A second look (a retried or racing task) changes nothing and alerts nobody again.
    assert services.analysis_run(experiment_id=experiment.pk) is None
    assert AuditEntry.objects.filter(experiment=experiment, action="rollback").count() == 1
    assert AlertOutbox.objects.filter(experiment=experiment).count() == 1


def test_healthy_canary_advances_through_steps_and_completes(metrics: Any, slack_url: str) -> None:
    experiment = start_experiment("healthy", ramp=[(0.2, 5, 50), (0.5, 5, 50), (1.0, 5, 50)])
    decisions = []
    reasons = []
    clock = experiment.step_started_at
    for step, control_n in enumerate((800, 200, 0)):  # the split of shares 20%, 50%, 100%
        # The test runs on a simulated clock: each step starts when the previous look ended.
        Experiment.objects.filter(pk=experiment.pk).update(step_started_at=clock)
        current = _experiment("healthy")
        at = later(clock, 10)
        clock = later(at, 1)
        traffic(
            current,
            control_n=control_n,
            canary_n=200,
            at=at,
            seed=step,
            unit_prefix=f"s{step}",
        )
        result = services.analysis_run(experiment_id=experiment.pk, now=clock)
        assert result is not None
        decisions.append(result.snapshot.decision)
        reasons.append((result.snapshot.reason, result.snapshot.health))
    assert decisions == ["advance", "advance", "complete"], reasons
    final = _experiment("healthy")
    assert final.status == "completed" and final.winner.key == "v2"
    assert AuditEntry.objects.filter(experiment=experiment, action="advance").count() == 2
    assert AuditEntry.objects.filter(experiment=experiment, action="complete").count() == 1
    kinds = list(
        AlertOutbox.objects.filter(experiment=experiment)
        .order_by("id")
        .values_list("kind", flat=True)
    )
    assert kinds == ["advance", "advance", "complete"]


def test_step_waits_for_duration_and_exposures(metrics: Any) -> None:
    experiment = start_experiment("waiting", ramp=[(0.5, 600, 100), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 10)
    traffic(experiment, control_n=50, canary_n=50, at=at)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 1))
    assert result is not None and result.snapshot.decision == "continue"
    assert "has run" in result.snapshot.reason
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 900))
    assert result is not None and result.snapshot.decision == "continue"
    assert "units in this step" in result.snapshot.reason
    assert _experiment("waiting").ramp_position == 0


@pytest.mark.parametrize(
    ("policy", "decision", "status", "alert_kind"),
    [
        ("hold", "hold", "running", "hold"),
        ("warn", "continue", "running", "health_warning"),
        ("rollback", "rollback", "rolled_back", "rollback"),
    ],
)
def test_sample_ratio_mismatch_follows_the_health_policy(
    metrics: Any, slack_url: str, policy: str, decision: str, status: str, alert_kind: str
) -> None:
    experiment = start_experiment(f"srm-{policy}", kind="ab", on_health_failure=policy, ramp=[])
    at = later(experiment.started_at, 10)
    # A 50/50 test that shows 1000 vs 700 units: chi-square p ~ 3e-13.
    traffic(experiment, control_n=1000, canary_n=700, canary_slowdown=2.0, at=at)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 1))
    assert result is not None
    assert result.snapshot.decision == decision
    assert result.snapshot.health["srm"]["flagged"] is True
    assert result.snapshot.health["srm"]["p"] < 1e-6
    assert _experiment(f"srm-{policy}").status == status
    # Guardrails are not evaluated on SRM data, so the 2x slower arm does not trigger a
    # guardrail rollback; only the health policy acts.
    kinds = list(AlertOutbox.objects.filter(experiment=experiment).values_list("kind", flat=True))
    assert kinds == [alert_kind]
    if status == "running":
        services.analysis_run(experiment_id=experiment.pk, now=later(at, 2))
        # Still failing: same episode, no second alert.
        assert AlertOutbox.objects.filter(experiment=experiment).count() == 1


def test_always_valid_p_values_are_monotone_and_breach_is_sticky(metrics: Any) -> None:
    experiment = start_experiment(
        "mono",
        kind="ab",
        ramp=[],
        metrics=[
            {"metric": "latency-mean", "role": "guardrail", "margin": 0.5},
            {"metric": "conversion", "role": "primary"},
        ],
    )
    at = later(experiment.started_at, 10)
    closed = windows_s()[1] + settle_s() + 1  # the users' latency windows closed and settled
    p_values = []
    for look in range(4):
        traffic(
            experiment,
            control_n=300,
            canary_n=300,
            canary_slowdown=1.05,
            at=at,
            seed=look * 7,
            unit_prefix=f"l{look}",
        )
        for arm, median, seed in (("v1", 100.0, look * 7), ("v2", 105.0, look * 7 + 1)):
            add_user_latencies(
                experiment.pk,
                arm,
                lognormal_latencies(300, median, seed=seed),
                first_seen=later(at, look).timestamp(),
                share=0.5,
                control_share=0.5,
            )
        now = later(at, look + closed)
        result = services.analysis_run(experiment_id=experiment.pk, now=now)
        assert result is not None
        row = next(m for m in result.snapshot.metrics if m["metric"] == "latency-mean")
        p_values.append(row["p_always_valid"])
    assert all(b <= a for a, b in itertools.pairwise(p_values))
    state = SequentialState.objects.get(experiment=experiment, metric_key="latency-mean")
    assert state.looks == 4
    # A fired guardrail stays fired: set it as an earlier look would have, and look again.
    SequentialState.objects.filter(pk=state.pk).update(fired=True)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 10 + closed))
    assert result is not None and result.snapshot.decision == "rollback"
    assert _experiment("mono").status == "rolled_back"


def test_missing_or_stopped_experiments_are_a_no_op(metrics: Any) -> None:
    assert services.analysis_run(experiment_id=987654) is None
    experiment = start_experiment("paused")
    from experiments import services as experiment_services

    experiment_services.experiment_pause(actor="test", key="paused")
    assert services.analysis_run(experiment_id=experiment.pk) is None
    assert not ResultSnapshot.objects.filter(experiment=experiment).exists()


def test_snapshot_selectors_give_latest_and_history(metrics: Any) -> None:
    experiment = start_experiment("history", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 10)
    traffic(experiment, control_n=150, canary_n=150, at=at)
    for look in range(3):
        services.analysis_run(experiment_id=experiment.pk, now=later(at, look))
    latest = selectors.latest_result(experiment_id=experiment.pk)
    history = selectors.result_history(experiment_id=experiment.pk, limit=2)
    assert latest is not None and latest.created_at == later(at, 2)
    assert [s.created_at for s in history] == [later(at, 1), later(at, 2)]
    assert latest.exposures == {"v1": 150, "v2": 150}
    assert set(latest.latency) == {"v1", "v2"}
    assert set(latest.latency["v1"]) == {"n", "mean", "p50", "p95", "p99", "error_rate"}
    assert AnalysisState.objects.get(experiment=experiment).runs == 3


def test_an_arm_without_traffic_holds_the_ramp(metrics: Any, slack_url: str) -> None:
    experiment = start_experiment("silent", ramp=[(0.5, 0, 0), (1.0, 0, 0)])
    at = later(experiment.started_at, 10)
    traffic(experiment, control_n=300, canary_n=0, at=at)
    early = services.analysis_run(experiment_id=experiment.pk, now=later(at, 5))
    assert early is not None and early.snapshot.health["no_traffic"] is False
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 300))
    assert result is not None
    assert result.snapshot.health["no_traffic"] is True
    assert result.snapshot.decision == "hold"
    assert _experiment("silent").ramp_position == 0
    assert list(
        AlertOutbox.objects.filter(experiment=experiment).values_list("kind", flat=True)
    ) == ["hold"]


def test_a_large_event_backlog_is_folded_by_the_task_in_chunks(
    metrics: Any, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    from routing.models import Event
    from tests.analysis.conftest import add_events, add_exposures

    monkeypatch.setattr(services, "INLINE_FOLD", 10)
    scheduled: list[int] = []
    monkeypatch.setattr(services, "schedule_fold", scheduled.append)
    experiment = start_experiment(
        "backlog", kind="ab", ramp=[], metrics=[{"metric": "conversion", "role": "primary"}]
    )
    at = later(experiment.started_at, 1)
    add_exposures(experiment.pk, "v1", [f"a{i}" for i in range(150)], at)
    add_exposures(experiment.pk, "v2", [f"b{i}" for i in range(150)], at)
    add_events(
        (f"{arm}{i}", "purchase", 1.0, later(at, 1)) for arm in "ab" for i in range(0, 150, 3)
    )
    closed = DEFAULT_WINDOW_S  # look once every unit's exposure window has closed
    with django_capture_on_commit_callbacks(execute=True):
        first = services.analysis_run(experiment_id=experiment.pk, now=later(at, closed + 2))
        second = services.analysis_run(experiment_id=experiment.pk, now=later(at, closed + 3))
    assert first is not None and second is not None
    assert scheduled == [experiment.pk]  # only the second look has a settled backlog
    while folding.events_fold(experiment_id=experiment.pk, limit=7) > 0:
        pass
    state = AnalysisState.objects.get(experiment=experiment)
    assert state.event_cursor == Event.objects.order_by("-id").values_list("id", flat=True)[0]
    third = services.analysis_run(experiment_id=experiment.pk, now=later(at, closed + 4))
    assert third is not None
    for look in (first, second, third):
        row = next(m for m in look.snapshot.metrics if m["metric"] == "conversion")
        assert (row["n_control"], row["control_estimate"]) == (150, pytest.approx(50 / 150))
