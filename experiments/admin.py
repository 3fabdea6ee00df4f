"""Django admin registrations for every experiments model, and roles on the user admin.

Access follows the role groups' Django permissions (`experiments.roles`); only admins are
staff. The audit log and API keys are read-only here: keys are created and revoked on the
Settings page, the API or `manage.py createapikey`, where secrets are shown once, changes
are audited and the edges learn of them.
"""

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from experiments import roles, services
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


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable by roles with the view permission; changed only through the services."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    # The audit log is append-only.
    list_display = ("created_at", "experiment", "actor", "actor_role", "action", "reason")
    list_filter = ("action", "actor_role")


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    list_display = ("name", "prefix", "scopes", "created_at", "revoked_at", "last_used_at")
    exclude = ("key_hash",)


@admin.register(ConfigVersion)
class ConfigVersionAdmin(admin.ModelAdmin):
    list_display = ("version", "changed_at")


def _assign(role: str) -> Any:
    def assign(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet) -> None:
        actor = request.user.get_username()
        changed = [
            change.username
            for user in queryset
            if (
                change := services.user_role_assign(
                    actor=actor, username=user.get_username(), role=role
                )
            ).changed
        ]
        modeladmin.message_user(
            request,
            f"{len(changed)} user(s) now {role}: {', '.join(changed) or 'no change'}.",
            messages.SUCCESS,
        )

    assign.__name__ = f"make_{role}"
    return admin.action(
        description=f"Give the {role} role ({roles.ROLE_SUMMARIES[role]})",
        permissions=["change"],
    )(assign)


class RampartUserAdmin(UserAdmin):
    """Django's user admin with each user's role and actions that assign one."""

    list_display = ("username", "email", "role", "is_active", "last_login")
    actions = [_assign(role) for role in roles.ROLES]

    @admin.display(description="role")
    def role(self, user: Any) -> str:
        return roles.role_of(user)


User = get_user_model()
if admin.site.is_registered(User):
    admin.site.unregister(User)
admin.site.register(User, RampartUserAdmin)
