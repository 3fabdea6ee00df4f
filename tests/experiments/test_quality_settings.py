"""Quality settings of an experiment: the API takes, renders and validates them field by field."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from experiments.prediction_path import MISSING, PathError, parse_prediction_path, read_path
from experiments.selectors import experiment_view_get
from tests.factories import experiment_payload
from tests.problems import assert_problem, messages_by_field

QUALITY_ON = {
    "quality_enabled": True,
    "quality_prediction_path": "predictions[0].label",
    "quality_prediction_kind": "class",
    "quality_request_id_header": "X-Request-Id",
    "quality_sample_rate": 0.25,
}


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("label", ("label",)),
        ("$.output.class", ("output", "class")),
        ("predictions[0].scores", ("predictions", 0, "scores")),
        ("[2]", (2,)),
        ("$[1][0]", (1, 0)),
        ("a b.c-d", ("a b", "c-d")),
    ],
)
def test_paths_parse_into_keys_and_indices(text: str, steps: tuple[Any, ...]) -> None:
    assert parse_prediction_path(text) == steps


@pytest.mark.parametrize(
    "text", ["", " ", "$", "a..b", ".a", "a.", "a[x]", "a[-1]", "a[0", "a]", "a.[0]", "$a"]
)
def test_bad_paths_are_refused(text: str) -> None:
    with pytest.raises(PathError):
        parse_prediction_path(text)


def test_read_path_tells_missing_from_null() -> None:
    data = {"predictions": [{"label": None, "p": [0.1, 0.9]}]}
    assert read_path(data, ("predictions", 0, "label")) is None
    assert read_path(data, ("predictions", 0, "p", 1)) == 0.9
    assert read_path(data, ("predictions", 1)) is MISSING
    assert read_path(data, ("predictions", "label")) is MISSING
    assert read_path(data, ("predictions", 0, "x")) is MISSING
    assert read_path([1, 2], (1,)) == 2


@pytest.mark.django_db
def test_quality_settings_round_trip_and_reach_the_view(api: APIClient, metrics: Any) -> None:
    response = api.post("/api/v1/experiments/", experiment_payload(**QUALITY_ON), format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert {name: body[name] for name in QUALITY_ON} == QUALITY_ON
    view = experiment_view_get(key=body["key"])
    assert view.quality is not None
    assert view.quality.prediction_path == "predictions[0].label"
    assert view.quality.sample_rate == 0.25
    # Off again: the view has no quality part, the settings stay for later.
    url = f"/api/v1/experiments/{body['key']}/"
    off = api.patch(url, {"quality_enabled": False}, format="json")
    assert off.status_code == 200, off.json()
    assert off.json()["quality_prediction_path"] == "predictions[0].label"
    assert experiment_view_get(key=body["key"]).quality is None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quality_enabled": True}, "quality_prediction_path"),
        ({"quality_prediction_path": "a..b"}, "quality_prediction_path"),
        ({"quality_prediction_kind": "vector"}, "quality_prediction_kind"),
        ({"quality_request_id_header": "X Request"}, "quality_request_id_header"),
        ({"quality_request_id_header": "Cookie"}, "quality_request_id_header"),
        ({"quality_sample_rate": 1.5}, "quality_sample_rate"),
        ({"quality_sample_rate": -0.1}, "quality_sample_rate"),
        ({"quality_enabled": "maybe"}, "quality_enabled"),
    ],
)
def test_bad_quality_settings_name_their_field(
    api: APIClient, metrics: Any, change: dict[str, Any], field: str
) -> None:
    response = api.post("/api/v1/experiments/", experiment_payload(**change), format="json")
    assert list(messages_by_field(assert_problem(response, 400, "validation_error"))) == [field]


@pytest.mark.django_db
def test_switching_quality_on_later_checks_the_stored_path(api: APIClient, metrics: Any) -> None:
    created = api.post("/api/v1/experiments/", experiment_payload(), format="json")
    url = f"/api/v1/experiments/{created.json()['key']}/"
    refused = api.patch(url, {"quality_enabled": True}, format="json")
    errors = messages_by_field(assert_problem(refused, 400, "validation_error"))
    assert list(errors) == ["quality_prediction_path"]
    accepted = api.patch(
        url, {"quality_enabled": True, "quality_prediction_path": "label"}, format="json"
    )
    assert accepted.status_code == 200, accepted.json()
    assert accepted.json()["quality_enabled"] is True


@pytest.mark.django_db
def test_the_experiment_form_sets_quality_and_shows_errors_next_to_the_field(
    metrics: Any,
) -> None:
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
        reverse("experiments:create"), experiment_form(quality_enabled="on")
    ).content.decode()
    assert "JSON path of the prediction" in field_errors(refused, "id_quality_prediction_path")
    created = web.post(
        reverse("experiments:create"),
        experiment_form(
            quality_enabled="on",
            quality_prediction_path="predictions[0]",
            quality_prediction_kind="scores",
            quality_sample_rate="0.5",
        ),
    )
    assert created.status_code == 302
    experiment = Experiment.objects.get(key="ranker-v2")
    assert experiment.quality_enabled and experiment.quality_prediction_kind == "scores"
    assert (experiment.quality_prediction_path, experiment.quality_sample_rate) == (
        "predictions[0]",
        0.5,
    )
    edit = web.get(reverse("experiments:edit", args=["ranker-v2"])).content.decode()
    assert 'value="predictions[0]"' in edit
