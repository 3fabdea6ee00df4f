"""The exposure window of a metric in the API and the UI: default, bounds, strict types."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from experiments import services
from experiments.models import Metric
from tests.factories import create_experiment
from tests.problems import assert_problem, messages_by_field

pytestmark = pytest.mark.django_db

CONVERSION = {"key": "cv", "name": "Conversion", "kind": "binomial", "source": "buy"}


def test_the_api_takes_a_window_with_a_default_and_bounds(api: APIClient) -> None:
    default = api.post("/api/v1/metrics/", {**CONVERSION, "direction": "higher"}, format="json")
    assert default.status_code == 201, default.json()
    assert default.json()["window_s"] == 600
    chosen = api.post(
        "/api/v1/metrics/",
        {**CONVERSION, "key": "cv30", "direction": "higher", "window_s": 1800},
        format="json",
    )
    assert chosen.json()["window_s"] == 1800
    assert Metric.objects.get(key="cv30").window_s == 1800
    for wrong in (0, -5, 30 * 24 * 3600 + 1, "600", 600.5, True, None):
        refused = api.post(
            "/api/v1/metrics/",
            {**CONVERSION, "key": "bad", "direction": "higher", "window_s": wrong},
            format="json",
        )
        assert "window_s" in messages_by_field(assert_problem(refused, 400, "validation_error"))
    assert not Metric.objects.filter(key="bad").exists()
    patched = api.patch("/api/v1/metrics/cv/", {"window_s": 120}, format="json")
    assert patched.json()["window_s"] == 120


def test_a_started_experiment_locks_the_window(api: APIClient, metrics: Any) -> None:
    create_experiment("live")
    services.experiment_start(actor="test", key="live")
    refused = api.patch("/api/v1/metrics/conversion/", {"window_s": 60}, format="json")
    assert "window_s" in messages_by_field(assert_problem(refused, 400, "validation_error"))
    assert Metric.objects.get(key="conversion").window_s == 600


def test_the_metric_form_edits_the_window(db: None) -> None:
    User.objects.create_user("alice", password="correct horse battery staple")
    services.user_role_assign(actor="test", username="alice", role="admin")
    web = Client()
    web.login(username="alice", password="correct horse battery staple")
    page = web.get(reverse("experiments:metric-create")).content.decode()
    assert 'name="window_s"' in page and 'value="600"' in page
    form = {**CONVERSION, "direction": "higher", "window_s": "0"}
    assert web.post(reverse("experiments:metric-create"), form).status_code == 400
    form["window_s"] = "900"
    assert web.post(reverse("experiments:metric-create"), form).status_code == 302
    assert Metric.objects.get(key="cv").window_s == 900
    listing = web.get(reverse("experiments:metric-list")).content.decode()
    assert "within 900 s of first exposure" in listing
    form["window_s"] = "1200"
    edited = web.post(reverse("experiments:metric-edit", args=["cv"]), form)
    assert edited.status_code == 302
    assert Metric.objects.get(key="cv").window_s == 1200
