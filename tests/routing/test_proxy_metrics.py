"""The proxy's per-request counts wait in plain integers until they are published."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from routing.proxy import metrics as proxy_metrics

EXPERIMENT = "published-counts"


def requests(status_class: str) -> float:
    labels = {"experiment": EXPERIMENT, "variant": "v2", "status_class": status_class}
    return REGISTRY.get_sample_value("rampart_proxy_requests_total", labels) or 0.0


def decisions(reason: str) -> float:
    labels = {"experiment": EXPERIMENT, "variant": "v2", "reason": reason}
    return REGISTRY.get_sample_value("rampart_decisions_total", labels) or 0.0


def test_counts_reach_their_counters_when_published_and_only_once() -> None:
    bundle = proxy_metrics.arm_metrics(EXPERIMENT, "v2")
    assert proxy_metrics.arm_metrics(EXPERIMENT, "v2") is bundle
    before = (requests("2xx"), requests("5xx"), decisions("assigned"), decisions("override"))
    for status in (200, 204, 503, 99):  # 99 has no status class and is not counted
        bundle.count_response(status)
    bundle.count_decision("assigned")
    bundle.count_decision("assigned")
    bundle.count_decision("override")
    assert (requests("2xx"), requests("5xx"), decisions("assigned")) == before[:3]

    proxy_metrics.publish_pending()
    published = (requests("2xx"), requests("5xx"), decisions("assigned"), decisions("override"))
    assert published == (before[0] + 2, before[1] + 1, before[2] + 2, before[3] + 1)

    proxy_metrics.publish_pending()
    assert (requests("2xx"), requests("5xx"), decisions("assigned")) == published[:3]


def latency_samples(registry: CollectorRegistry, experiment: str) -> dict[tuple[str, str], float]:
    """The latency histogram's bucket, count and sum samples for one arm."""
    samples = {}
    for family in registry.collect():
        if family.name != "rampart_proxy_upstream_latency_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("experiment") == experiment and not sample.name.endswith(
                "_created"
            ):
                samples[sample.name, sample.labels.get("le", "")] = sample.value
    return samples


def test_batched_latencies_export_what_one_observe_per_request_would() -> None:
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "rampart_proxy_upstream_latency_seconds",
        "same buckets, observed one by one",
        ["experiment", "variant"],
        buckets=proxy_metrics.UPSTREAM_LATENCY._upper_bounds[:-1],
        registry=reference_registry,
    ).labels("batched-latency", "v2")
    bundle = proxy_metrics.arm_metrics("batched-latency", "v2")
    # Values on bucket bounds belong to that bucket (le is "less than or equal"); 12 s is
    # past the last finite bound.
    values = [0.0, 0.0004, 0.001, 0.0025, 0.0026, 0.3, 0.3, 1.0, 9.99, 10.0, 12.0]
    for value in values:
        bundle.observe_latency(value)
        reference.observe(value)
    assert latency_samples(REGISTRY, "batched-latency") == {
        (name, le): 0.0 for (name, le) in latency_samples(reference_registry, "batched-latency")
    }

    proxy_metrics.publish_pending()
    published = latency_samples(REGISTRY, "batched-latency")
    expected = latency_samples(reference_registry, "batched-latency")
    assert published.keys() == expected.keys()
    for key, value in expected.items():
        assert published[key] == pytest.approx(value), key
    assert published["rampart_proxy_upstream_latency_seconds_count", ""] == len(values)
    assert published["rampart_proxy_upstream_latency_seconds_bucket", "0.001"] == 3

    proxy_metrics.publish_pending()
    assert latency_samples(REGISTRY, "batched-latency") == published
