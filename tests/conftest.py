"""Shared fixtures: API clients with scoped keys and a catalogue of metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from experiments import services


@pytest.fixture
def make_key(db: None) -> Callable[..., str]:
    def make(*scopes: str, name: str = "test") -> str:
        _, secret = services.api_key_create(actor="test", name=name, scopes=list(scopes))
        return secret

    return make


@pytest.fixture
def api(make_key: Callable[..., str]) -> APIClient:
    """A client holding a key with every scope."""
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {make_key('manage', 'read', 'decide', 'ingest')}"
    )
    return client


@pytest.fixture
def metrics(db: None) -> dict[str, Any]:
    """The built-in technical metrics and one business metric."""
    return {
        "latency_p95": services.metric_create(
            actor="test",
            key="latency-p95",
            name="p95 latency",
            kind="quantile",
            source="latency_ms",
            quantile=0.95,
            direction="lower",
        ),
        "latency_mean": services.metric_create(
            actor="test",
            key="latency-mean",
            name="Mean latency",
            kind="mean",
            source="latency_ms",
            direction="lower",
        ),
        "errors": services.metric_create(
            actor="test",
            key="error-rate",
            name="Error rate",
            kind="binomial",
            source="error",
            direction="lower",
        ),
        "conversion": services.metric_create(
            actor="test",
            key="conversion",
            name="Conversion",
            kind="binomial",
            source="purchase",
            direction="higher",
        ),
    }
