"""API keys: create, revoke and check keys; only a hash of each secret is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from experiments.errors import LockoutRisk, NotFound
from experiments.models import ApiKey, ApiScope
from experiments.services.common import Errors, audit, config_version_bump

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
    errors = Errors()
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
        audit(
            experiment=None,
            actor=actor,
            action="apikey.create",
            after={"prefix": prefix, "scopes": key.scopes},
        )
        config_version_bump()
    return key, raw


@dataclass(frozen=True)
class ApiKeyRevocation:
    key: ApiKey
    # Why this revocation could lock someone out (empty when it cannot); see
    # `api_key_lockout_warnings`.
    warnings: tuple[str, ...]


def api_key_lockout_warnings(
    key: ApiKey, *, active: Sequence[ApiKey], requested_by: str = ""
) -> list[str]:
    """Why revoking `key` could lock its holders out, given the active keys.

    `requested_by` is the prefix of the key making the request ("" for a person).
    """
    if key.revoked_at is not None:
        return []
    warnings = []
    if requested_by and requested_by == key.prefix:
        warnings.append("This is the key making this request: the next request with it fails.")
    managers = [k for k in active if ApiScope.MANAGE in k.scopes]
    if ApiScope.MANAGE in key.scopes and [k.pk for k in managers] == [key.pk]:
        warnings.append(
            "This is the last active key with the manage scope: no key can manage Rampart "
            "afterwards until an admin creates one (settings page or manage.py createapikey)."
        )
    return warnings


def api_key_revoke(
    *, actor: str, prefix: str, requested_by: str = "", confirmed: bool = False
) -> ApiKeyRevocation:
    """Revoke a key; idempotent.

    Revoking the key that makes the request (`requested_by`, its prefix) or the last active
    manage key raises `LockoutRisk` unless `confirmed`; the check runs under the lock of
    every active key, so two manage keys cannot revoke each other at once unwarned.
    """
    with transaction.atomic():
        active = list(ApiKey.objects.select_for_update().filter(revoked_at__isnull=True))
        try:
            key = ApiKey.objects.select_for_update().get(prefix=prefix)
        except ApiKey.DoesNotExist:
            raise NotFound("api key", prefix) from None
        warnings = api_key_lockout_warnings(key, active=active, requested_by=requested_by)
        if warnings and not confirmed:
            raise LockoutRisk(prefix, warnings)
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
            audit(experiment=None, actor=actor, action="apikey.revoke", after={"prefix": prefix})
            config_version_bump()
    return ApiKeyRevocation(key=key, warnings=tuple(warnings))


def api_key_touch(*, key_id: int, min_interval_s: float = 60.0) -> None:
    """Record a key's last use, at most once a minute so reads do not become writes."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=min_interval_s)
    ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff), pk=key_id
    ).update(last_used_at=now)
