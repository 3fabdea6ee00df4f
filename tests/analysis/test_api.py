"""Results API, webhooks API, test alerts, the analyze command and the thin tasks."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from analysis import followup_tasks, services, tasks
from analysis.models import AlertOutbox, WebhookEndpoint
from tests.analysis.conftest import later, start_experiment, traffic
from tests.problems import assert_problem, messages_by_field

pytestmark = pytest.mark.django_db


def _client(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


@pytest.fixture
def analysed(metrics: Any) -> Any:
    experiment = start_experiment("api-exp", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 10)
    traffic(experiment, control_n=200, canary_n=200, at=at)
    for look in range(3):
        services.analysis_run(experiment_id=experiment.pk, now=later(at, look))
    return experiment


def test_results_and_history_need_the_read_scope(
    analysed: Any, make_key: Callable[..., str]
) -> None:
    reader = _client(make_key("read"))
    response = reader.get("/api/v1/experiments/api-exp/results")
    assert response.status_code == 200
    body = response.json()
    assert body["experiment"] == "api-exp"
    assert body["decision"] == "continue"
    assert body["status"] == "ready"
    assert set(body) == {
        "experiment",
        "status",
        "created_at",
        "decision",
        "reason",
        "health",
        "exposures",
        "metrics",
        "latency",
        "shadows",
    }
    assert body["shadows"] == []
    assert set(body["health"]) == {"srm", "multiple_exposure", "no_traffic"}
    history = reader.get("/api/v1/experiments/api-exp/results/history?limit=2").json()
    assert [r["created_at"] for r in history["results"]] == sorted(
        r["created_at"] for r in history["results"]
    )
    assert len(history["results"]) == 2
    for limit in ("0", "5001", "²", "-1", "1.5"):
        bad = reader.get(f"/api/v1/experiments/api-exp/results/history?limit={limit}")
        assert assert_problem(bad, 400, "validation_error")["field"] == "limit"
    denied = _client(make_key("decide")).get("/api/v1/experiments/api-exp/results")
    assert_problem(denied, 403, "permission_denied")
    assert_problem(APIClient().get("/api/v1/experiments/api-exp/results"), 401, "not_authenticated")
    assert_problem(reader.get("/api/v1/experiments/nope/results"), 404, "experiment_not_found")


def test_results_before_the_first_analysis_are_pending_not_missing(
    metrics: Any, api: APIClient, settings: Any
) -> None:
    settings.ANALYSIS_INTERVAL_S = 7.0
    start_experiment("fresh")
    response = api.get("/api/v1/experiments/fresh/results")
    assert response.status_code == 200
    assert response.json() == {
        "experiment": "fresh",
        "status": "pending",
        "experiment_status": "running",
        "detail": "No analysis has run yet: running experiments are analysed every 7 s.",
        "analysis_interval_s": 7.0,
    }
    assert api.get("/api/v1/experiments/fresh/results/history").json()["results"] == []


def test_session_users_can_read_results(analysed: Any, django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("ops", password="pw-123456789", is_staff=True)
    client = APIClient()
    client.force_login(user)
    assert client.get("/api/v1/experiments/api-exp/results").status_code == 200


def test_webhooks_hide_urls_and_secrets(
    api: APIClient, make_key: Callable[..., str], settings: Any
) -> None:
    url = "https://hooks.example.com/rampart/secret-path-123"
    secret = "s3cr3t-signing-key-0123"
    created = api.post(
        "/api/v1/webhooks", {"name": "pager", "url": url, "secret": secret}, format="json"
    )
    assert created.status_code == 201
    listed = api.get("/api/v1/webhooks")
    for response in (created, listed):
        text = response.content.decode()
        assert "secret-path-123" not in text and secret not in text
    assert listed.json()[0]["host"] == "hooks.example.com"
    assert _client(make_key("read")).get("/api/v1/webhooks").status_code == 403
    bad = api.post("/api/v1/webhooks", {"name": "x", "url": "ftp://a", "secret": "short"})
    assert {"url", "secret"} <= set(messages_by_field(assert_problem(bad, 400, "validation_error")))

    settings.SLACK_WEBHOOK_URL = "https://hooks.slack.com/services/T/B/token-abc"
    queued = api.post("/api/v1/webhooks/test")
    assert queued.status_code == 202 and queued.json() == {"queued": 2}
    assert set(AlertOutbox.objects.values_list("destination", flat=True)) == {
        "slack",
        f"webhook:{WebhookEndpoint.objects.get().pk}",
    }
    assert "token-abc" not in queued.content.decode()

    endpoint_id = created.json()["id"]
    assert api.delete(f"/api/v1/webhooks/{endpoint_id}").status_code == 204
    assert_problem(api.delete(f"/api/v1/webhooks/{endpoint_id}"), 404, "not_found")


def test_analyze_command_prints_the_snapshot_as_json(metrics: Any) -> None:
    experiment = start_experiment("cli", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    traffic(experiment, control_n=150, canary_n=150, at=later(experiment.step_started_at, 1))
    out = io.StringIO()
    call_command("analyze", "cli", stdout=out)
    data = json.loads(out.getvalue())
    assert data["experiment"] == "cli"
    assert data["exposures"] == {"v1": 150, "v2": 150}
    assert {m["metric"] for m in data["metrics"]} == {"latency-p95", "error-rate", "conversion"}
    with pytest.raises(CommandError):
        call_command("analyze", "missing")


def test_tasks_are_thin_and_missing_rows_are_no_ops(analysed: Any) -> None:
    assert tasks.analysis_run.run(experiment_id=987654) is None
    assert tasks.analysis_run.run(experiment_id=analysed.pk) == "continue"
    assert followup_tasks.alerts_deliver.run() == {"delivered": 0, "failed": 0, "dead": 0}
    assert tasks.analysis_run.acks_late and followup_tasks.alerts_deliver.acks_late
