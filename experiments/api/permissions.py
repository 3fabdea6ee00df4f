"""Who may call what in the management API: roles for people, scopes for API keys.

`RolePermission` is the default permission class of every API view (settings
``REST_FRAMEWORK``):

- A person logged in through a session needs the Django permission the view names for the
  action (`permission_for`), which their role group grants (`experiments.roles`).
- An API key needs its scope: `read` for safe methods and `manage` for writes, or the
  view's `required_scope`; `manage` implies `read`. A key acts with the role its scopes
  imply (manage: admin, read: viewer), which is what the audit log records.

A view declares ``permission_model = "app_label.model"``; the action (a viewset's
``list``, ``retrieve``, ``create``, ``partial_update``, ``destroy``, or the HTTP method of
a plain APIView) maps to the model's view/add/change/delete permission, and
``action_permissions`` names the permission of any other action (``start``: run). A write
that no declaration covers is refused: a new endpoint is closed until it says who may use it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import exceptions, permissions
from rest_framework.request import Request

from experiments.api.auth import ApiKeyPrincipal
from experiments.models import ApiScope
from experiments.roles import READ, role_of

_ACTION_VERBS = {
    "list": "view",
    "retrieve": "view",
    "create": "add",
    "update": "change",
    "partial_update": "change",
    "destroy": "delete",
}
_METHOD_VERBS = {
    "GET": "view",
    "HEAD": "view",
    "OPTIONS": "view",
    "POST": "add",
    "PUT": "change",
    "PATCH": "change",
    "DELETE": "delete",
}


def permission_for(request: Request, view: Any) -> str | None:
    """The Django permission ("app.codename") a person needs for this request, or None."""
    action = getattr(view, "action", None)
    explicit: dict[str, str] = getattr(view, "action_permissions", {})
    key = action or request.method.lower()
    if key in explicit:
        return explicit[key]
    model: str | None = getattr(view, "permission_model", None)
    verb = _ACTION_VERBS.get(action) if action else _METHOD_VERBS.get(request.method)
    if model is None or verb is None:
        # Reads of an undeclared endpoint need the viewer role; writes are refused.
        return READ if request.method in permissions.SAFE_METHODS else None
    app_label, model_name = model.split(".", 1)
    return f"{app_label}.{verb}_{model_name}"


def key_has_scope(principal: ApiKeyPrincipal, request: Request, view: Any) -> bool:
    required = getattr(view, "required_scope", None)
    if required is None:
        safe = request.method in permissions.SAFE_METHODS
        required = ApiScope.READ if safe else ApiScope.MANAGE
    if required == ApiScope.READ and ApiScope.MANAGE in principal.scopes:
        return True
    return required in principal.scopes


class RolePermission(permissions.BasePermission):
    """Scopes for API keys, Django permissions (through roles) for session users."""

    message = "Your role does not allow this action."

    def has_permission(self, request: Request, view: Any) -> bool:
        user: Any = request.user
        if user is None or not getattr(user, "is_authenticated", False):
            raise exceptions.NotAuthenticated()
        if isinstance(user, ApiKeyPrincipal):
            if not key_has_scope(user, request, view):
                raise exceptions.PermissionDenied(
                    "This API key lacks the scope this endpoint needs."
                )
            return True
        needed = permission_for(request, view)
        if needed is not None and user.has_perm(needed):
            return True
        # This instance serves this request only (DRF builds one per request).
        self.message = f"Your role ({role_of(user)}) does not allow this action" + (
            f": it needs the permission {needed}." if needed else "."
        )
        return False


class ApiDocsAccess(permissions.BasePermission):
    """The OpenAPI schema and Swagger UI: public unless API_DOCS_PUBLIC is false; then a
    logged-in user with the viewer role or a key with the read scope (or manage)."""

    message = "The API documentation needs a logged-in user or an API key with the read scope."

    def has_permission(self, request: Request, view: Any) -> bool:
        if settings.API_DOCS_PUBLIC:
            return True
        user: Any = request.user
        if user is None or not getattr(user, "is_authenticated", False):
            raise exceptions.NotAuthenticated(self.message)
        if isinstance(user, ApiKeyPrincipal):
            return bool({ApiScope.READ, ApiScope.MANAGE} & user.scopes)
        return bool(user.has_perm(READ))
