"""Services: the only code that changes experiments, metrics and API keys.

Every lifecycle change is one audited state transition: it takes a row lock, returns early
when the experiment is already in the requested state (so retries and racing workers are
harmless), writes exactly one audit entry and bumps the global config version in the same
transaction, so edges pick the change up on their next snapshot refresh.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.text import slugify

from experiments.errors import InvalidInput, InvalidTransition, NotEditable, NotFound
from experiments.models import (
    BUILTIN_ERROR,
    BUILTIN_LATENCY,
    ApiKey,
    ApiScope,
    AuditEntry,
    ConfigVersion,
    Experiment,
    ExperimentKind,
    ExperimentMetric,
    ExperimentStatus,
    HealthResponse,
    Metric,
    MetricDirection,
    MetricKind,
    MetricRole,
    RampStep,
    UnitSource,
    Variant,
)
from experiments.signals import experiment_transitioned

WEIGHT_TOLERANCE = 1e-6
DEFAULT_RAMP = (0.01, 0.05, 0.10, 0.25, 0.50, 1.0)

S = ExperimentStatus
# The lifecycle state machine: current state -> states it may move to.
ALLOWED_TRANSITIONS: Mapping[str, frozenset[str]] = {
    S.DRAFT: frozenset({S.RUNNING}),
    S.RUNNING: frozenset({S.PAUSED, S.COMPLETED, S.ROLLED_BACK}),
    S.PAUSED: frozenset({S.RUNNING, S.COMPLETED, S.ROLLED_BACK}),
    S.COMPLETED: frozenset(),
    S.ROLLED_BACK: frozenset(),
}

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
)


@dataclass(frozen=True)
class VariantInput:
    key: str
    upstream_url: str
    weight: float
    is_control: bool = False
    is_shadow: bool = False
    name: str = ""


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


@dataclass(frozen=True)
class TransitionResult:
    experiment: Experiment
    changed: bool


@dataclass
class _Errors:
    """Collects field errors so one response can name every wrong field at once."""

    items: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, message: str) -> None:
        self.items.setdefault(name, []).append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidInput(self.items)


# --- config version -------------------------------------------------------------------


def config_version_bump() -> int:
    """Raise the global config version; call inside the transaction that made the change."""
    updated = ConfigVersion.objects.filter(pk=1).update(
        version=F("version") + 1, changed_at=timezone.now()
    )
    if not updated:
        try:
            with transaction.atomic():
                ConfigVersion.objects.create(pk=1, version=1)
        except IntegrityError:
            ConfigVersion.objects.filter(pk=1).update(version=F("version") + 1)
    return ConfigVersion.objects.values_list("version", flat=True).get(pk=1)


def _audit(
    *,
    experiment: Experiment | None,
    actor: str,
    action: str,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    reason: str = "",
) -> AuditEntry:
    return AuditEntry.objects.create(
        experiment=experiment,
        actor=actor or "system",
        action=action,
        before=dict(before or {}),
        after=dict(after or {}),
        reason=reason,
    )


# --- validation -----------------------------------------------------------------------


def _valid_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment


def validate_variants(variants: Sequence[VariantInput], errors: _Errors) -> None:
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
    total = sum(v.weight for v in variants if not v.is_shadow)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        errors.add("variants", f"Weights must sum to 1 (got {total:.6g}).")


def validate_ramp(kind: str, steps: Sequence[RampStepInput], errors: _Errors) -> None:
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


def validate_metric_uses(uses: Sequence[MetricUseInput], errors: _Errors) -> list[Metric]:
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


def _validate_settings(values: Mapping[str, Any], errors: _Errors) -> None:
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
    overrides: Mapping[str, str], variant_keys: Iterable[str], errors: _Errors
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
    errors = _Errors()
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
        _audit(experiment=experiment, actor=actor, action="create", after={"key": key})
        config_version_bump()
    return experiment


def _locked(key: str) -> Experiment:
    try:
        return Experiment.objects.select_for_update().get(key=key)
    except Experiment.DoesNotExist:
        raise NotFound("experiment", key) from None


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
        experiment = _locked(key)
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

        errors = _Errors()
        if "name" in changes and not str(changes["name"]).strip():
            errors.add("name", "This field may not be blank.")
        kind = changes.get("kind", experiment.kind)
        _validate_settings(
            {**changes, **({"namespace": namespace} if namespace not in (..., None) else {})},
            errors,
        )
        current_variants = [
            VariantInput(
                key=v.key,
                upstream_url=v.upstream_url,
                weight=v.weight,
                is_control=v.is_control,
                is_shadow=v.is_shadow,
                name=v.name,
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
        _audit(
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
        experiment = _locked(key)
        if experiment.status != S.DRAFT:
            raise InvalidTransition(experiment.status, "deleted", "delete")
        _audit(experiment=None, actor=actor, action="delete", before={"key": key})
        experiment.delete()
        config_version_bump()


def experiment_state(experiment: Experiment) -> dict[str, Any]:
    """The parts of an experiment an audit entry records before and after a change."""
    return {
        "status": experiment.status,
        "ramp_position": experiment.ramp_position,
        "coverage": experiment.coverage,
        "weights": {v.key: v.weight for v in experiment.variants.all()},
        "winner": experiment.winner.key if experiment.winner_id else None,
    }


# --- experiments: lifecycle -----------------------------------------------------------


def _announce(experiment: Experiment, entry: AuditEntry, *, before_status: str) -> None:
    experiment_transitioned.send(
        sender=Experiment,
        experiment_id=experiment.pk,
        key=experiment.key,
        name=experiment.name,
        action=entry.action,
        actor=entry.actor,
        reason=entry.reason,
        before=before_status,
        after=experiment.status,
        audit_id=entry.pk,
    )


def _transition(
    *,
    actor: str,
    key: str,
    target: str,
    action: str,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
    allowed_from: Iterable[str] | None = None,
    apply: Callable[[Experiment], None] | None = None,
    on_commit: Callable[[Experiment], None] | None = None,
) -> TransitionResult:
    """Lock, check, change, audit and bump in one transaction; a no-op if already there."""
    with transaction.atomic():
        experiment = _locked(key)
        current = experiment.status
        if current == target:
            return TransitionResult(experiment=experiment, changed=False)
        sources = set(allowed_from) if allowed_from is not None else None
        if target not in ALLOWED_TRANSITIONS[current] or (
            sources is not None and current not in sources
        ):
            raise InvalidTransition(current, target, action)
        before = experiment_state(experiment)
        now = timezone.now()
        if apply is not None:
            apply(experiment)
        experiment.status = target
        if target == S.RUNNING and experiment.started_at is None:
            experiment.started_at = now
        if target in (S.COMPLETED, S.ROLLED_BACK):
            experiment.ended_at = now
            experiment.end_reason = reason
        # Compare-and-set on the status as well as the row lock: on SQLite the IMMEDIATE
        # transaction already serialises writers, on PostgreSQL FOR UPDATE does; this makes
        # a lost race impossible to miss even if a caller forgot the lock.
        fields = {
            f.attname: getattr(experiment, f.attname)
            for f in Experiment._meta.concrete_fields
            if f.attname not in ("id", "created_at")
        }
        fields["updated_at"] = now
        updated = Experiment.objects.filter(pk=experiment.pk, status=current).update(**fields)
        if updated != 1:
            raise InvalidTransition(current, target, action)
        experiment.refresh_from_db()
        entry = _audit(
            experiment=experiment,
            actor=actor,
            action=action,
            before=before,
            after={
                **experiment_state(experiment),
                **({"evidence": dict(evidence)} if evidence else {}),
            },
            reason=reason,
        )
        config_version_bump()
        _announce(experiment, entry, before_status=current)
        if on_commit is not None:
            transaction.on_commit(lambda: on_commit(experiment))
    return TransitionResult(experiment=experiment, changed=True)


def experiment_start(*, actor: str, key: str) -> TransitionResult:
    def apply(experiment: Experiment) -> None:
        if not experiment.seed:
            experiment.seed = experiment.key
        if experiment.kind == ExperimentKind.CANARY:
            experiment.ramp_position = 0
            experiment.step_started_at = timezone.now()

    return _transition(
        actor=actor, key=key, target=S.RUNNING, action="start", allowed_from=[S.DRAFT], apply=apply
    )


def experiment_pause(*, actor: str, key: str, reason: str = "") -> TransitionResult:
    return _transition(actor=actor, key=key, target=S.PAUSED, action="pause", reason=reason)


def experiment_resume(*, actor: str, key: str) -> TransitionResult:
    def apply(experiment: Experiment) -> None:
        # A paused step starts its minimum duration again: the pause is not evidence.
        if experiment.kind == ExperimentKind.CANARY:
            experiment.step_started_at = timezone.now()

    return _transition(
        actor=actor,
        key=key,
        target=S.RUNNING,
        action="resume",
        allowed_from=[S.PAUSED],
        apply=apply,
    )


def experiment_complete(
    *, actor: str, key: str, winner_key: str, reason: str = ""
) -> TransitionResult:
    def apply(experiment: Experiment) -> None:
        try:
            experiment.winner = experiment.variants.get(key=winner_key, is_shadow=False)
        except Variant.DoesNotExist:
            raise InvalidInput({"winner": [f"Unknown variant {winner_key!r}."]}) from None

    return _transition(
        actor=actor,
        key=key,
        target=S.COMPLETED,
        action="complete",
        reason=reason or f"completed with winner {winner_key}",
        apply=apply,
    )


def experiment_rollback(
    *,
    actor: str,
    key: str,
    reason: str,
    evidence: Mapping[str, Any] | None = None,
    on_commit: Callable[[Experiment], None] | None = None,
) -> TransitionResult:
    """Send all traffic back to control; exactly once however many callers race for it."""
    if not reason.strip():
        raise InvalidInput({"reason": ["A rollback needs a reason."]})
    return _transition(
        actor=actor,
        key=key,
        target=S.ROLLED_BACK,
        action="rollback",
        reason=reason,
        evidence=evidence,
        on_commit=on_commit,
    )


def experiment_advance_ramp(
    *,
    actor: str,
    key: str,
    from_position: int | None = None,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
) -> TransitionResult:
    """Move a running canary to its next ramp step; at the last step, complete it.

    `from_position` makes the call idempotent for racing workers: only the caller that saw
    the current step moves it, a second caller with the same `from_position` is a no-op.
    """
    with transaction.atomic():
        experiment = _locked(key)
        if experiment.kind != ExperimentKind.CANARY:
            raise InvalidTransition(experiment.status, "next ramp step", "advance")
        if experiment.status != S.RUNNING:
            raise InvalidTransition(experiment.status, "next ramp step", "advance")
        position = experiment.ramp_position or 0
        if from_position is not None and from_position != position:
            return TransitionResult(experiment=experiment, changed=False)
        steps = list(experiment.ramp_steps.all())
        if position + 1 >= len(steps):
            canary = experiment.variants.filter(is_control=False, is_shadow=False).first()
            winner = canary.key if canary else experiment.variants.get(is_control=True).key
        else:
            before = experiment_state(experiment)
            experiment.ramp_position = position + 1
            experiment.step_started_at = timezone.now()
            experiment.save(update_fields=["ramp_position", "step_started_at", "updated_at"])
            entry = _audit(
                experiment=experiment,
                actor=actor,
                action="advance",
                before=before,
                after={
                    **experiment_state(experiment),
                    "canary_share": steps[position + 1].canary_share,
                    **({"evidence": dict(evidence)} if evidence else {}),
                },
                reason=reason,
            )
            config_version_bump()
            _announce(experiment, entry, before_status=experiment.status)
            return TransitionResult(experiment=experiment, changed=True)
    return experiment_complete(
        actor=actor,
        key=key,
        winner_key=winner,
        reason=reason or "canary passed every ramp step",
    )


# --- metrics --------------------------------------------------------------------------


def validate_metric(values: Mapping[str, Any], errors: _Errors) -> None:
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
        errors.add("source", f"Name an event, or {BUILTIN_LATENCY} or {BUILTIN_ERROR}.")
    if kind == MetricKind.QUANTILE:
        q = values.get("quantile")
        if q is None or not (0.0 < float(q) < 1.0):
            errors.add("quantile", "A quantile metric needs a level in (0, 1), e.g. 0.95.")
        if source != BUILTIN_LATENCY:
            errors.add("source", f"Quantile metrics are computed from {BUILTIN_LATENCY}.")
    elif values.get("quantile") is not None:
        errors.add("quantile", "Only quantile metrics have a quantile level.")
    if source == BUILTIN_ERROR and kind != MetricKind.BINOMIAL:
        errors.add("source", f"{BUILTIN_ERROR} is a binomial metric.")
    if source == BUILTIN_LATENCY and kind not in (MetricKind.MEAN, MetricKind.QUANTILE):
        errors.add("source", f"{BUILTIN_LATENCY} is a mean or quantile metric.")
    cap = values.get("winsorize_cap")
    if cap is not None and not float(cap) > 0:
        errors.add("winsorize_cap", "Must be positive.")


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
)


def metric_create(*, actor: str, key: str, **values: Any) -> Metric:
    errors = _Errors()
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
        _audit(experiment=None, actor=actor, action="metric.create", after={"key": key})
    return metric


def metric_update(*, actor: str, key: str, **values: Any) -> Metric:
    with transaction.atomic():
        try:
            metric = Metric.objects.select_for_update().get(key=key)
        except Metric.DoesNotExist:
            raise NotFound("metric", key) from None
        errors = _Errors()
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
        }
        live = metric.uses.exclude(experiment__status=S.DRAFT).exists()
        if semantic and live:
            errors.add(sorted(semantic)[0], "Used by a started experiment: create a new metric.")
        errors.raise_if_any()
        for name, value in values.items():
            setattr(metric, name, value)
        metric.save()
        _audit(
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
                raise InvalidInput({"key": ["The metric is used by an experiment."]})
            raise NotFound("metric", key)
        _audit(experiment=None, actor=actor, action="metric.delete", before={"key": key})


# --- API keys -------------------------------------------------------------------------

API_KEY_PREFIX = "rk"


def hash_api_secret(secret: str) -> str:
    # The secret is 32 random bytes, so a fast hash is safe (no dictionary to guess from),
    # and the edge must verify keys in microseconds without a database round trip.
    return hashlib.sha256(secret.encode()).hexdigest()


def split_api_key(raw: str) -> tuple[str, str] | None:
    """Return (prefix, full key) for a well-formed key `rk_<prefix>_<secret>`, else None."""
    parts = raw.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], raw


def api_key_matches(raw: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_api_secret(raw), key_hash)


def api_key_create(*, actor: str, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
    """Create a key; the secret is returned once and only its hash is stored."""
    errors = _Errors()
    if not name.strip():
        errors.add("name", "This field may not be blank.")
    bad = sorted(set(scopes) - set(ApiScope.values))
    if bad:
        errors.add("scopes", f"Unknown scope: {', '.join(bad)}.")
    if not scopes:
        errors.add("scopes", f"Give at least one of {', '.join(ApiScope.values)}.")
    errors.raise_if_any()
    prefix = secrets.token_hex(4)
    raw = f"{API_KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    with transaction.atomic():
        key = ApiKey.objects.create(
            name=name,
            prefix=prefix,
            key_hash=hash_api_secret(raw),
            scopes=sorted(set(scopes)),
        )
        _audit(
            experiment=None,
            actor=actor,
            action="apikey.create",
            after={"prefix": prefix, "scopes": key.scopes},
        )
        config_version_bump()
    return key, raw


def api_key_revoke(*, actor: str, prefix: str) -> ApiKey:
    with transaction.atomic():
        try:
            key = ApiKey.objects.select_for_update().get(prefix=prefix)
        except ApiKey.DoesNotExist:
            raise NotFound("api key", prefix) from None
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
            _audit(experiment=None, actor=actor, action="apikey.revoke", after={"prefix": prefix})
            config_version_bump()
    return key


def api_key_touch(*, key_id: int, min_interval_s: float = 60.0) -> None:
    """Record a key's last use, at most once a minute so reads do not become writes."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=min_interval_s)
    ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff), pk=key_id
    ).update(last_used_at=now)
