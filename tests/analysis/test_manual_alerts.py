"""Changes made by people reach on-call too: one alert per manual transition, none twice."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from analysis import services as analysis_services
from analysis.models import AlertOutbox
from experiments import services
from tests.factories import create_experiment

pytestmark = pytest.mark.django_db


@pytest.fixture
def webhook() -> None:
    analysis_services.webhook_create(
        actor="test", name="on-call", url="http://127.0.0.1:9/hook", secret="s" * 32
    )


def test_manual_rollback_through_the_api_is_alerted_once(
    api: APIClient, metrics: Any, webhook: None
) -> None:
    create_experiment("exp")
    api.post("/api/v1/experiments/exp/start/")
    api.post("/api/v1/experiments/exp/rollback/", {"reason": "bad answers"}, format="json")
    api.post("/api/v1/experiments/exp/rollback/", {"reason": "again"}, format="json")  # no-op
    manual = AlertOutbox.objects.filter(kind="manual").order_by("id")
    # Starting is not alerted (the person watching the launch did it); the rollback is.
    assert [row.payload["details"]["after"] for row in manual] == ["rolled_back"]
    rollback = manual.last()
    assert rollback is not None
    assert rollback.payload["reason"] == "bad answers"
    assert rollback.payload["details"]["actor"].startswith("apikey:")
    assert "http://127.0.0.1:9/hook" not in str(rollback.payload)


def test_the_analysis_workers_own_actions_are_not_alerted_twice(
    metrics: Any, webhook: None
) -> None:
    create_experiment("exp")
    services.experiment_start(actor="user:ana", key="exp")
    services.experiment_rollback(actor="rampart:analysis", key="exp", reason="p95 breach")
    assert not AlertOutbox.objects.filter(kind="manual").exists()


def test_a_refused_transition_queues_nothing(metrics: Any, webhook: None) -> None:
    create_experiment("exp")
    with pytest.raises(Exception, match="cannot pause"):
        services.experiment_pause(actor="user:ana", key="exp")
    assert not AlertOutbox.objects.exists()
