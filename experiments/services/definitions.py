"""Experiment definitions: validate and create, update or delete an experiment and its parts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.db import transaction
from django.utils.text import slugify

from experiments.errors import InvalidInput, InvalidTransition, NotEditable
from experiments.models import (
    Experiment,
    ExperimentKind,
    ExperimentMetric,
    ExperimentStatus,
    HealthResponse,
    Metric,
    MetricRole,
    RampStep,
    UnitSource,
    Variant,
)
from experiments.services.common import Errors, audit, config_version_bump, experiment_state, locked
from experiments.services.input_drift import validate_input_drift
from experiments.services.quality import QUALITY_FIELDS, quality_state, validate_quality

WEIGHT_TOLERANCE = 1e-6
DEFAULT_RAMP = (0.01, 0.05, 0.10, 0.25, 0.50, 1.0)

S = ExperimentStatus

STRUCTURAL_FIELDS = (
    "variants",
    "seed",
    "hash_version",
    "metrics",
    "kind",
    "unit_source",
    "unit_attribute",
    "namespace",
)
LIVE_FIELDS = ("weights", "ramp_steps", "coverage", "overrides")
ALWAYS_FIELDS = (
    "name",
    "description",
    "hypothesis",
    "alpha",
    "decision_sample_size",
    "on_health_failure",
    "fallback_to_control",
    "shadow_compare_field",
    "cache_ttl_s",
    "cache_max_entries",
    "slack_webhook_url",
    *QUALITY_FIELDS,
    "input_drift",
)


@dataclass(frozen=True)
class VariantInput:
    key: str
    upstream_url: str
    weight: float
    is_control: bool = False
    is_shadow: bool = False
    name: str = ""
    # Prices per million input / output tokens (generative models): both or neither.
    price_input_per_m: float | None = None
    price_output_per_m: float | None = None


@dataclass(frozen=True)
class MetricUseInput:
    metric_key: str
    role: str
    margin: float = 0.0


@dataclass(frozen=True)
class RampStepInput:
    canary_share: float
    min_duration_s: int = 0
    min_exposures_per_arm: int = 0


# --- validation -----------------------------------------------------------------------


def _valid_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:  # e.g. "http://[" (an unclosed IPv6 literal)
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.fragment


def validate_variants(variants: Sequence[VariantInput], errors: Errors) -> None:
    if len([v for v in variants if not v.is_shadow]) < 2:
        errors.add("variants", "At least two variants (not counting shadows) are required.")
    controls = [v for v in variants if v.is_control]
    if len(controls) != 1:
        errors.add("variants", f"Exactly one variant must be the control (got {len(controls)}).")
    if any(v.is_control and v.is_shadow for v in variants):
        errors.add("variants", "The control cannot be a shadow.")
    keys = [v.key for v in variants]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        errors.add("variants", f"Duplicate variant key: {', '.join(duplicates)}.")
    for index, variant in enumerate(variants):
        if not variant.key or slugify(variant.key) != variant.key:
            errors.add(f"variants[{index}].key", "Use lowercase letters, digits, - and _.")
        if not _valid_url(variant.upstream_url):
            errors.add(f"variants[{index}].upstream_url", "Must be an http or https URL.")
        if not (0.0 <= variant.weight <= 1.0) or math.isnan(variant.weight):
            errors.add(f"variants[{index}].weight", "Must be between 0 and 1.")
        if variant.is_shadow and variant.weight != 0:
            errors.add(f"variants[{index}].weight", "A shadow variant gets no traffic: use 0.")
        validate_prices(variant, f"variants[{index}]", errors)
    total = sum(v.weight for v in variants if not v.is_shadow)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        errors.add("variants", f"Weights must sum to 1 (got {total:.6g}).")


def validate_prices(variant: VariantInput, prefix: str, errors: Errors) -> None:
    """Token prices: finite, not negative, and both set or both left out."""
    prices = {
        "price_input_per_m": variant.price_input_per_m,
        "price_output_per_m": variant.price_output_per_m,
    }
    for name, price in prices.items():
        if price is not None and (not math.isfinite(price) or price < 0):
            errors.add(f"{prefix}.{name}", "Must be a price per million tokens, 0 or more.")
    missing = [name for name, price in prices.items() if price is None]
    if len(missing) == 1:
        errors.add(
            f"{prefix}.{missing[0]}",
            "Set both prices per million tokens (input and output), or neither.",
        )


def validate_ramp(kind: str, steps: Sequence[RampStepInput], errors: Errors) -> None:
    if kind != ExperimentKind.CANARY:
        if steps:
            errors.add("ramp_steps", "Only canary experiments have ramp steps.")
        return
    if not steps:
        errors.add("ramp_steps", "A canary needs at least one ramp step.")
        return
    previous = 0.0
    for index, step in enumerate(steps):
        if not (0.0 < step.canary_share <= 1.0):
            errors.add(f"ramp_steps[{index}].canary_share", "Must be in (0, 1].")
        elif step.canary_share <= previous:
            errors.add(f"ramp_steps[{index}].canary_share", "Shares must increase step by step.")
        previous = max(previous, step.canary_share)
        if step.min_duration_s < 0:
            errors.add(f"ramp_steps[{index}].min_duration_s", "Must not be negative.")
        if step.min_exposures_per_arm < 0:
            errors.add(f"ramp_steps[{index}].min_exposures_per_arm", "Must not be negative.")


def validate_metric_uses(uses: Sequence[MetricUseInput], errors: Errors) -> list[Metric]:
    keys = [u.metric_key for u in uses]
    found = {m.key: m for m in Metric.objects.filter(key__in=keys)}
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        errors.add("metrics", f"Metric used twice: {', '.join(duplicates)}.")
    for index, use in enumerate(uses):
        if use.metric_key not in found:
            errors.add(f"metrics[{index}].metric", f"Unknown metric {use.metric_key!r}.")
        if use.role not in MetricRole.values:
            errors.add(f"metrics[{index}].role", f"Must be one of {', '.join(MetricRole.values)}.")
        if not (0.0 <= use.margin <= 10.0) or math.isnan(use.margin):
            errors.add(f"metrics[{index}].margin", "A relative margin between 0 and 10.")
        if use.role != MetricRole.GUARDRAIL and use.margin:
            errors.add(f"metrics[{index}].margin", "Only guardrails have a margin.")
    return [found[k] for k in keys if k in found]


def _validate_settings(values: Mapping[str, Any], errors: Errors) -> None:
    if "coverage" in values and not (0.0 <= float(values["coverage"]) <= 1.0):
        errors.add("coverage", "Must be between 0 and 1.")
    if "alpha" in values and not (0.0 < float(values["alpha"]) < 0.5):
        errors.add("alpha", "Must be between 0 and 0.5.")
    if "hash_version" in values and values["hash_version"] not in (1, 2):
        errors.add("hash_version", "Must be 1 or 2.")
    if "kind" in values and values["kind"] not in ExperimentKind.values:
        errors.add("kind", f"Must be one of {', '.join(ExperimentKind.values)}.")
    if "unit_source" in values and values["unit_source"] not in UnitSource.values:
        errors.add("unit_source", f"Must be one of {', '.join(UnitSource.values)}.")
    if "unit_attribute" in values and not str(values["unit_attribute"]).strip():
        errors.add("unit_attribute", "Name the header, cookie or field that identifies a user.")
    if "on_health_failure" in values and values["on_health_failure"] not in HealthResponse.values:
        errors.add("on_health_failure", f"Must be one of {', '.join(HealthResponse.values)}.")
    if "decision_sample_size" in values and int(values["decision_sample_size"]) < 100:
        errors.add("decision_sample_size", "Must be at least 100.")
    if values.get("slack_webhook_url") and not _valid_url(values["slack_webhook_url"]):
        errors.add("slack_webhook_url", "Must be an http or https URL.")
    namespace = values.get("namespace")
    if namespace is not None:
        ns_id, start, end = namespace
        if not ns_id:
            errors.add("namespace", "A namespace needs an id.")
        if not (0.0 <= start < end <= 1.0):
            errors.add("namespace", "Needs 0 <= start < end <= 1.")


def _validate_overrides(
    overrides: Mapping[str, str], variant_keys: Iterable[str], errors: Errors
) -> None:
    keys = set(variant_keys)
    for unit, variant in overrides.items():
        if not unit:
            errors.add("overrides", "Unit ids must not be empty.")
        if variant not in keys:
            errors.add("overrides", f"Unit {unit!r} is forced to unknown variant {variant!r}.")


# --- experiments: definition ----------------------------------------------------------


def _replace_variants(experiment: Experiment, variants: Sequence[VariantInput]) -> None:
    experiment.variants.all().delete()
    Variant.objects.bulk_create(
        Variant(
            experiment=experiment,
            key=v.key,
            name=v.name or v.key,
            is_control=v.is_control,
            is_shadow=v.is_shadow,
            upstream_url=v.upstream_url,
            weight=v.weight,
            position=i,
            price_input_per_m=v.price_input_per_m,
            price_output_per_m=v.price_output_per_m,
        )
        for i, v in enumerate(variants)
    )


def _replace_metrics(
    experiment: Experiment, uses: Sequence[MetricUseInput], metrics: Sequence[Metric]
) -> None:
    by_key = {m.key: m for m in metrics}
    experiment.metrics.all().delete()
    ExperimentMetric.objects.bulk_create(
        ExperimentMetric(
            experiment=experiment,
            metric=by_key[u.metric_key],
            role=u.role,
            margin=u.margin,
            position=i,
        )
        for i, u in enumerate(uses)
    )


def _replace_ramp(experiment: Experiment, steps: Sequence[RampStepInput]) -> None:
    experiment.ramp_steps.all().delete()
    RampStep.objects.bulk_create(
        RampStep(
            experiment=experiment,
            position=i,
            canary_share=s.canary_share,
            min_duration_s=s.min_duration_s,
            min_exposures_per_arm=s.min_exposures_per_arm,
        )
        for i, s in enumerate(steps)
    )


def default_ramp() -> list[RampStepInput]:
    return [
        RampStepInput(canary_share=s, min_duration_s=60, min_exposures_per_arm=100)
        for s in DEFAULT_RAMP
    ]


def experiment_create(
    *,
    actor: str,
    key: str,
    name: str,
    kind: str,
    variants: Sequence[VariantInput],
    metrics: Sequence[MetricUseInput] = (),
    ramp_steps: Sequence[RampStepInput] | None = None,
    seed: str = "",
    namespace: tuple[str, float, float] | None = None,
    overrides: Mapping[str, str] | None = None,
    **settings: Any,
) -> Experiment:
    """Create a draft experiment with its variants, metrics and ramp, all or nothing."""
    errors = Errors()
    if not key or slugify(key) != key:
        errors.add("key", "Use lowercase letters, digits, - and _.")
    elif Experiment.objects.filter(key=key).exists():
        errors.add("key", f"An experiment with key {key!r} already exists.")
    if not name.strip():
        errors.add("name", "This field may not be blank.")
    unknown = (
        set(settings)
        - set(ALWAYS_FIELDS)
        - {"hypothesis", "description", "coverage", "hash_version", "unit_source", "unit_attribute"}
    )
    if unknown:
        errors.add(sorted(unknown)[0], "Unknown field.")
    _validate_settings({**settings, "kind": kind, "namespace": namespace}, errors)
    validate_quality(settings, errors)
    if "input_drift" in settings:
        settings["input_drift"] = validate_input_drift(settings["input_drift"], errors)
    validate_variants(variants, errors)
    if ramp_steps is None:
        ramp_steps = default_ramp() if kind == ExperimentKind.CANARY else []
    validate_ramp(kind, ramp_steps, errors)
    if kind == ExperimentKind.CANARY and len([v for v in variants if not v.is_shadow]) < 2:
        errors.add("variants", "A canary needs a control and at least one canary version.")
    found_metrics = validate_metric_uses(metrics, errors)
    _validate_overrides(overrides or {}, [v.key for v in variants], errors)
    errors.raise_if_any()

    with transaction.atomic():
        experiment = Experiment.objects.create(
            key=key,
            name=name,
            kind=kind,
            seed=seed or key,
            namespace_id=namespace[0] if namespace else "",
            namespace_start=namespace[1] if namespace else None,
            namespace_end=namespace[2] if namespace else None,
            overrides=dict(overrides or {}),
            **settings,
        )
        _replace_variants(experiment, variants)
        _replace_metrics(experiment, metrics, found_metrics)
        _replace_ramp(experiment, ramp_steps)
        audit(experiment=experiment, actor=actor, action="create", after={"key": key})
        config_version_bump()
    return experiment


def experiment_update(
    *,
    actor: str,
    key: str,
    variants: Sequence[VariantInput] | None = None,
    weights: Mapping[str, float] | None = None,
    metrics: Sequence[MetricUseInput] | None = None,
    ramp_steps: Sequence[RampStepInput] | None = None,
    namespace: tuple[str, float, float] | object | None = ...,
    overrides: Mapping[str, str] | None = None,
    **changes: Any,
) -> Experiment:
    """Change an experiment; structural fields only in draft, weights and ramp while live."""
    with transaction.atomic():
        experiment = locked(key)
        status = experiment.status
        requested = set(changes)
        if variants is not None:
            requested.add("variants")
        if metrics is not None:
            requested.add("metrics")
        if namespace is not ...:
            requested.add("namespace")
        if weights is not None:
            requested.add("weights")
        if ramp_steps is not None:
            requested.add("ramp_steps")
        if overrides is not None:
            requested.add("overrides")
        if "key" in requested:
            raise InvalidInput({"key": ["The key is immutable."]})
        unknown = requested - set(STRUCTURAL_FIELDS) - set(LIVE_FIELDS) - set(ALWAYS_FIELDS)
        if unknown:
            raise InvalidInput({name: ["Unknown field."] for name in sorted(unknown)})
        if status in (S.COMPLETED, S.ROLLED_BACK):
            frozen = sorted(requested - {"name", "description", "hypothesis"})
        elif status in (S.RUNNING, S.PAUSED):
            frozen = sorted(requested & set(STRUCTURAL_FIELDS))
        else:
            frozen = []
        if frozen:
            raise NotEditable(status, frozen)

        errors = Errors()
        if "name" in changes and not str(changes["name"]).strip():
            errors.add("name", "This field may not be blank.")
        kind = changes.get("kind", experiment.kind)
        _validate_settings(
            {**changes, **({"namespace": namespace} if namespace not in (..., None) else {})},
            errors,
        )
        if requested & set(QUALITY_FIELDS):
            validate_quality({**quality_state(experiment), **changes}, errors)
        if "input_drift" in changes:
            changes["input_drift"] = validate_input_drift(changes["input_drift"], errors)
        current_variants = [
            VariantInput(
                key=v.key,
                upstream_url=v.upstream_url,
                weight=v.weight,
                is_control=v.is_control,
                is_shadow=v.is_shadow,
                name=v.name,
                price_input_per_m=v.price_input_per_m,
                price_output_per_m=v.price_output_per_m,
            )
            for v in experiment.variants.all()
        ]
        new_variants = list(variants) if variants is not None else current_variants
        if weights is not None:
            known = {v.key for v in new_variants}
            for unknown_key in sorted(set(weights) - known):
                errors.add("weights", f"Unknown variant {unknown_key!r}.")
            new_variants = [
                VariantInput(**{**v.__dict__, "weight": float(weights.get(v.key, v.weight))})
                for v in new_variants
            ]
        if variants is not None or weights is not None:
            validate_variants(new_variants, errors)
        if ramp_steps is not None or "kind" in changes:
            steps = ramp_steps
            if steps is None:
                steps = [
                    RampStepInput(s.canary_share, s.min_duration_s, s.min_exposures_per_arm)
                    for s in experiment.ramp_steps.all()
                ]
                if kind == ExperimentKind.CANARY and not steps:
                    steps = default_ramp()
                if kind != ExperimentKind.CANARY:
                    steps = []
            ramp_steps = steps
            validate_ramp(kind, steps, errors)
            if experiment.ramp_position is not None and experiment.ramp_position >= len(steps):
                errors.add("ramp_steps", "The ramp is already past the last new step.")
        found_metrics = validate_metric_uses(metrics, errors) if metrics is not None else []
        if overrides is not None:
            _validate_overrides(overrides, [v.key for v in new_variants], errors)
        errors.raise_if_any()

        before = experiment_state(experiment)
        for name, value in changes.items():
            setattr(experiment, name, value)
        if namespace is not ...:
            ns = namespace if isinstance(namespace, tuple) else None
            experiment.namespace_id = ns[0] if ns else ""
            experiment.namespace_start = ns[1] if ns else None
            experiment.namespace_end = ns[2] if ns else None
        if overrides is not None:
            experiment.overrides = dict(overrides)
        if "seed" in changes and not changes["seed"]:
            experiment.seed = experiment.key
        experiment.save()
        if variants is not None:
            _replace_variants(experiment, new_variants)
        elif weights is not None:
            for v in new_variants:
                Variant.objects.filter(experiment=experiment, key=v.key).update(weight=v.weight)
        if metrics is not None:
            _replace_metrics(experiment, metrics, found_metrics)
        if ramp_steps is not None:
            _replace_ramp(experiment, ramp_steps)
        experiment.refresh_from_db()
        audit(
            experiment=experiment,
            actor=actor,
            action="update",
            before=before,
            after={**experiment_state(experiment), "fields": sorted(requested)},
        )
        config_version_bump()
    return experiment


def experiment_delete(*, actor: str, key: str) -> None:
    with transaction.atomic():
        experiment = locked(key)
        if experiment.status != S.DRAFT:
            raise InvalidTransition(experiment.status, "deleted", "delete")
        audit(experiment=None, actor=actor, action="delete", before={"key": key})
        experiment.delete()
        config_version_bump()
