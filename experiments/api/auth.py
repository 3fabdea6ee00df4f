"""API-key authentication (`Authorization: Bearer <key>`) and scope checks for the API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from experiments import services
from experiments.models import ApiKey, ApiScope


@dataclass(frozen=True)
class ApiKeyPrincipal:
    """The caller behind an API key; DRF's `request.user` for key-authenticated requests."""

    key_id: int
    name: str
    prefix: str
    scopes: frozenset[str]

    is_authenticated = True
    is_staff = False

    @property
    def actor(self) -> str:
        return f"apikey:{self.prefix}:{self.name}"


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[ApiKeyPrincipal, ApiKey] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme != self.keyword:
            return None
        parsed = services.split_api_key(raw.strip())
        if parsed is None:
            raise exceptions.AuthenticationFailed("Malformed API key.")
        prefix, full = parsed
        key = ApiKey.objects.filter(prefix=prefix).first()
        if key is None or not services.api_key_matches(full, key.key_hash):
            raise exceptions.AuthenticationFailed("Unknown API key.")
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API key has been revoked.")
        services.api_key_touch(key_id=key.pk)
        principal = ApiKeyPrincipal(
            key_id=key.pk, name=key.name, prefix=key.prefix, scopes=frozenset(key.scopes)
        )
        return principal, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


def actor_of(request: Request) -> str:
    user: Any = request.user
    if isinstance(user, ApiKeyPrincipal):
        return user.actor
    return f"user:{user.get_username()}"


class HasScope(permissions.BasePermission):
    """Reads need the `read` scope and writes `manage`; a view may name another scope.

    People logged in through a session are staff users of the UI and may do everything.
    """

    message = "This API key lacks the scope this endpoint needs."

    def has_permission(self, request: Request, view: Any) -> bool:
        user: Any = request.user
        if user is None or not getattr(user, "is_authenticated", False):
            raise exceptions.NotAuthenticated()
        if not isinstance(user, ApiKeyPrincipal):
            return True
        required = getattr(view, "required_scope", None)
        if required is None:
            safe = request.method in permissions.SAFE_METHODS
            required = ApiScope.READ if safe else ApiScope.MANAGE
        if required == ApiScope.READ and ApiScope.MANAGE in user.scopes:
            return True
        return required in user.scopes
