"""Django admin registrations for every experiments model."""

from django.contrib import admin

from experiments.models import (
    ApiKey,
    AuditEntry,
    ConfigVersion,
    Experiment,
    ExperimentMetric,
    Metric,
    RampStep,
    Variant,
)


class VariantInline(admin.TabularInline):
    model = Variant
    extra = 0


class ExperimentMetricInline(admin.TabularInline):
    model = ExperimentMetric
    extra = 0


class RampStepInline(admin.TabularInline):
    model = RampStep
    extra = 0


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ("key", "name", "kind", "status", "ramp_position", "created_at")
    list_filter = ("status", "kind")
    search_fields = ("key", "name")
    inlines = [VariantInline, ExperimentMetricInline, RampStepInline]
    exclude = ("slack_webhook_url",)


@admin.register(Variant)
class VariantAdmin(admin.ModelAdmin):
    list_display = ("experiment", "key", "is_control", "is_shadow", "weight", "upstream_url")


@admin.register(Metric)
class MetricAdmin(admin.ModelAdmin):
    list_display = ("key", "name", "kind", "source", "direction")
    list_filter = ("kind", "direction")


@admin.register(ExperimentMetric)
class ExperimentMetricAdmin(admin.ModelAdmin):
    list_display = ("experiment", "metric", "role", "margin")


@admin.register(RampStep)
class RampStepAdmin(admin.ModelAdmin):
    list_display = (
        "experiment",
        "position",
        "canary_share",
        "min_duration_s",
        "min_exposures_per_arm",
    )


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("created_at", "experiment", "actor", "action", "reason")
    list_filter = ("action",)

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False  # the audit log is append-only


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "scopes", "created_at", "revoked_at", "last_used_at")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")


@admin.register(ConfigVersion)
class ConfigVersionAdmin(admin.ModelAdmin):
    list_display = ("version", "changed_at")
