"""API keys: create, revoke and check keys; only a hash of each secret is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from experiments.errors import NotFound
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


def api_key_revoke(*, actor: str, prefix: str) -> ApiKey:
    with transaction.atomic():
        try:
            key = ApiKey.objects.select_for_update().get(prefix=prefix)
        except ApiKey.DoesNotExist:
            raise NotFound("api key", prefix) from None
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
            audit(experiment=None, actor=actor, action="apikey.revoke", after={"prefix": prefix})
            config_version_bump()
    return key


def api_key_touch(*, key_id: int, min_interval_s: float = 60.0) -> None:
    """Record a key's last use, at most once a minute so reads do not become writes."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=min_interval_s)
    ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff), pk=key_id
    ).update(last_used_at=now)
