"""Start a canary from a shadow: what is copied, once only, roles, and clear 4xx problems."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from experiments import roles, services
from experiments.models import AuditEntry, Experiment
from tests.experiments.test_roles import user_with_role

pytestmark = pytest.mark.django_db

URL = "/api/v1/experiments/ranked/shadows/s1/canary"


@pytest.fixture
def source(metrics: Any) -> Experiment:
    experiment = services.experiment_create(
        actor="test",
        key="ranked",
        name="Ranker",
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url="http://127.0.0.1:9001", weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url="http://127.0.0.1:9002", weight=0.5),
            services.VariantInput(
                key="s1",
                name="int8 ranker",
                upstream_url="http://127.0.0.1:9003",
                weight=0.0,
                is_shadow=True,
            ),
        ],
        metrics=[
            services.MetricUseInput(metric_key="latency-p95", role="guardrail", margin=0.15),
            services.MetricUseInput(metric_key="error-rate", role="guardrail", margin=0.0),
        ],
        alpha=0.01,
        fallback_to_control=False,
        slack_webhook_url="http://127.0.0.1:9/slack",
    )
    services.experiment_start(actor="test", key="ranked")
    return experiment


def _client(role: str) -> APIClient:
    client = APIClient()
    client.force_login(user_with_role(role, f"shadow-{role}"))
    return client


def test_one_click_creates_the_shadows_draft_canary_and_a_second_returns_it(
    source: Experiment,
) -> None:
    client = _client(roles.EXPERIMENTER)
    first = client.post(URL)
    assert first.status_code == 201, first.json()
    body = first.json()
    assert body["created"] is True
    canary = body["experiment"]
    assert canary["key"] == "ranked-s1-canary"
    assert canary["kind"] == "canary"
    assert canary["status"] == "draft"
    variants = {v["key"]: v for v in canary["variants"]}
    assert set(variants) == {"v1", "s1"}
    assert variants["v1"]["is_control"] and variants["v1"]["upstream_url"].startswith(
        "http://127.0.0.1:9001"
    )
    assert variants["s1"]["upstream_url"].startswith("http://127.0.0.1:9003")
    assert not variants["s1"]["is_shadow"]
    uses = {(m["metric"], m["role"], m["margin"]) for m in canary["metrics"]}
    assert uses == {("latency-p95", "guardrail", 0.15), ("error-rate", "guardrail", 0.0)}
    assert [s["canary_share"] for s in canary["ramp_steps"]] == list(services.DEFAULT_RAMP)
    stored = Experiment.objects.get(key="ranked-s1-canary")
    assert (stored.alpha, stored.fallback_to_control) == (0.01, False)
    assert stored.slack_webhook_url == "http://127.0.0.1:9/slack"

    again = client.post(URL)
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert again.json()["experiment"]["key"] == "ranked-s1-canary"
    assert Experiment.objects.filter(key__startswith="ranked-s1").count() == 1
    entries = AuditEntry.objects.filter(experiment=source, action="canary_from_shadow")
    assert [e.after for e in entries] == [{"shadow": "s1", "canary": "ranked-s1-canary"}]


def test_viewers_may_not_start_a_canary(source: Experiment) -> None:
    assert _client(roles.VIEWER).post(URL).status_code == 403
    assert not Experiment.objects.filter(key="ranked-s1-canary").exists()


@pytest.mark.parametrize(
    ("url", "status", "field"),
    [
        ("/api/v1/experiments/ranked/shadows/v2/canary", 400, "shadow"),
        ("/api/v1/experiments/ranked/shadows/nope/canary", 400, "shadow"),
        ("/api/v1/experiments/missing/shadows/s1/canary", 404, None),
    ],
)
def test_a_wrong_shadow_or_experiment_is_a_clear_problem(
    source: Experiment, url: str, status: int, field: str | None
) -> None:
    response = _client(roles.EXPERIMENTER).post(url)
    assert response.status_code == status
    assert response["content-type"].startswith("application/problem+json")
    if field is not None:
        assert field in {e["field"] for e in response.json()["errors"]}
    assert Experiment.objects.count() == 1


def test_a_foreign_experiment_under_the_canarys_key_is_refused(source: Experiment) -> None:
    services.experiment_create(
        actor="test",
        key="ranked-s1-canary",
        name="unrelated",
        kind="ab",
        variants=[
            services.VariantInput(
                key="a", upstream_url="http://127.0.0.1:9101", weight=0.5, is_control=True
            ),
            services.VariantInput(key="b", upstream_url="http://127.0.0.1:9102", weight=0.5),
        ],
    )
    response = _client(roles.EXPERIMENTER).post(URL)
    assert response.status_code == 400
    assert "key" in {e["field"] for e in response.json()["errors"]}


def test_a_body_is_refused_naming_the_field(source: Experiment) -> None:
    response = _client(roles.EXPERIMENTER).post(URL, {"ramp": []}, format="json")
    assert response.status_code == 400
    assert "ramp" in {e["field"] for e in response.json()["errors"]}
