"""Serializers: parse request bodies into service inputs and render models as JSON."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from experiments import services
from experiments.models import (
    DEFAULT_WINDOW_S,
    MAX_WINDOW_S,
    ApiKey,
    ApiScope,
    AuditEntry,
    Experiment,
    ExperimentKind,
    HealthResponse,
    Metric,
    MetricDirection,
    MetricKind,
    MetricRole,
    PredictionKind,
    UnitSource,
)
from experiments.strict import (
    INT4_MAX,
    StrictCharField,
    StrictFloatField,
    StrictModelSerializer,
    StrictSerializer,
    UnitIdDictField,
    slug_field,
)

MAX_VARIANTS = 20
MAX_METRICS = 50
MAX_RAMP_STEPS = 50


class VariantSerializer(StrictSerializer):
    key = slug_field()
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    upstream_url = serializers.CharField(max_length=500)
    weight = serializers.FloatField(min_value=0.0, max_value=1.0)
    is_control = serializers.BooleanField(required=False, default=False)
    is_shadow = serializers.BooleanField(required=False, default=False)
    price_input_per_m = serializers.FloatField(
        required=False, allow_null=True, default=None, min_value=0.0
    )
    price_output_per_m = serializers.FloatField(
        required=False, allow_null=True, default=None, min_value=0.0
    )

    def to_service(self, data: dict[str, Any]) -> services.VariantInput:
        return services.VariantInput(**data)


class MetricUseSerializer(StrictSerializer):
    metric = slug_field()
    role = serializers.ChoiceField(choices=MetricRole.choices)
    margin = serializers.FloatField(required=False, default=0.0, min_value=0.0)


class RampStepSerializer(StrictSerializer):
    canary_share = serializers.FloatField(min_value=0.0, max_value=1.0)
    min_duration_s = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=INT4_MAX
    )
    min_exposures_per_arm = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=INT4_MAX
    )


class NamespaceSerializer(StrictSerializer):
    id = serializers.CharField(max_length=64)
    start = serializers.FloatField(min_value=0.0, max_value=1.0)
    end = serializers.FloatField(min_value=0.0, max_value=1.0)


def _variants(items: list[dict[str, Any]]) -> list[services.VariantInput]:
    return [services.VariantInput(**item) for item in items]


def _metric_uses(items: list[dict[str, Any]]) -> list[services.MetricUseInput]:
    return [
        services.MetricUseInput(metric_key=i["metric"], role=i["role"], margin=i["margin"])
        for i in items
    ]


def _ramp(items: list[dict[str, Any]]) -> list[services.RampStepInput]:
    return [services.RampStepInput(**item) for item in items]


@extend_schema_field(
    {
        "type": "object",
        "description": "Input drift: watched request fields, sampling, reference, action "
        "({} turns it off).",
        "additionalProperties": True,
    }
)
class InputDriftField(serializers.JSONField):
    """A JSON object (the service validates it whole and names the wrong place)."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise serializers.ValidationError("An object with 'fields' (or {} to turn it off).")
        return super().to_internal_value(data)


class ExperimentWriteSerializer(StrictSerializer):
    """Fields a client may send; the rules themselves live in the services."""

    key = slug_field()
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True)
    hypothesis = serializers.CharField(required=False, allow_blank=True)
    kind = serializers.ChoiceField(choices=ExperimentKind.choices)
    seed = serializers.CharField(max_length=128, required=False, allow_blank=True)
    hash_version = serializers.IntegerField(required=False, min_value=1, max_value=2)
    unit_source = serializers.ChoiceField(choices=UnitSource.choices, required=False)
    unit_attribute = serializers.CharField(max_length=128, required=False)
    coverage = serializers.FloatField(required=False, min_value=0.0, max_value=1.0)
    namespace = NamespaceSerializer(required=False, allow_null=True)
    overrides = UnitIdDictField(child=StrictCharField(max_length=64), required=False)
    alpha = serializers.FloatField(required=False, min_value=0.0, max_value=0.5)
    decision_sample_size = serializers.IntegerField(
        required=False, min_value=100, max_value=INT4_MAX
    )
    on_health_failure = serializers.ChoiceField(choices=HealthResponse.choices, required=False)
    fallback_to_control = serializers.BooleanField(required=False)
    shadow_compare_field = serializers.CharField(max_length=128, required=False, allow_blank=True)
    cache_ttl_s = serializers.IntegerField(required=False, min_value=0, max_value=INT4_MAX)
    cache_max_entries = serializers.IntegerField(required=False, min_value=1, max_value=INT4_MAX)
    slack_webhook_url = serializers.CharField(
        max_length=500, required=False, allow_blank=True, write_only=True
    )
    quality_enabled = serializers.BooleanField(required=False)
    quality_prediction_path = serializers.CharField(
        max_length=200, required=False, allow_blank=True
    )
    quality_prediction_kind = serializers.ChoiceField(
        choices=PredictionKind.choices, required=False
    )
    quality_request_id_header = serializers.CharField(
        max_length=128, required=False, allow_blank=True
    )
    quality_sample_rate = serializers.FloatField(required=False, min_value=0.0, max_value=1.0)
    prediction_drift_enabled = serializers.BooleanField(required=False)
    prediction_drift_tolerance = serializers.FloatField(
        required=False, min_value=0.0, max_value=0.5
    )
    prediction_drift_action = serializers.ChoiceField(
        choices=HealthResponse.choices, required=False
    )
    # Validated whole by the service (experiments.services.input_drift), errors by place.
    input_drift = InputDriftField(required=False)
    # Positions are smallint columns; these limits are far below them and above any real use.
    variants = VariantSerializer(many=True, max_length=MAX_VARIANTS)
    metrics = MetricUseSerializer(many=True, required=False, max_length=MAX_METRICS)
    ramp_steps = RampStepSerializer(many=True, required=False, max_length=MAX_RAMP_STEPS)
    weights = serializers.DictField(
        child=StrictFloatField(min_value=0.0, max_value=1.0), required=False
    )

    def service_kwargs(self) -> dict[str, Any]:
        data = dict(self.validated_data)
        if "variants" in data:
            data["variants"] = _variants(data["variants"])
        if "metrics" in data:
            data["metrics"] = _metric_uses(data["metrics"])
        if "ramp_steps" in data:
            data["ramp_steps"] = _ramp(data["ramp_steps"])
        if "namespace" in data:
            ns = data["namespace"]
            data["namespace"] = None if ns is None else (ns["id"], ns["start"], ns["end"])
        return data


class ExperimentSerializer(serializers.ModelSerializer):
    """How an experiment is rendered; webhook URLs are secrets and never leave the server."""

    variants = serializers.SerializerMethodField()
    metrics = serializers.SerializerMethodField()
    ramp_steps = serializers.SerializerMethodField()
    namespace = serializers.SerializerMethodField()
    winner = serializers.SerializerMethodField()
    current_step = serializers.SerializerMethodField()
    has_slack_webhook = serializers.SerializerMethodField()

    class Meta:
        model = Experiment
        fields = [
            "key",
            "name",
            "description",
            "hypothesis",
            "kind",
            "status",
            "seed",
            "hash_version",
            "unit_source",
            "unit_attribute",
            "coverage",
            "namespace",
            "overrides",
            "alpha",
            "decision_sample_size",
            "on_health_failure",
            "fallback_to_control",
            "shadow_compare_field",
            "cache_ttl_s",
            "cache_max_entries",
            "quality_enabled",
            "quality_prediction_path",
            "quality_prediction_kind",
            "quality_request_id_header",
            "quality_sample_rate",
            "prediction_drift_enabled",
            "prediction_drift_tolerance",
            "prediction_drift_action",
            "input_drift",
            "has_slack_webhook",
            "variants",
            "metrics",
            "ramp_steps",
            "ramp_position",
            "current_step",
            "step_started_at",
            "winner",
            "end_reason",
            "created_at",
            "updated_at",
            "started_at",
            "ended_at",
        ]

    def get_variants(self, obj: Experiment) -> list[dict[str, Any]]:
        return [
            {
                "key": v.key,
                "name": v.name,
                "is_control": v.is_control,
                "is_shadow": v.is_shadow,
                "upstream_url": v.upstream_url,
                "weight": v.weight,
                "price_input_per_m": v.price_input_per_m,
                "price_output_per_m": v.price_output_per_m,
            }
            for v in obj.variants.all()
        ]

    def get_metrics(self, obj: Experiment) -> list[dict[str, Any]]:
        return [
            {"metric": m.metric.key, "role": m.role, "margin": m.margin} for m in obj.metrics.all()
        ]

    def get_ramp_steps(self, obj: Experiment) -> list[dict[str, Any]]:
        return [
            {
                "canary_share": s.canary_share,
                "min_duration_s": s.min_duration_s,
                "min_exposures_per_arm": s.min_exposures_per_arm,
            }
            for s in obj.ramp_steps.all()
        ]

    def get_namespace(self, obj: Experiment) -> dict[str, Any] | None:
        if not obj.namespace_id:
            return None
        return {"id": obj.namespace_id, "start": obj.namespace_start, "end": obj.namespace_end}

    def get_winner(self, obj: Experiment) -> str | None:
        return obj.winner.key if obj.winner_id else None

    def get_current_step(self, obj: Experiment) -> dict[str, Any] | None:
        if obj.ramp_position is None:
            return None
        steps = self.get_ramp_steps(obj)
        return {"position": obj.ramp_position, **steps[obj.ramp_position]} if steps else None

    def get_has_slack_webhook(self, obj: Experiment) -> bool:
        return bool(obj.slack_webhook_url)


class CompleteSerializer(StrictSerializer):
    winner = slug_field()
    reason = serializers.CharField(required=False, allow_blank=True, default="")


class RollbackSerializer(StrictSerializer):
    reason = serializers.CharField()


class ReasonSerializer(StrictSerializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="")


class TransitionSerializer(serializers.Serializer):
    changed = serializers.BooleanField()
    experiment = ExperimentSerializer()


class ShadowCanarySerializer(serializers.Serializer):
    """The shadow's canary (a draft): ``created`` is false when it existed already."""

    created = serializers.BooleanField()
    experiment = ExperimentSerializer()


class MetricSerializer(StrictModelSerializer):
    key = slug_field()
    kind = serializers.ChoiceField(choices=MetricKind.choices)
    direction = serializers.ChoiceField(choices=MetricDirection.choices)
    window_s = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_WINDOW_S,
        help_text="Exposure window in seconds: a unit's events count only this long after its "
        f"first exposure, and the unit waits until the window closes (default {DEFAULT_WINDOW_S}).",
    )

    class Meta:
        model = Metric
        fields = [
            "key",
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
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]


class ApiKeySerializer(serializers.ModelSerializer):
    revoked = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = ["name", "prefix", "scopes", "created_at", "revoked", "revoked_at", "last_used_at"]

    def get_revoked(self, obj: ApiKey) -> bool:
        return obj.revoked_at is not None


class ApiKeyCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=ApiScope.choices))


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(help_text="The secret; shown once, store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = ["id", "actor", "actor_role", "action", "before", "after", "reason", "created_at"]


class ApiKeyRevokeSerializer(StrictSerializer):
    confirm = serializers.BooleanField(
        default=False,
        help_text="Revoke even the key making the request or the last active manage key.",
    )
