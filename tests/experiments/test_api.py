"""Management API: status codes and error bodies for each validation rule, CRUD and actions."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from experiments.models import AuditEntry, Experiment
from tests.factories import experiment_payload
from tests.problems import assert_problem, messages_by_field

pytestmark = pytest.mark.django_db


def _create(api: APIClient, **extra: Any) -> Any:
    return api.post("/api/v1/experiments/", experiment_payload(**extra), format="json")


def test_create_returns_the_experiment_without_secrets(api: APIClient, metrics: Any) -> None:
    response = _create(api, slack_webhook_url="https://hooks.example.com/services/T/B/secret")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["key"] == "ranker-v2"
    assert body["status"] == "draft"
    assert body["seed"] == "ranker-v2"
    assert [v["key"] for v in body["variants"]] == ["v1", "v2"]
    assert [s["canary_share"] for s in body["ramp_steps"]] == [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert body["has_slack_webhook"] is True
    assert "secret" not in response.content.decode()
    assert AuditEntry.objects.filter(action="create").count() == 1


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (
            {
                "variants": [
                    {"key": "a", "upstream_url": "http://x", "weight": 0.5, "is_control": True},
                    {"key": "b", "upstream_url": "http://y", "weight": 0.4},
                ]
            },
            "variants",
            "sum to 1",
        ),
        (
            {
                "variants": [
                    {"key": "a", "upstream_url": "http://x", "weight": 0.5},
                    {"key": "b", "upstream_url": "http://y", "weight": 0.5},
                ]
            },
            "variants",
            "control",
        ),
        (
            {
                "variants": [
                    {"key": "a", "upstream_url": "http://x", "weight": 0.5, "is_control": True},
                    {"key": "b", "upstream_url": "http://y", "weight": 0.5, "is_control": True},
                ]
            },
            "variants",
            "control",
        ),
        (
            {
                "variants": [
                    {"key": "a", "upstream_url": "ftp://x", "weight": 0.5, "is_control": True},
                    {"key": "b", "upstream_url": "http://y", "weight": 0.5},
                ]
            },
            "variants[0].upstream_url",
            "http",
        ),
        (
            {
                "variants": [
                    {"key": "a", "upstream_url": "http://x", "weight": 1.0, "is_control": True}
                ]
            },
            "variants",
            "two variants",
        ),
        (
            {
                "variants": [
                    {"key": "a", "upstream_url": "http://x", "weight": 0.5, "is_control": True},
                    {"key": "a", "upstream_url": "http://y", "weight": 0.5},
                ]
            },
            "variants",
            "Duplicate",
        ),
        ({"key": "Not A Slug"}, "key", "lowercase"),
        ({"coverage": 1.5}, "coverage", "less than or equal to 1"),
        (
            {"ramp_steps": [{"canary_share": 0.5}, {"canary_share": 0.2}]},
            "ramp_steps[1].canary_share",
            "increase",
        ),
        ({"metrics": [{"metric": "nope", "role": "guardrail"}]}, "metrics[0].metric", "Unknown"),
        (
            {"metrics": [{"metric": "conversion", "role": "primary", "margin": 0.1}]},
            "metrics[0].margin",
            "guardrail",
        ),
        ({"namespace": {"id": "ns", "start": 0.6, "end": 0.2}}, "namespace", "start < end"),
        ({"kind": "shadow-mode"}, "kind", "valid choice"),
        ({"overrides": {"qa-user": "v9"}}, "overrides", "unknown variant"),
    ],
)
def test_validation_errors_name_the_field(
    api: APIClient, metrics: Any, change: dict[str, Any], field: str, fragment: str
) -> None:
    response = _create(api, **change)
    errors = messages_by_field(assert_problem(response, 400, "validation_error"))
    assert field in errors, errors
    assert fragment.lower() in " ".join(errors[field]).lower()
    assert not Experiment.objects.exists()  # nothing half-written


def test_duplicate_key_is_refused(api: APIClient, metrics: Any) -> None:
    assert _create(api).status_code == 201
    response = _create(api)
    errors = messages_by_field(assert_problem(response, 400, "validation_error"))
    assert "already exists" in errors["key"][0]
    assert Experiment.objects.count() == 1


def test_missing_field_is_named(api: APIClient, metrics: Any) -> None:
    payload = experiment_payload()
    del payload["variants"]
    response = api.post("/api/v1/experiments/", payload, format="json")
    body = assert_problem(response, 400, "validation_error")
    assert body["field"] == "variants"
    assert body["errors"][0]["code"] == "required"


def test_list_filters_by_status_and_paginates(api: APIClient, metrics: Any) -> None:
    for i in range(3):
        assert _create(api, key=f"exp-{i}").status_code == 201
    api.post("/api/v1/experiments/exp-1/start/")
    everything = api.get("/api/v1/experiments/").json()
    assert everything["count"] == 3
    running = api.get("/api/v1/experiments/?status=running").json()
    assert [e["key"] for e in running["results"]] == ["exp-1"]
    bogus = assert_problem(api.get("/api/v1/experiments/?status=bogus"), 400, "validation_error")
    assert bogus["field"] == "status"


def test_lifecycle_actions_and_409_on_illegal_transition(api: APIClient, metrics: Any) -> None:
    _create(api)
    base = "/api/v1/experiments/ranker-v2"
    started = api.post(f"{base}/start/")
    assert started.status_code == 200
    assert started.json()["changed"] is True
    assert started.json()["experiment"]["status"] == "running"
    assert api.post(f"{base}/start/").json()["changed"] is False
    assert api.post(f"{base}/pause/", {"reason": "investigating"}, format="json").status_code == 200
    assert api.post(f"{base}/resume/").json()["experiment"]["status"] == "running"
    assert api.post(f"{base}/advance/").json()["experiment"]["ramp_position"] == 1
    no_reason = api.post(f"{base}/rollback/", {}, format="json")
    assert assert_problem(no_reason, 400, "validation_error")["field"] == "reason"
    rolled = api.post(f"{base}/rollback/", {"reason": "p95 regression"}, format="json")
    assert rolled.json()["experiment"]["status"] == "rolled_back"
    conflict = assert_problem(api.post(f"{base}/pause/"), 409, "invalid_transition")
    assert conflict["current"] == "rolled_back"
    assert conflict["requested"] == "paused"
    audit = api.get(f"{base}/audit/").json()
    assert [a["action"] for a in audit["results"]][:2] == ["rollback", "advance"]
    assert audit["results"][0]["reason"] == "p95 regression"


def test_complete_needs_a_known_winner(api: APIClient, metrics: Any) -> None:
    _create(api)
    api.post("/api/v1/experiments/ranker-v2/start/")
    bad = api.post("/api/v1/experiments/ranker-v2/complete/", {"winner": "v9"}, format="json")
    assert "winner" in messages_by_field(assert_problem(bad, 400, "validation_error"))
    assert Experiment.objects.get().status == "running"
    good = api.post("/api/v1/experiments/ranker-v2/complete/", {"winner": "v2"}, format="json")
    assert good.json()["experiment"]["winner"] == "v2"


def test_structural_edits_only_in_draft(api: APIClient, metrics: Any) -> None:
    _create(api)
    url = "/api/v1/experiments/ranker-v2/"
    assert api.patch(url, {"seed": "other"}, format="json").status_code == 200
    api.post(f"{url}start/")
    frozen = assert_problem(api.patch(url, {"seed": "again"}, format="json"), 409, "not_editable")
    assert frozen["field"] == "seed" and frozen["experiment_status"] == "running"
    weights = api.patch(url, {"weights": {"v1": 0.7, "v2": 0.3}}, format="json")
    assert weights.status_code == 200
    assert [v["weight"] for v in weights.json()["variants"]] == [0.7, 0.3]
    bad_weights = api.patch(url, {"weights": {"v1": 0.7, "v2": 0.7}}, format="json")
    assert "variants" in messages_by_field(assert_problem(bad_weights, 400, "validation_error"))
    ramp = api.patch(
        url, {"ramp_steps": [{"canary_share": 0.1}, {"canary_share": 1.0}]}, format="json"
    )
    assert ramp.status_code == 200


def test_delete_only_in_draft(api: APIClient, metrics: Any) -> None:
    _create(api)
    _create(api, key="other")
    api.post("/api/v1/experiments/other/start/")
    assert api.delete("/api/v1/experiments/ranker-v2/").status_code == 204
    assert_problem(api.delete("/api/v1/experiments/other/"), 409, "invalid_transition")
    assert_problem(api.get("/api/v1/experiments/ranker-v2/"), 404, "experiment_not_found")


def test_metrics_crud_and_rules(api: APIClient) -> None:
    created = api.post(
        "/api/v1/metrics/",
        {
            "key": "p99",
            "name": "p99 latency",
            "kind": "quantile",
            "source": "latency_ms",
            "quantile": 0.99,
            "direction": "lower",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    no_level = api.post(
        "/api/v1/metrics/",
        {"key": "p", "name": "p", "kind": "quantile", "source": "latency_ms", "direction": "lower"},
        format="json",
    )
    assert "quantile" in messages_by_field(assert_problem(no_level, 400, "validation_error"))
    ratio = api.post(
        "/api/v1/metrics/",
        {"key": "ctr", "name": "CTR", "kind": "ratio", "direction": "higher"},
        format="json",
    )
    ratio_errors = messages_by_field(assert_problem(ratio, 400, "validation_error"))
    assert {"numerator_event", "denominator_event"} <= set(ratio_errors)
    renamed = api.patch("/api/v1/metrics/p99/", {"name": "Tail latency"}, format="json")
    assert renamed.json()["name"] == "Tail latency"
    assert api.get("/api/v1/metrics/").json()["count"] == 1
    assert api.delete("/api/v1/metrics/p99/").status_code == 204


def test_api_keys_show_the_secret_once(api: APIClient) -> None:
    created = api.post("/api/v1/api-keys/", {"name": "ci", "scopes": ["read"]}, format="json")
    assert created.status_code == 201
    secret = created.json()["key"]
    assert secret.startswith("rk_")
    listing = api.get("/api/v1/api-keys/").content.decode()
    assert secret not in listing
    assert created.json()["prefix"] in listing
    bad = api.post("/api/v1/api-keys/", {"name": "x", "scopes": ["root"]}, format="json")
    assert messages_by_field(assert_problem(bad, 400, "validation_error")) == {
        "scopes[0]": ['"root" is not a valid choice.']
    }


def test_schema_describes_every_endpoint(api: APIClient) -> None:
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in [
        "/api/v1/experiments/",
        "/api/v1/experiments/{key}/",
        "/api/v1/experiments/{key}/start/",
        "/api/v1/experiments/{key}/pause/",
        "/api/v1/experiments/{key}/resume/",
        "/api/v1/experiments/{key}/complete/",
        "/api/v1/experiments/{key}/rollback/",
        "/api/v1/experiments/{key}/advance/",
        "/api/v1/experiments/{key}/audit/",
        "/api/v1/metrics/",
        "/api/v1/metrics/{key}/",
        "/api/v1/api-keys/",
        "/api/v1/api-keys/{prefix}/revoke/",
        "/api/v1/experiments/{key}/results/",
        "/api/v1/experiments/{key}/results/history/",
        "/api/v1/webhooks/",
        "/api/v1/webhooks/test/",
        "/api/v1/webhooks/{webhook_id}/",
    ]:
        assert path in paths, sorted(paths)
    assert len(paths) == len({p.rstrip("/") for p in paths}), "an endpoint is listed twice"
    schemes = response.json()["components"]["securitySchemes"]
    assert schemes["ApiKey"]["scheme"] == "bearer"
    docs = api.get("/api/docs/")
    assert docs.status_code == 200
