"""Prediction-drift settings: the API and the form take, render and validate them by field."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from experiments.selectors import experiment_view_get
from tests.factories import experiment_payload
from tests.problems import assert_problem, messages_by_field

pytestmark = pytest.mark.django_db

DRIFT_ON = {
    "quality_enabled": True,
    "quality_prediction_path": "label",
    "prediction_drift_enabled": True,
    "prediction_drift_tolerance": 0.05,
    "prediction_drift_action": "rollback",
}


def test_drift_settings_round_trip_and_reach_the_view(api: APIClient, metrics: Any) -> None:
    response = api.post("/api/v1/experiments/", experiment_payload(**DRIFT_ON), format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert {name: body[name] for name in DRIFT_ON} == DRIFT_ON
    quality = experiment_view_get(key=body["key"]).quality
    assert quality is not None
    assert (quality.drift_tolerance, quality.drift_action) == (0.05, "rollback")
    url = f"/api/v1/experiments/{body['key']}/"
    off = api.patch(url, {"prediction_drift_enabled": False}, format="json")
    assert off.status_code == 200, off.json()
    quality = experiment_view_get(key=body["key"]).quality
    assert quality is not None and quality.drift_tolerance is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prediction_drift_enabled": True}, "prediction_drift_enabled"),
        ({**DRIFT_ON, "prediction_drift_tolerance": 0.5}, "prediction_drift_tolerance"),
        ({**DRIFT_ON, "prediction_drift_tolerance": -0.01}, "prediction_drift_tolerance"),
        ({**DRIFT_ON, "prediction_drift_tolerance": "wide"}, "prediction_drift_tolerance"),
        ({**DRIFT_ON, "prediction_drift_action": "panic"}, "prediction_drift_action"),
    ],
)
def test_bad_drift_settings_name_their_field(
    api: APIClient, metrics: Any, change: dict[str, Any], field: str
) -> None:
    response = api.post("/api/v1/experiments/", experiment_payload(**change), format="json")
    assert list(messages_by_field(assert_problem(response, 400, "validation_error"))) == [field]


def test_switching_quality_off_under_drift_is_refused(api: APIClient, metrics: Any) -> None:
    created = api.post("/api/v1/experiments/", experiment_payload(**DRIFT_ON), format="json")
    url = f"/api/v1/experiments/{created.json()['key']}/"
    refused = api.patch(url, {"quality_enabled": False}, format="json")
    errors = messages_by_field(assert_problem(refused, 400, "validation_error"))
    assert list(errors) == ["prediction_drift_enabled"]


def test_the_experiment_form_sets_drift_and_shows_errors_next_to_the_field(metrics: Any) -> None:
    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    from experiments import services
    from experiments.models import Experiment
    from tests.experiments.test_views import experiment_form, field_errors

    web = Client()
    web.force_login(User.objects.create_user("eve", password="pw-for-tests-only"))
    services.user_role_assign(actor="test", username="eve", role="admin")
    refused = web.post(
        reverse("experiments:create"), experiment_form(prediction_drift_enabled="on")
    ).content.decode()
    assert "quality tracking" in field_errors(refused, "id_prediction_drift_enabled")
    created = web.post(
        reverse("experiments:create"),
        experiment_form(
            quality_enabled="on",
            quality_prediction_path="label",
            prediction_drift_enabled="on",
            prediction_drift_tolerance="0.03",
            prediction_drift_action="warn",
        ),
    )
    assert created.status_code == 302
    experiment = Experiment.objects.get(key="ranker-v2")
    assert experiment.prediction_drift_enabled
    assert (experiment.prediction_drift_tolerance, experiment.prediction_drift_action) == (
        0.03,
        "warn",
    )


INPUTS = {
    "fields": [
        {"path": "amount", "kind": "number", "threshold": 0.25},
        {"path": "user.country", "kind": "category"},
    ],
    "sample_rate": 0.2,
    "action": "hold",
    "reference": {
        "type": "training",
        "distributions": {
            "amount": {"edges": [10, 100], "counts": [5, 60, 35]},
            "user.country": {"counts": {"DE": 40, "FR": 60}},
        },
    },
}


def test_input_drift_round_trips_and_numbers_take_the_training_edges(
    api: APIClient, metrics: Any
) -> None:
    response = api.post(
        "/api/v1/experiments/", experiment_payload(input_drift=INPUTS), format="json"
    )
    assert response.status_code == 201, response.json()
    stored = response.json()["input_drift"]
    assert stored["fields"][0] == {
        "path": "amount",
        "kind": "number",
        "threshold": 0.25,
        "edges": [10.0, 100.0],
    }
    assert stored["fields"][1]["threshold"] == 0.2  # the default
    view = experiment_view_get(key=response.json()["key"]).input_drift
    assert view is not None and view.fields[0].edges == (10.0, 100.0)
    assert (view.sample_rate, view.action) == (0.2, "hold")
    url = f"/api/v1/experiments/{response.json()['key']}/"
    off = api.patch(url, {"input_drift": {}}, format="json")
    assert off.status_code == 200 and experiment_view_get(key=off.json()["key"]).input_drift is None


def _with(**changes: Any) -> dict[str, Any]:
    return {**INPUTS, **changes}


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ([], "input_drift"),
        ({"fields": []}, "input_drift.fields"),
        ({"fields": [{"path": "a..b", "kind": "number"}]}, "input_drift.fields[0].path"),
        ({"fields": [{"path": "a", "kind": "text"}]}, "input_drift.fields[0].kind"),
        (
            {"fields": [{"path": "a", "kind": "number", "threshold": 0}]},
            "input_drift.fields[0].threshold",
        ),
        (
            {"fields": [{"path": "a", "kind": "number", "edges": [3, 2]}]},
            "input_drift.fields[0].edges",
        ),
        (
            {"fields": [{"path": "a", "kind": "category", "edges": [1]}]},
            "input_drift.fields[0].edges",
        ),
        ({"fields": [{"path": "a", "kind": "number", "x": 1}]}, "input_drift.fields[0].x"),
        (
            {"fields": [{"path": f"f{i}", "kind": "number"} for i in range(11)]},
            "input_drift.fields",
        ),
        (_with(sample_rate=0), "input_drift.sample_rate"),
        (_with(action="panic"), "input_drift.action"),
        (_with(reference={"type": "yesterday"}), "input_drift.reference.type"),
        (
            _with(
                reference={"type": "window", "start": "2026-12-01", "end": "2026-12-02T00:00:00Z"}
            ),
            "input_drift.reference.start",
        ),
        (
            _with(
                reference={
                    "type": "window",
                    "start": "2026-12-02T00:00:00Z",
                    "end": "2026-12-01T00:00:00Z",
                }
            ),
            "input_drift.reference.end",
        ),
        (
            _with(
                reference={
                    "type": "training",
                    "distributions": {
                        **INPUTS["reference"]["distributions"],
                        "amount": {"edges": [10, 100], "counts": [5, 60]},
                    },
                }
            ),
            "input_drift.reference.distributions.amount.counts",
        ),
        (
            _with(
                reference={
                    "type": "training",
                    "distributions": {
                        **INPUTS["reference"]["distributions"],
                        "user.country": {"counts": {"DE": -1}},
                    },
                }
            ),
            "input_drift.reference.distributions.user.country.counts",
        ),
        (
            _with(
                reference={
                    "type": "training",
                    "distributions": {"amount": INPUTS["reference"]["distributions"]["amount"]},
                }
            ),
            "input_drift.reference.distributions",
        ),
    ],
)
def test_bad_input_drift_settings_name_the_place(
    api: APIClient, metrics: Any, setting: Any, field: str
) -> None:
    response = api.post(
        "/api/v1/experiments/", experiment_payload(input_drift=setting), format="json"
    )
    assert list(messages_by_field(assert_problem(response, 400, "validation_error"))) == [field]


def test_the_experiment_form_takes_input_drift_as_json_and_names_the_wrong_place(
    metrics: Any,
) -> None:
    import json

    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    from experiments import services
    from experiments.models import Experiment
    from tests.experiments.test_views import experiment_form, field_errors

    web = Client()
    web.force_login(User.objects.create_user("eve", password="pw-for-tests-only"))
    services.user_role_assign(actor="test", username="eve", role="admin")
    bad = {"fields": [{"path": "amount", "kind": "text"}]}
    refused = web.post(
        reverse("experiments:create"), experiment_form(input_drift=json.dumps(bad))
    ).content.decode()
    assert "fields[0].kind" in field_errors(refused, "id_input_drift")
    not_json = web.post(
        reverse("experiments:create"), experiment_form(input_drift="{fields")
    ).content.decode()
    assert "JSON" in field_errors(not_json, "id_input_drift")
    good = {"fields": [{"path": "amount", "kind": "number"}]}
    created = web.post(reverse("experiments:create"), experiment_form(input_drift=json.dumps(good)))
    assert created.status_code == 302
    stored = Experiment.objects.get(key="ranker-v2").input_drift
    assert stored["fields"][0]["path"] == "amount" and stored["action"] == "warn"
    edit = web.get(reverse("experiments:edit", args=["ranker-v2"])).content.decode()
    assert "amount" in edit
