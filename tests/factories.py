"""Builders of experiment payloads and drafts shared by the tests."""

from __future__ import annotations

from typing import Any

from experiments import services


def experiment_payload(
    key: str = "ranker-v2", kind: str = "canary", **extra: Any
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "key": key,
        "name": "Ranker v2 canary",
        "kind": kind,
        "variants": [
            {
                "key": "v1",
                "upstream_url": "http://127.0.0.1:9001",
                "weight": 0.5,
                "is_control": True,
            },
            {"key": "v2", "upstream_url": "http://127.0.0.1:9002", "weight": 0.5},
        ],
        "metrics": [
            {"metric": "latency-p95", "role": "guardrail", "margin": 0.1},
            {"metric": "error-rate", "role": "guardrail", "margin": 0.0},
            {"metric": "conversion", "role": "primary"},
        ],
    }
    payload.update(extra)
    return payload


def create_experiment(key: str = "ranker-v2", kind: str = "canary", **extra: Any) -> Any:
    """Create a draft experiment through the service, with the payload's defaults."""
    payload = experiment_payload(key, kind, **extra)
    return services.experiment_create(
        actor="test",
        key=payload["key"],
        name=payload["name"],
        kind=payload["kind"],
        variants=[services.VariantInput(**v) for v in payload["variants"]],
        metrics=[
            services.MetricUseInput(
                metric_key=m["metric"], role=m["role"], margin=m.get("margin", 0.0)
            )
            for m in payload["metrics"]
        ],
    )
