"""The metric catalogue: validate, create, update and delete metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction
from django.utils.text import slugify

from experiments.errors import InUse, NotFound
from experiments.models import (
    BUILTIN_ERROR,
    BUILTIN_LATENCY,
    BUILTIN_TTFT,
    LLM_SOURCES,
    MAX_WINDOW_S,
    ExperimentStatus,
    Metric,
    MetricDirection,
    MetricKind,
)
from experiments.services.common import Errors, audit, config_version_bump
from experiments.services.quality import validate_quality_metric

S = ExperimentStatus


def validate_metric(values: Mapping[str, Any], errors: Errors) -> None:
    kind = values.get("kind")
    source = values.get("source", "")
    if kind not in MetricKind.values:
        errors.add("kind", f"Must be one of {', '.join(MetricKind.values)}.")
    if values.get("direction") not in MetricDirection.values:
        errors.add("direction", f"Must be one of {', '.join(MetricDirection.values)}.")
    if kind == MetricKind.RATIO:
        if not values.get("numerator_event"):
            errors.add("numerator_event", "A ratio metric needs a numerator event.")
        if not values.get("denominator_event"):
            errors.add("denominator_event", "A ratio metric needs a denominator event.")
    elif kind in MetricKind.values and not source:
        builtins = ", ".join((BUILTIN_LATENCY, BUILTIN_ERROR, *LLM_SOURCES))
        errors.add("source", f"Name an event, or a built-in: {builtins}.")
    if kind == MetricKind.QUANTILE:
        q = values.get("quantile")
        if q is None or not (0.0 < float(q) < 1.0):
            errors.add("quantile", "A quantile metric needs a level in (0, 1), e.g. 0.95.")
        if source not in (BUILTIN_LATENCY, BUILTIN_TTFT):
            errors.add(
                "source", f"Quantile metrics are computed from {BUILTIN_LATENCY} or {BUILTIN_TTFT}."
            )
    elif values.get("quantile") is not None:
        errors.add("quantile", "Only quantile metrics have a quantile level.")
    if source == BUILTIN_ERROR and kind != MetricKind.BINOMIAL:
        errors.add("source", f"{BUILTIN_ERROR} is a binomial metric.")
    if source in (BUILTIN_LATENCY, BUILTIN_TTFT) and kind not in (
        MetricKind.MEAN,
        MetricKind.QUANTILE,
    ):
        errors.add("source", f"{source} is a mean or quantile metric.")
    if source in LLM_SOURCES and source != BUILTIN_TTFT and kind != MetricKind.MEAN:
        errors.add("source", f"{source} is a mean metric (per request).")
    cap = values.get("winsorize_cap")
    if cap is not None and not float(cap) > 0:
        errors.add("winsorize_cap", "Must be positive.")
    if "window_s" in values:
        window = values["window_s"]
        if isinstance(window, bool) or not isinstance(window, int):
            errors.add("window_s", "Must be a whole number of seconds.")
        elif not 1 <= window <= MAX_WINDOW_S:
            errors.add("window_s", f"Must be from 1 to {MAX_WINDOW_S} seconds (30 days).")
    validate_quality_metric(values, errors)


METRIC_FIELDS = (
    "name",
    "description",
    "kind",
    "source",
    "quantile",
    "numerator_event",
    "denominator_event",
    "direction",
    "winsorize_cap",
    "window_s",
    "missing_label",
)


def metric_create(*, actor: str, key: str, **values: Any) -> Metric:
    errors = Errors()
    if not key or slugify(key) != key:
        errors.add("key", "Use lowercase letters, digits, - and _.")
    elif Metric.objects.filter(key=key).exists():
        errors.add("key", f"A metric with key {key!r} already exists.")
    if not str(values.get("name", "")).strip():
        errors.add("name", "This field may not be blank.")
    for name in sorted(set(values) - set(METRIC_FIELDS)):
        errors.add(name, "Unknown field.")
    validate_metric(values, errors)
    errors.raise_if_any()
    with transaction.atomic():
        metric = Metric.objects.create(key=key, **values)
        audit(experiment=None, actor=actor, action="metric.create", after={"key": key})
    return metric


def metric_update(*, actor: str, key: str, **values: Any) -> Metric:
    with transaction.atomic():
        try:
            metric = Metric.objects.select_for_update().get(key=key)
        except Metric.DoesNotExist:
            raise NotFound("metric", key) from None
        errors = Errors()
        if "key" in values:
            errors.add("key", "The key is immutable.")
        for name in sorted(set(values) - set(METRIC_FIELDS) - {"key"}):
            errors.add(name, "Unknown field.")
        merged = {name: getattr(metric, name) for name in METRIC_FIELDS} | values
        validate_metric(merged, errors)
        semantic = set(values) & {
            "kind",
            "source",
            "quantile",
            "numerator_event",
            "denominator_event",
            "direction",
            # A new window changes which events count: the evidence so far would not match.
            "window_s",
        }
        live = metric.uses.exclude(experiment__status=S.DRAFT).exists()
        if semantic and live:
            errors.add(sorted(semantic)[0], "Used by a started experiment: create a new metric.")
        errors.raise_if_any()
        for name, value in values.items():
            setattr(metric, name, value)
        metric.save()
        audit(
            experiment=None,
            actor=actor,
            action="metric.update",
            after={"key": key, "fields": sorted(values)},
        )
        config_version_bump()
    return metric


def metric_delete(*, actor: str, key: str) -> None:
    with transaction.atomic():
        deleted, _ = Metric.objects.filter(key=key, uses__isnull=True).delete()
        if not deleted:
            if Metric.objects.filter(key=key).exists():
                raise InUse("metric", key, "an experiment")
            raise NotFound("metric", key)
        audit(experiment=None, actor=actor, action="metric.delete", before={"key": key})
