"""Input drift in the analysis run: reference windows and uploads, PSI, alerts once per episode."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from analysis import alert_delivery, services
from analysis.models import AlertOutbox
from experiments import services as experiment_services
from experiments.models import AuditEntry
from routing.models import InputDriftBucket
from tests.analysis.conftest import add_exposures, later, start_experiment

pytestmark = pytest.mark.django_db


def _minutes(experiment_id: int, start: datetime, minutes: int, shares: dict[str, float]) -> None:
    """`minutes` buckets of 500 requests each, the field `country` drawn from `shares`."""
    rng = random.Random(minutes)
    rows = []
    for minute in range(minutes):
        values = rng.choices(list(shares), weights=list(shares.values()), k=500)
        counts = {value: values.count(value) for value in shares}
        rows.append(
            InputDriftBucket(
                experiment_id=experiment_id,
                field_path="country",
                bucket_start=(start + timedelta(minutes=minute)).timestamp(),
                counts=orjson.dumps(counts).decode(),
            )
        )
    InputDriftBucket.objects.bulk_create(rows)


def _experiment(key: str, kind: str = "ab", **drift: Any) -> Any:
    experiment = start_experiment(
        key,
        kind,
        metrics=[],
        input_drift={
            "fields": [{"path": "country", "kind": "category", "threshold": 0.1}],
            **drift,
        },
    )
    at = later(experiment.started_at, 1)
    add_exposures(experiment.pk, "v1", [f"a{i}" for i in range(50)], at)
    add_exposures(experiment.pk, "v2", [f"b{i}" for i in range(50)], at)
    return experiment


def _window(experiment: Any, minutes: int) -> dict[str, Any]:
    start = experiment.started_at
    return {
        "type": "window",
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=minutes)).isoformat(),
    }


def test_a_field_that_moves_away_from_its_reference_window_alerts_once_per_episode(
    slack_url: str, settings: Any
) -> None:
    settings.INPUT_DRIFT_WINDOW_S = 600
    experiment = _experiment("shifting")
    experiment_services.experiment_update(
        actor="test",
        key="shifting",
        input_drift={**experiment.input_drift, "reference": _window(experiment, 10)},
    )
    start = experiment.started_at
    _minutes(experiment.pk, start, 10, {"DE": 0.5, "FR": 0.3, "IT": 0.2})
    # Steady for 10 more minutes: within the threshold, no alert.
    _minutes(experiment.pk, start + timedelta(minutes=10), 10, {"DE": 0.5, "FR": 0.3, "IT": 0.2})
    result = services.analysis_run(experiment_id=experiment.pk, now=later(start, 20 * 60))
    assert result is not None
    report = result.snapshot.health["input_drift"]
    assert report["drifting"] == [] and report["fields"][0]["psi"] < 0.1
    assert report["collecting_reference"] is False
    # Then the traffic turns mostly Italian: flagged, one alert, the decision stands (warn).
    _minutes(experiment.pk, start + timedelta(minutes=20), 10, {"DE": 0.2, "FR": 0.1, "IT": 0.7})
    for seconds in (30 * 60, 30 * 60 + 5):
        result = services.analysis_run(experiment_id=experiment.pk, now=later(start, seconds))
        assert result is not None
        assert result.snapshot.decision == "continue"
        assert "input drift" in result.snapshot.reason
    field = result.snapshot.health["input_drift"]["fields"][0]
    assert field["flagged"] and field["psi"] > 0.5 and field["p"] < 0.05
    alerts = AlertOutbox.objects.filter(experiment=experiment, kind="input_drift")
    assert alerts.count() == 1
    message = str(alert_delivery.slack_message(alerts[0].payload))
    assert "Input drift" in message and "country" in message
    # Back to normal (the recent window no longer drifts), then drifting again: a new episode.
    _minutes(experiment.pk, start + timedelta(minutes=30), 10, {"DE": 0.5, "FR": 0.3, "IT": 0.2})
    services.analysis_run(experiment_id=experiment.pk, now=later(start, 40 * 60))
    _minutes(experiment.pk, start + timedelta(minutes=40), 10, {"DE": 0.1, "FR": 0.1, "IT": 0.8})
    services.analysis_run(experiment_id=experiment.pk, now=later(start, 50 * 60))
    assert AlertOutbox.objects.filter(experiment=experiment, kind="input_drift").count() == 2
    # The page: the field's PSI over the runs, with its threshold marked.
    web = Client()
    web.force_login(User.objects.create_user("ann", password="pw-for-tests-only"))
    experiment_services.user_role_assign(actor="test", username="ann", role="admin")
    html = web.get(reverse("analysis:results", args=["shifting"])).content.decode()
    assert "Input drift" in html and "<polyline" in html and "stroke-dasharray" in html
    assert "drifting beyond the threshold" in html


def test_nothing_is_flagged_while_the_reference_window_is_open(settings: Any) -> None:
    settings.INPUT_DRIFT_REFERENCE_S = 3600
    experiment = _experiment("young")
    _minutes(experiment.pk, experiment.started_at, 10, {"DE": 0.5, "IT": 0.5})
    result = services.analysis_run(
        experiment_id=experiment.pk, now=later(experiment.started_at, 600)
    )
    assert result is not None
    report = result.snapshot.health["input_drift"]
    assert report["collecting_reference"] is True and report["drifting"] == []


def test_a_training_upload_as_reference_and_input_drift_as_a_guardrail_rolls_back(
    slack_url: str, settings: Any
) -> None:
    settings.INPUT_DRIFT_WINDOW_S = 3600
    experiment = _experiment(
        "trained",
        action="rollback",
        reference={
            "type": "training",
            "distributions": {"country": {"counts": {"DE": 500, "FR": 300, "IT": 200}}},
        },
    )
    _minutes(experiment.pk, experiment.started_at, 5, {"DE": 0.1, "FR": 0.1, "IT": 0.8})
    result = services.analysis_run(
        experiment_id=experiment.pk, now=later(experiment.started_at, 300)
    )
    assert result is not None and result.snapshot.decision == "rollback"
    evidence = AuditEntry.objects.get(experiment=experiment, action="rollback").after["evidence"]
    assert evidence["metric"] == "input_drift:country" and evidence["margin"] == 0.1
    assert AlertOutbox.objects.filter(experiment=experiment, kind="rollback").count() == 1
    assert not AlertOutbox.objects.filter(experiment=experiment, kind="input_drift").exists()
