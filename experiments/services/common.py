"""What every service shares: field errors, the row lock, the audit entry, the config version."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from experiments.errors import InvalidInput, NotFound
from experiments.models import AuditEntry, ConfigVersion, Experiment
from experiments.roles import role_of_actor


@dataclass
class Errors:
    """Collects field errors so one response can name every wrong field at once."""

    items: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, message: str) -> None:
        self.items.setdefault(name, []).append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidInput(self.items)


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


def audit(
    *,
    experiment: Experiment | None,
    actor: str,
    action: str,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    reason: str = "",
) -> AuditEntry:
    actor = actor or "system"
    return AuditEntry.objects.create(
        experiment=experiment,
        actor=actor,
        # Resolved now: the role the actor holds when acting, not the one they hold later.
        actor_role=role_of_actor(actor),
        action=action,
        before=dict(before or {}),
        after=dict(after or {}),
        reason=reason,
    )


def locked(key: str) -> Experiment:
    try:
        return Experiment.objects.select_for_update().get(key=key)
    except Experiment.DoesNotExist:
        raise NotFound("experiment", key) from None


def experiment_state(experiment: Experiment) -> dict[str, Any]:
    """The parts of an experiment an audit entry records before and after a change."""
    return {
        "status": experiment.status,
        "ramp_position": experiment.ramp_position,
        "coverage": experiment.coverage,
        "weights": {v.key: v.weight for v in experiment.variants.all()},
        "winner": experiment.winner.key if experiment.winner_id else None,
    }
