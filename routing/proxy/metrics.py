"""Prometheus metrics of the routing proxy (served on /metrics).

All metrics live in prometheus_client's default registry, so whoever serves /metrics with
``prometheus_client.generate_latest()`` exposes them. Label values are experiment keys, variant
keys and upstream URLs: bounded by configuration, never by traffic.

The proxy's hot path does not call ``.labels()`` per request: :func:`arm_metrics` returns a
cached bundle of already-labelled children for one (experiment, variant) pair. The two counts
every request makes, its response's status class and its decision (``rampart_decisions_total``,
shared with the decision API), are kept as plain integers and added to their counters by
:func:`publish_pending`, which the proxy calls every ``PUBLISH_INTERVAL_S`` and at shutdown.
An increment of a prometheus_client counter takes a lock, and in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) writes a memory-mapped file, about 2 µs on the benchmark
machine: a batch costs that once per second instead of on every request. The upstream latency
histogram is batched the same way: observations are counted per bucket in plain integers and
added to the histogram's bucket and sum values at publication. prometheus_client's public API
takes one observation at a time (two increments each), so this reaches into the labelled
child's ``_upper_bounds``, ``_buckets`` and ``_sum``; tests/routing/test_proxy_metrics.py checks
the exported histogram against the observations. Rare events (errors, fallbacks, shadow
outcomes) are recorded directly.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from routing.observe.metrics import DECISIONS
from routing.proxy.breaker import STATE_VALUES, BreakerState

# How often the proxy adds the pending counts to their counters; a scrape sees them this late.
PUBLISH_INTERVAL_S: Final = 1.0

PROXY_REQUESTS = Counter(
    "rampart_proxy_requests_total",
    "Requests answered by the proxy, by experiment, variant served and response status class.",
    ["experiment", "variant", "status_class"],
)
UPSTREAM_LATENCY = Histogram(
    "rampart_proxy_upstream_latency_seconds",
    "Upstream round-trip time of forwarded requests (request sent to response body received).",
    ["experiment", "variant"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
UPSTREAM_ERRORS = Counter(
    "rampart_proxy_upstream_errors_total",
    "Failed upstream calls by kind: status_5xx, timeout, connect, breaker_open.",
    ["experiment", "variant", "kind"],
)
FALLBACKS = Counter(
    "rampart_proxy_fallbacks_total",
    "Requests of a non-control arm answered by control instead (failure or open breaker).",
    ["experiment", "variant"],
)
BREAKER_STATE = Gauge(
    "rampart_proxy_breaker_state",
    "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open (worst edge process).",
    ["upstream"],
    multiprocess_mode="max",
)
CACHE_HITS = Counter(
    "rampart_proxy_cache_hits_total",
    "Requests answered from the prediction cache.",
    ["experiment", "variant"],
)
SHADOW_REQUESTS = Counter(
    "rampart_proxy_shadow_requests_total",
    "Mirrored requests sent to shadow variants, by outcome: ok or error.",
    ["experiment", "variant", "outcome"],
)
SHADOW_DROPPED = Counter(
    "rampart_proxy_shadow_dropped_total",
    "Mirrored requests not sent: saturated (concurrency limit) or breaker_open.",
    ["experiment", "variant", "reason"],
)
CLIENT_DISCONNECTS = Counter(
    "rampart_proxy_client_disconnects_total",
    "Requests whose client went away before the answer; the upstream call was cancelled.",
)
REJECTED = Counter(
    "rampart_proxy_rejected_total",
    "Requests refused before routing, by reason (unknown_experiment, body_too_large, auth).",
    ["reason"],
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


@dataclass(slots=True)
class ArmMetrics:
    """The labelled metric children of one (experiment, variant), created once.

    ``count_response`` and ``count_decision`` only add to the pending integers; ``publish``
    moves them to the counters. Both run on the proxy's event loop thread only.
    """

    experiment: str
    variant: str
    requests_by_class: tuple[Counter, ...]
    latency: Histogram
    errors_5xx: Counter
    errors_timeout: Counter
    errors_connect: Counter
    errors_breaker_open: Counter
    fallbacks: Counter
    cache_hits: Counter
    shadow_ok: Counter
    shadow_error: Counter
    shadow_saturated: Counter
    shadow_breaker_open: Counter
    pending_by_class: list[int] = field(default_factory=lambda: [0] * len(STATUS_CLASSES))
    pending_decisions: dict[str, int] = field(default_factory=dict)
    # Latency observations not yet in ``latency``: counts by bucket (the first upper bound at
    # or above the value, as Histogram.observe() picks it) and their sum, in seconds.
    latency_bounds: tuple[float, ...] = ()
    pending_latency: list[int] = field(default_factory=list)
    pending_latency_sum: float = 0.0

    def __post_init__(self) -> None:
        self.latency_bounds = tuple(self.latency._upper_bounds)
        self.pending_latency = [0] * len(self.latency_bounds)

    def observe_latency(self, seconds: float) -> None:
        """One upstream round trip for the latency histogram (published later)."""
        self.pending_latency[bisect_left(self.latency_bounds, seconds)] += 1
        self.pending_latency_sum += seconds

    def count_response(self, status: int) -> None:
        """Count one response to the client by status class (published later)."""
        index = status // 100 - 1
        if 0 <= index < len(STATUS_CLASSES):
            self.pending_by_class[index] += 1

    def count_decision(self, reason: str) -> None:
        """Count one decision that served this arm, for ``rampart_decisions_total``."""
        pending = self.pending_decisions
        pending[reason] = pending.get(reason, 0) + 1

    def publish(self) -> None:
        """Add the pending counts to their Prometheus counters."""
        pending_by_class = self.pending_by_class
        for index, count in enumerate(pending_by_class):
            if count:
                pending_by_class[index] = 0
                self.requests_by_class[index].inc(count)
        if self.pending_latency_sum or any(self.pending_latency):
            counts, self.pending_latency = self.pending_latency, [0] * len(self.latency_bounds)
            total, self.pending_latency_sum = self.pending_latency_sum, 0.0
            buckets = self.latency._buckets
            for index, count in enumerate(counts):
                if count:
                    buckets[index].inc(count)
            self.latency._sum.inc(total)
        if self.pending_decisions:
            decisions, self.pending_decisions = self.pending_decisions, {}
            for reason, count in decisions.items():
                DECISIONS.labels(self.experiment, self.variant, reason).inc(count)


# Every arm's bundle, by (experiment, variant): bounded by configuration, like the labels.
_ARMS: dict[tuple[str, str], ArmMetrics] = {}


def arm_metrics(experiment: str, variant: str) -> ArmMetrics:
    """Labelled children for one arm, created once so the hot path does no label lookups."""
    bundle = _ARMS.get((experiment, variant))
    if bundle is None:
        bundle = _ARMS[experiment, variant] = _new_arm_metrics(experiment, variant)
    return bundle


def publish_pending() -> None:
    """Add every arm's pending counts to the counters (call from the proxy's event loop)."""
    for bundle in _ARMS.values():
        bundle.publish()


def _new_arm_metrics(experiment: str, variant: str) -> ArmMetrics:
    return ArmMetrics(
        experiment=experiment,
        variant=variant,
        requests_by_class=tuple(
            PROXY_REQUESTS.labels(experiment, variant, status_class)
            for status_class in STATUS_CLASSES
        ),
        latency=UPSTREAM_LATENCY.labels(experiment, variant),
        errors_5xx=UPSTREAM_ERRORS.labels(experiment, variant, "status_5xx"),
        errors_timeout=UPSTREAM_ERRORS.labels(experiment, variant, "timeout"),
        errors_connect=UPSTREAM_ERRORS.labels(experiment, variant, "connect"),
        errors_breaker_open=UPSTREAM_ERRORS.labels(experiment, variant, "breaker_open"),
        fallbacks=FALLBACKS.labels(experiment, variant),
        cache_hits=CACHE_HITS.labels(experiment, variant),
        shadow_ok=SHADOW_REQUESTS.labels(experiment, variant, "ok"),
        shadow_error=SHADOW_REQUESTS.labels(experiment, variant, "error"),
        shadow_saturated=SHADOW_DROPPED.labels(experiment, variant, "saturated"),
        shadow_breaker_open=SHADOW_DROPPED.labels(experiment, variant, "breaker_open"),
    )


def set_breaker_state(upstream: str, state: BreakerState) -> None:
    """Publish a breaker transition (the breaker's ``on_change`` callback)."""
    BREAKER_STATE.labels(upstream).set(STATE_VALUES[state])
