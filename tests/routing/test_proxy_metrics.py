"""The proxy's per-request counts wait in plain integers until they are published."""

from __future__ import annotations

from prometheus_client import REGISTRY

from routing import proxy_metrics

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
