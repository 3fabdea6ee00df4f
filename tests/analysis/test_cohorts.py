"""Per-unit metrics compared within ramp-step cohorts in a real analysis run (STATS.md 12.2)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from analysis import services
from analysis.aggregation import business_stats
from analysis.models import AnalysisState
from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from experiments import selectors as experiment_selectors
from experiments import services as experiment_services
from experiments.models import AuditEntry, Experiment
from tests.analysis.conftest import add_events, add_exposures, start_experiment

pytestmark = pytest.mark.django_db


def _cohort(
    experiment_id: int, at: Any, *, control: int, canary: int, rate: float, tag: str
) -> None:
    """Units first exposed at `at`; a share `rate` of each arm buys a minute later."""
    rows = []
    for variant, count in (("v1", control), ("v2", canary)):
        units = add_exposures(
            experiment_id, variant, (f"{tag}{variant}-{i}" for i in range(count)), at
        )
        rows += [
            (unit, "purchase", 1.0, at + timedelta(minutes=1))
            for unit in units[: round(count * rate)]
        ]
    add_events(rows, prefix=tag)


def test_an_a_a_ramp_with_falling_conversion_is_not_rolled_back(
    api: APIClient, metrics: Any
) -> None:
    experiment = start_experiment(
        "aa-ramp",
        ramp=[(0.01, 0, 0), (0.5, 0, 0), (1.0, 0, 0)],
        metrics=[{"metric": "conversion", "role": "guardrail", "margin": 0.0}],
    )
    experiment_services.experiment_advance_ramp(actor="test", key="aa-ramp", from_position=0)
    # The audit trail is real; move it two and three hours back, as if the steps had run.
    now = timezone.now()
    start, advance = now - timedelta(hours=3), now - timedelta(hours=2)
    AuditEntry.objects.filter(experiment=experiment, action="start").update(created_at=start)
    AuditEntry.objects.filter(experiment=experiment, action="advance").update(created_at=advance)
    Experiment.objects.filter(pk=experiment.pk).update(started_at=start, step_started_at=advance)
    # Conversion falls from 40% to 20% between the steps, the same in both arms (A/A).
    _cohort(
        experiment.pk, start + timedelta(minutes=1), control=4950, canary=50, rate=0.4, tag="s0"
    )
    _cohort(
        experiment.pk, advance + timedelta(minutes=1), control=2500, canary=2500, rate=0.2, tag="s1"
    )
    # Pooled, the canary (mostly from the late step) looks far worse: 20.4% against 33.3%,
    # and the guardrail would roll back an identical canary.
    view = experiment_selectors.experiment_view_get(key="aa-ramp")
    pooled = business_stats(
        experiment_id=experiment.pk,
        metrics=[use.metric for use in view.metrics],
        tail_after=0,
        now=now,
    )["conversion"]
    assert pooled["v1"].mean == pytest.approx((1980 + 500) / 7450)
    assert pooled["v2"].mean == pytest.approx((20 + 500) / 2550)
    spec = GuardrailSpec(metric_key="conversion", kind="proportion", direction="higher_is_better")
    snapshot = ExperimentSnapshot(control="v1", treatments=("v2",), metrics={"conversion": pooled})
    assert evaluate_guardrails([spec], snapshot).evaluations[0].status is GuardrailStatus.HARM
    AnalysisState.objects.create(experiment_id=experiment.pk)
    result = services.analysis_run(experiment_id=experiment.pk, now=now)
    assert result is not None
    assert result.snapshot.decision != "rollback"
    row = next(m for m in result.snapshot.metrics if m["metric"] == "conversion")
    assert row["status"] != "breach"
    assert row["rel_effect"] == pytest.approx(0.0, abs=1e-12)
    assert (row["n_control"], row["n_treatment"]) == (7450, 2550)
    assert row["construction"] == {
        "method": "stratified_by_ramp_step",
        "label": "stratified by ramp step (arms compared within each cohort of first exposure)",
        "cohorts_used": 2,
        "cohorts_seen": 2,
        "units_left_out": {"v1": 0, "v2": 0},
    }
    body = api.get("/api/v1/experiments/aa-ramp/results").json()
    api_row = next(m for m in body["metrics"] if m["metric"] == "conversion")
    assert api_row["construction"]["method"] == "stratified_by_ramp_step"
    User.objects.create_user("dave", password="pw-for-tests-only")
    experiment_services.user_role_assign(actor="test", username="dave", role="viewer")
    web = Client()
    web.login(username="dave", password="pw-for-tests-only")
    html = web.get(reverse("analysis:results", args=["aa-ramp"])).content.decode()
    assert "stratified by ramp step, 2 cohorts compared" in html


def test_an_ab_test_that_never_ramped_is_pooled(metrics: Any) -> None:
    experiment = start_experiment(
        "ab-pooled", kind="ab", ramp=[], metrics=[{"metric": "conversion", "role": "primary"}]
    )
    t0 = experiment.started_at
    _cohort(experiment.pk, t0, control=150, canary=150, rate=0.3, tag="p")
    result = services.analysis_run(experiment_id=experiment.pk, now=t0 + timedelta(hours=1))
    assert result is not None
    row = next(m for m in result.snapshot.metrics if m["metric"] == "conversion")
    assert row["construction"]["method"] == "pooled"
    assert row["control_estimate"] == pytest.approx(0.3) and row["n_treatment"] == 150
