"""Selectors: read-only queries that return models for interfaces or frozen views for apps."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Prefetch, QuerySet

from experiments.contracts import (
    ApiKeyView,
    ExperimentMetricView,
    ExperimentView,
    InputDriftView,
    InputFieldView,
    MetricView,
    QualityView,
    RampStepView,
    VariantView,
)
from experiments.errors import NotFound
from experiments.models import (
    ApiKey,
    AuditEntry,
    ConfigVersion,
    Experiment,
    ExperimentMetric,
    ExperimentStatus,
    Metric,
)


def experiment_list(*, status: str | None = None) -> QuerySet[Experiment]:
    queryset = Experiment.objects.prefetch_related(
        "variants",
        "ramp_steps",
        Prefetch("metrics", ExperimentMetric.objects.select_related("metric")),
    ).select_related("winner")
    if status:
        queryset = queryset.filter(status=status)
    return queryset


def experiment_get(*, key: str) -> Experiment:
    try:
        return experiment_list().get(key=key)
    except Experiment.DoesNotExist:
        raise NotFound("experiment", key) from None


def metric_list() -> QuerySet[Metric]:
    return Metric.objects.all()


def metric_get(*, key: str) -> Metric:
    try:
        return Metric.objects.get(key=key)
    except Metric.DoesNotExist:
        raise NotFound("metric", key) from None


def audit_for_experiment(*, key: str) -> QuerySet[AuditEntry]:
    experiment = experiment_get(key=key)
    return AuditEntry.objects.filter(experiment=experiment)


def api_key_list() -> QuerySet[ApiKey]:
    return ApiKey.objects.all()


def config_version_current() -> int:
    row = ConfigVersion.objects.filter(pk=1).values_list("version", flat=True).first()
    return int(row or 0)


def metric_view(metric: Metric) -> MetricView:
    return MetricView(
        key=metric.key,
        name=metric.name,
        kind=metric.kind,
        source=metric.source,
        quantile=metric.quantile,
        numerator_event=metric.numerator_event,
        denominator_event=metric.denominator_event,
        direction=metric.direction,
        winsorize_cap=metric.winsorize_cap,
        window_s=metric.window_s,
        missing_label=metric.missing_label,
    )


def quality_view(experiment: Experiment) -> QualityView | None:
    """The experiment's model-quality tracking, or None when it is off."""
    if not experiment.quality_enabled:
        return None
    return QualityView(
        prediction_path=experiment.quality_prediction_path,
        prediction_kind=experiment.quality_prediction_kind,
        request_id_header=experiment.quality_request_id_header,
        sample_rate=experiment.quality_sample_rate,
        drift_tolerance=(
            experiment.prediction_drift_tolerance if experiment.prediction_drift_enabled else None
        ),
        drift_action=experiment.prediction_drift_action,
    )


def input_drift_view(experiment: Experiment) -> InputDriftView | None:
    """The experiment's input-drift check, or None when it is off."""
    setting = experiment.input_drift or {}
    if not setting.get("fields"):
        return None
    return InputDriftView(
        fields=tuple(
            InputFieldView(
                path=field["path"],
                kind=field["kind"],
                threshold=float(field["threshold"]),
                edges=None if field.get("edges") is None else tuple(field["edges"]),
            )
            for field in setting["fields"]
        ),
        sample_rate=float(setting.get("sample_rate", 0.1)),
        action=str(setting.get("action", "warn")),
        reference=setting.get("reference"),
    )


def experiment_view(experiment: Experiment) -> ExperimentView:
    """Map one experiment (with prefetched relations) to its frozen view."""
    namespace = None
    if experiment.namespace_id:
        namespace = (
            experiment.namespace_id,
            float(experiment.namespace_start or 0.0),
            float(experiment.namespace_end or 0.0),
        )
    return ExperimentView(
        id=experiment.pk,
        key=experiment.key,
        name=experiment.name,
        kind=experiment.kind,
        status=experiment.status,
        seed=experiment.seed,
        hash_version=experiment.hash_version,
        unit_source=experiment.unit_source,
        unit_attribute=experiment.unit_attribute,
        coverage=experiment.coverage,
        namespace=namespace,
        overrides=dict(experiment.overrides or {}),
        variants=tuple(
            VariantView(
                key=v.key,
                name=v.name,
                is_control=v.is_control,
                is_shadow=v.is_shadow,
                upstream_url=v.upstream_url,
                weight=v.weight,
                price_input_per_m=v.price_input_per_m,
                price_output_per_m=v.price_output_per_m,
            )
            for v in experiment.variants.all()
        ),
        metrics=tuple(
            ExperimentMetricView(metric=metric_view(m.metric), role=m.role, margin=m.margin)
            for m in experiment.metrics.all()
        ),
        ramp_steps=tuple(
            RampStepView(
                position=s.position,
                canary_share=s.canary_share,
                min_duration_s=s.min_duration_s,
                min_exposures_per_arm=s.min_exposures_per_arm,
            )
            for s in experiment.ramp_steps.all()
        ),
        ramp_position=experiment.ramp_position,
        step_started_at=experiment.step_started_at,
        started_at=experiment.started_at,
        ended_at=experiment.ended_at,
        winner_key=experiment.winner.key if experiment.winner_id else None,
        alpha=experiment.alpha,
        decision_sample_size=experiment.decision_sample_size,
        on_health_failure=experiment.on_health_failure,
        fallback_to_control=experiment.fallback_to_control,
        shadow_compare_field=experiment.shadow_compare_field,
        cache_ttl_s=experiment.cache_ttl_s,
        cache_max_entries=experiment.cache_max_entries,
        has_slack_webhook=bool(experiment.slack_webhook_url),
        quality=quality_view(experiment),
        input_drift=input_drift_view(experiment),
    )


def experiment_views(*, statuses: Iterable[str] | None = None) -> list[ExperimentView]:
    """Frozen views of experiments, by default every one that is not a draft."""
    wanted = (
        list(statuses)
        if statuses is not None
        else [s for s in ExperimentStatus.values if s != ExperimentStatus.DRAFT]
    )
    return [experiment_view(e) for e in experiment_list().filter(status__in=wanted)]


def experiment_view_get(*, key: str) -> ExperimentView:
    return experiment_view(experiment_get(key=key))


def experiment_view_by_id(*, experiment_id: int) -> ExperimentView | None:
    experiment = experiment_list().filter(pk=experiment_id).first()
    return None if experiment is None else experiment_view(experiment)


def experiment_slack_webhook(*, experiment_id: int) -> str:
    """The per-experiment Slack webhook; secret, so only alert delivery should read it."""
    return (
        Experiment.objects.filter(pk=experiment_id)
        .values_list("slack_webhook_url", flat=True)
        .first()
        or ""
    )


def api_key_views() -> list[ApiKeyView]:
    """Active keys for the edge's in-memory key check (hashes only, never secrets)."""
    return [
        ApiKeyView(prefix=k.prefix, key_hash=k.key_hash, scopes=frozenset(k.scopes))
        for k in ApiKey.objects.filter(revoked_at__isnull=True)
    ]
