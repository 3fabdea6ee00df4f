"""API-key authentication (`Authorization: Bearer <key>`); permissions are in `permissions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from experiments import services
from experiments.models import ApiKey
from experiments.roles import key_role


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

    @property
    def role(self) -> str:
        """The role the key acts with: admin for the manage scope, viewer for read."""
        return key_role(self.scopes)


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
