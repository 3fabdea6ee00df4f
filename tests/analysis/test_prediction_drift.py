"""Prediction drift between arms in the analysis run: folding, the configured response, alerts."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from analysis import alert_delivery, services
from analysis.models import AlertOutbox, DriftUnit, PredictionDriftCount, PredictionDriftState
from experiments import services as experiment_services
from experiments.models import AuditEntry, Experiment
from routing.models import Prediction
from tests.analysis.conftest import add_exposures, later, start_experiment

pytestmark = pytest.mark.django_db

DRIFT = {
    "quality_enabled": True,
    "quality_prediction_path": "label",
    "quality_prediction_kind": "class",
    "prediction_drift_enabled": True,
    "prediction_drift_tolerance": 0.02,
}


def _predictions(
    experiment_id: int,
    at: datetime,
    *,
    users: int,
    shares: dict[str, float],
    classes: dict[str, dict[str, float]],
    requests_per_user: int = 2,
    kind: str = "class",
    seed: int = 7,
) -> None:
    """Users split by `shares`, each with a few predictions drawn from its arm's classes."""
    rng = random.Random(seed)
    rows = []
    arms = list(shares)
    for index in range(users):
        arm = rng.choices(arms, weights=[shares[a] for a in arms])[0]
        add_exposures(experiment_id, arm, [f"u{index}"], at)
        labels = list(classes[arm])
        for request in range(requests_per_user):
            value = rng.choices(labels, weights=[classes[arm][c] for c in labels])[0]
            rows.append(
                Prediction(
                    experiment_id=experiment_id,
                    request_id=f"r-{index}-{request}",
                    variant_key=arm,
                    unit_id=f"u{index}",
                    predicted_at=at.timestamp() + index * 0.05 + request,
                    kind=kind,
                    status="ok",
                    value=orjson.dumps(value).decode(),
                )
            )
    Prediction.objects.bulk_create(rows)


def _run(experiment: Any, at: datetime, seconds: float) -> Any:
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, seconds))
    assert result is not None
    return result


def test_a_canary_whose_classes_shift_is_rolled_back_with_the_drift_as_evidence(
    slack_url: str,
) -> None:
    experiment = start_experiment(
        "drifty", "ab", metrics=[], prediction_drift_action="rollback", **DRIFT
    )
    at = later(experiment.started_at, 10)
    _predictions(
        experiment.pk,
        at,
        users=3000,
        shares={"v1": 0.5, "v2": 0.5},
        classes={"v1": {"cat": 0.5, "dog": 0.5}, "v2": {"cat": 0.7, "dog": 0.3}},
    )
    # The first run sees the rows; the next one folds them (they were visible a run ago).
    assert _run(experiment, at, 400).snapshot.decision == "continue"
    result = _run(experiment, at, 405)
    assert result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    evidence = AuditEntry.objects.get(experiment=experiment, action="rollback").after["evidence"]
    assert evidence["metric"] == "prediction_drift" and evidence["arm"] == "v2"
    assert evidence["margin"] == 0.02 and evidence["p_value"] < 0.05
    # Each user counts once, however many predictions it has.
    assert DriftUnit.objects.filter(experiment=experiment).count() == 3000
    drift = result.snapshot.health["prediction_drift"]
    assert drift["flagged"] == ["v2"]
    assert drift["categories"] == ['"cat"', '"dog"'] or drift["categories"] == ['"dog"', '"cat"']
    assert sum(drift["arms"][a]["users"] for a in ("v1", "v2")) == 3000
    assert drift["arms"]["v2"]["tv"] == pytest.approx(0.2, abs=0.05)
    alert = AlertOutbox.objects.get(experiment=experiment, kind="rollback")
    message = str(alert_delivery.slack_message(alert.payload))
    assert "Prediction drift" in message and "v2" in message


def test_identical_arms_are_not_flagged_and_the_page_shows_the_distributions() -> None:
    experiment = start_experiment("steady", "ab", metrics=[], **DRIFT)
    at = later(experiment.started_at, 10)
    same = {"cat": 0.6, "dog": 0.3, "eel": 0.1}
    _predictions(
        experiment.pk,
        at,
        users=2000,
        shares={"v1": 0.5, "v2": 0.5},
        classes={"v1": same, "v2": same},
        seed=11,
    )
    # One seeded A/A world (the false-alarm rate itself is measured in
    # tests/analysis/stats/test_prediction_drift_simulation.py).
    _run(experiment, at, 300)
    result = _run(experiment, at, 305)
    assert result.snapshot.decision == "continue"
    drift = result.snapshot.health["prediction_drift"]
    assert drift["flagged"] == [] and drift["arms"]["v2"]["p"] > 0.05
    assert (
        drift["arms"]["v2"]["bet_users"]["arm"] + drift["arms"]["v2"]["bet_users"]["control"]
        == 2000
    )
    # Per-minute counts: storage grows with minutes, not with predictions.
    assert PredictionDriftCount.objects.filter(experiment=experiment).count() <= 2 * 3
    web = Client()
    web.force_login(User.objects.create_user("ann", password="pw-for-tests-only"))
    experiment_services.user_role_assign(actor="test", username="ann", role="admin")
    html = web.get(reverse("analysis:results", args=["steady"])).content.decode()
    assert "Prediction drift" in html and "eel" in html


def test_a_hold_keeps_the_canary_at_its_step_and_alerts_once(slack_url: str) -> None:
    experiment = start_experiment(
        "held",
        "canary",
        metrics=[],
        ramp=[(0.5, 300, 0), (1.0, 0, 0)],
        prediction_drift_action="hold",
        **DRIFT,
    )
    at = later(experiment.started_at, 10)
    _predictions(
        experiment.pk,
        at,
        users=3000,
        shares={"v1": 0.5, "v2": 0.5},
        classes={"v1": {"a": 0.6, "b": 0.4}, "v2": {"a": 0.4, "b": 0.6}},
    )
    # Before the step's minimum duration: no advance; the next runs would advance.
    assert _run(experiment, at, 5).snapshot.decision == "continue"
    first = _run(experiment, at, 405)
    again = _run(experiment, at, 410)
    assert first.snapshot.decision == again.snapshot.decision == "hold"
    assert "prediction drift" in first.snapshot.reason
    assert Experiment.objects.get(pk=experiment.pk).ramp_position == 0
    alerts = AlertOutbox.objects.filter(experiment=experiment, kind="prediction_drift")
    assert alerts.count() == 1
    assert "Prediction drift" in str(alert_delivery.slack_message(alerts[0].payload))


def test_numbers_are_binned_on_control_s_first_users_and_then_bet_on(slack_url: str) -> None:
    experiment = start_experiment(
        "prices",
        "ab",
        metrics=[],
        **{**DRIFT, "quality_prediction_kind": "number", "prediction_drift_action": "warn"},
    )
    at = later(experiment.started_at, 10)
    rng = random.Random(3)
    rows = []
    for index in range(3000):
        arm = "v1" if index % 2 else "v2"
        value = rng.gauss(100.0, 10.0) + (8.0 if arm == "v2" else 0.0)
        rows.append(
            Prediction(
                experiment_id=experiment.pk,
                request_id=f"r{index}",
                variant_key=arm,
                unit_id=f"u{index}",
                predicted_at=at.timestamp() + index * 0.05,
                kind="number",
                status="ok" if index % 97 else "missing",
                value=orjson.dumps(value).decode() if index % 97 else "",
            )
        )
    Prediction.objects.bulk_create(rows)
    add_exposures(experiment.pk, "v1", [f"u{i}" for i in range(1, 3000, 2)], at)
    add_exposures(experiment.pk, "v2", [f"u{i}" for i in range(0, 3000, 2)], at)
    _run(experiment, at, 300)
    result = _run(experiment, at, 305)
    state = PredictionDriftState.objects.get(experiment=experiment)
    assert state.edges is not None and len(state.edges) == 10
    drift = result.snapshot.health["prediction_drift"]
    assert "(unreadable)" in drift["categories"] and drift["calibrating"] is False
    assert drift["flagged"] == ["v2"]
    # Warn: the decision stands, the reason says it and one alert goes out.
    assert (
        result.snapshot.decision == "continue"
        and "warning: prediction drift" in result.snapshot.reason
    )
    assert AlertOutbox.objects.filter(experiment=experiment, kind="prediction_drift").exists()
