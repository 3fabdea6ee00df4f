"""Builders for the analysis tests: running experiments and the rows the edge would write."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from experiments import services
from routing.models import Event, Exposure, ObservationBucket, UnitOutcome
from routing.observe.histogram import LogHistogram
from routing.observe.unit_outcomes import encode_buckets
from tests.factories import experiment_payload


def start_experiment(
    key: str,
    kind: str = "canary",
    *,
    ramp: Sequence[tuple[float, int, int]] | None = None,
    metrics: Sequence[dict[str, Any]] | None = None,
    **settings: Any,
) -> Any:
    """Create and start an experiment (ramp steps: (share, min_duration_s, min_exposures))."""
    payload = experiment_payload(key, kind)
    services.experiment_create(
        actor="test",
        key=key,
        name=f"{key} test",
        kind=kind,
        variants=[services.VariantInput(**v) for v in payload["variants"]],
        metrics=[
            services.MetricUseInput(
                metric_key=m["metric"], role=m["role"], margin=m.get("margin", 0.0)
            )
            for m in (metrics if metrics is not None else payload["metrics"])
        ],
        ramp_steps=[services.RampStepInput(s, d, e) for s, d, e in ramp]
        if ramp is not None
        else None,
        **settings,
    )
    return services.experiment_start(actor="test", key=key).experiment


def add_exposures(
    experiment_id: int, variant: str, units: Iterable[str], at: datetime
) -> list[str]:
    unit_list = list(units)
    Exposure.objects.bulk_create(
        Exposure(experiment_id=experiment_id, unit_id=u, variant_key=variant, first_seen_at=at)
        for u in unit_list
    )
    return unit_list


def add_events(rows: Iterable[tuple[str, str, float, datetime]], *, prefix: str = "e") -> None:
    """Events as (unit, name, value, timestamp)."""
    now = timezone.now()
    start = Event.objects.count()
    Event.objects.bulk_create(
        Event(
            event_id=f"{prefix}-{start + i}",
            unit_id=unit,
            name=name,
            value=value,
            timestamp=at,
            received_at=now,
        )
        for i, (unit, name, value, at) in enumerate(rows)
    )


def add_bucket(
    experiment_id: int,
    variant: str,
    latencies: Sequence[float],
    *,
    errors: int = 0,
    at: datetime | None = None,
    shadow: bool = False,
) -> ObservationBucket:
    histogram = LogHistogram()
    histogram.add_many(latencies)
    values = np.asarray(latencies, dtype=float)
    return ObservationBucket.objects.create(
        experiment_id=experiment_id,
        variant_key=variant,
        bucket_start=at or timezone.now(),
        is_shadow=shadow,
        count=len(latencies),
        error_count=errors,
        latency_sum=float(values.sum()),
        latency_sum_sq=float(values @ values),
        latency_histogram=histogram.to_json(),
    )


def add_user_latencies(
    experiment_id: int,
    variant: str,
    latencies: Sequence[float | Sequence[float]],
    *,
    first_seen: float,
    share: float,
    control_share: float,
    prefix: str = "",
) -> None:
    """UnitOutcome rows as the edge writes them: one user per entry of `latencies` (its one
    request's latency, or the latencies of its requests), all first seen at `first_seen`."""
    rows = []
    index = LogHistogram().bucket_index
    for i, values in enumerate(latencies):
        array = np.atleast_1d(np.asarray(values, dtype=float))
        buckets = encode_buckets(Counter(index(float(value)) for value in array))
        rows.append(
            UnitOutcome(
                experiment_id=experiment_id,
                unit_id=f"{prefix}{variant}-{first_seen}-{i}",
                variant_key=variant,
                first_seen=first_seen,
                share=share,
                control_share=control_share,
                requests_fast=array.size,
                requests_slow=array.size,
                latency_sum=float(array.sum()),
                latency_sum_sq=float(array @ array),
                latency_count=array.size,
                latency_buckets_fast=buckets,
                latency_buckets_slow=buckets,
            )
        )
    UnitOutcome.objects.bulk_create(rows)


def lognormal_latencies(n: int, median_ms: float, *, seed: int, sigma: float = 0.3) -> list[float]:
    """Deterministic log-normal latencies (a seeded generator, not the code under test)."""
    rng = np.random.default_rng(seed)
    return [float(x) for x in median_ms * np.exp(sigma * rng.standard_normal(n))]


def traffic(
    experiment: Any,
    *,
    control_n: int,
    canary_n: int,
    canary_slowdown: float = 1.0,
    canary_error_rate: float = 0.0,
    control_error_rate: float = 0.0,
    at: datetime,
    seed: int = 1,
    unit_prefix: str = "u",
    users: bool = False,
) -> None:
    """Exposures (one per request, new units) and one observation bucket per arm.

    ``users`` also writes the per-user rows the proxy writes (`add_unit_latencies`).
    """
    add_exposures(experiment.pk, "v1", (f"{unit_prefix}c{i}" for i in range(control_n)), at)
    add_exposures(experiment.pk, "v2", (f"{unit_prefix}t{i}" for i in range(canary_n)), at)
    control = lognormal_latencies(control_n, 100.0, seed=seed)
    canary = lognormal_latencies(canary_n, 100.0 * canary_slowdown, seed=seed + 1)
    add_bucket(
        experiment.pk, "v1", control, errors=math.floor(control_n * control_error_rate), at=at
    )
    add_bucket(experiment.pk, "v2", canary, errors=math.floor(canary_n * canary_error_rate), at=at)
    if users:
        share = canary_n / (control_n + canary_n)
        add_unit_latencies(
            experiment.pk, "v1", control, at=at, canary_share=share, prefix=unit_prefix
        )
        add_unit_latencies(
            experiment.pk, "v2", canary, at=at, canary_share=share, prefix=unit_prefix
        )


def add_unit_latencies(
    experiment_id: int,
    variant: str,
    latencies: Sequence[float],
    *,
    at: datetime,
    canary_share: float,
    prefix: str = "u",
) -> None:
    """One `UnitOutcome` per latency, as the proxy writes them: a user with one request,
    first seen within the 10-second bucket starting at ``at`` (quantile guardrails)."""
    start = at.timestamp()
    index = LogHistogram().bucket_index
    UnitOutcome.objects.bulk_create(
        UnitOutcome(
            experiment_id=experiment_id,
            unit_id=f"{prefix}{'c' if variant == 'v1' else 't'}{i}",
            variant_key=variant,
            first_seen=start + 9.0 * i / len(latencies),
            share=canary_share if variant != "v1" else 1 - canary_share,
            control_share=1 - canary_share,
            requests_fast=1,
            requests_slow=1,
            latency_sum=value,
            latency_sum_sq=value * value,
            latency_count=1,
            latency_buckets_fast=f"{index(value)}:1",
            latency_buckets_slow=f"{index(value)}:1",
        )
        for i, value in enumerate(latencies)
    )


@pytest.fixture
def slack_url(settings: Any) -> str:
    """A Slack default webhook nobody listens on, so alerts get queued for Slack."""
    settings.SLACK_WEBHOOK_URL = "http://127.0.0.1:9/services/T000/B000/secret-token"
    return str(settings.SLACK_WEBHOOK_URL)


def later(moment: datetime, seconds: float) -> datetime:
    return moment + timedelta(seconds=seconds)
