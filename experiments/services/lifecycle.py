"""The lifecycle state machine: audited transitions, and the canary ramp's advance."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from experiments.errors import InvalidInput, InvalidTransition
from experiments.models import AuditEntry, Experiment, ExperimentKind, ExperimentStatus, Variant
from experiments.services.common import audit, config_version_bump, experiment_state, locked
from experiments.signals import experiment_transitioned

S = ExperimentStatus
# The lifecycle state machine: current state -> states it may move to.
ALLOWED_TRANSITIONS: Mapping[str, frozenset[str]] = {
    S.DRAFT: frozenset({S.RUNNING}),
    S.RUNNING: frozenset({S.PAUSED, S.COMPLETED, S.ROLLED_BACK}),
    S.PAUSED: frozenset({S.RUNNING, S.COMPLETED, S.ROLLED_BACK}),
    S.COMPLETED: frozenset(),
    S.ROLLED_BACK: frozenset(),
}


@dataclass(frozen=True)
class TransitionResult:
    experiment: Experiment
    changed: bool


def _announce(experiment: Experiment, entry: AuditEntry, *, before_status: str) -> None:
    experiment_transitioned.send(
        sender=Experiment,
        experiment_id=experiment.pk,
        key=experiment.key,
        name=experiment.name,
        action=entry.action,
        actor=entry.actor,
        reason=entry.reason,
        before=before_status,
        after=experiment.status,
        audit_id=entry.pk,
    )


def _transition(
    *,
    actor: str,
    key: str,
    target: str,
    action: str,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
    allowed_from: Iterable[str] | None = None,
    apply: Callable[[Experiment], None] | None = None,
    on_commit: Callable[[Experiment], None] | None = None,
) -> TransitionResult:
    """Lock, check, change, audit and bump in one transaction; a no-op if already there."""
    with transaction.atomic():
        experiment = locked(key)
        current = experiment.status
        if current == target:
            return TransitionResult(experiment=experiment, changed=False)
        sources = set(allowed_from) if allowed_from is not None else None
        if target not in ALLOWED_TRANSITIONS[current] or (
            sources is not None and current not in sources
        ):
            raise InvalidTransition(current, target, action)
        before = experiment_state(experiment)
        now = timezone.now()
        if apply is not None:
            apply(experiment)
        experiment.status = target
        if target == S.RUNNING and experiment.started_at is None:
            experiment.started_at = now
        if target in (S.COMPLETED, S.ROLLED_BACK):
            experiment.ended_at = now
            experiment.end_reason = reason
        # Compare-and-set on the status as well as the row lock: on SQLite the IMMEDIATE
        # transaction already serialises writers, on PostgreSQL FOR UPDATE does; this makes
        # a lost race impossible to miss even if a caller forgot the lock.
        fields = {
            f.attname: getattr(experiment, f.attname)
            for f in Experiment._meta.concrete_fields
            if f.attname not in ("id", "created_at")
        }
        fields["updated_at"] = now
        updated = Experiment.objects.filter(pk=experiment.pk, status=current).update(**fields)
        if updated != 1:
            raise InvalidTransition(current, target, action)
        experiment.refresh_from_db()
        entry = audit(
            experiment=experiment,
            actor=actor,
            action=action,
            before=before,
            after={
                **experiment_state(experiment),
                **({"evidence": dict(evidence)} if evidence else {}),
            },
            reason=reason,
        )
        config_version_bump()
        _announce(experiment, entry, before_status=current)
        if on_commit is not None:
            transaction.on_commit(lambda: on_commit(experiment))
    return TransitionResult(experiment=experiment, changed=True)


def experiment_start(*, actor: str, key: str) -> TransitionResult:
    def apply(experiment: Experiment) -> None:
        if not experiment.seed:
            experiment.seed = experiment.key
        if experiment.kind == ExperimentKind.CANARY:
            experiment.ramp_position = 0
            experiment.step_started_at = timezone.now()

    return _transition(
        actor=actor, key=key, target=S.RUNNING, action="start", allowed_from=[S.DRAFT], apply=apply
    )


def experiment_pause(*, actor: str, key: str, reason: str = "") -> TransitionResult:
    return _transition(actor=actor, key=key, target=S.PAUSED, action="pause", reason=reason)


def experiment_resume(*, actor: str, key: str) -> TransitionResult:
    def apply(experiment: Experiment) -> None:
        # A paused step starts its minimum duration again: the pause is not evidence.
        if experiment.kind == ExperimentKind.CANARY:
            experiment.step_started_at = timezone.now()

    return _transition(
        actor=actor,
        key=key,
        target=S.RUNNING,
        action="resume",
        allowed_from=[S.PAUSED],
        apply=apply,
    )


def experiment_complete(
    *, actor: str, key: str, winner_key: str, reason: str = ""
) -> TransitionResult:
    def apply(experiment: Experiment) -> None:
        try:
            experiment.winner = experiment.variants.get(key=winner_key, is_shadow=False)
        except Variant.DoesNotExist:
            raise InvalidInput({"winner": [f"Unknown variant {winner_key!r}."]}) from None

    return _transition(
        actor=actor,
        key=key,
        target=S.COMPLETED,
        action="complete",
        reason=reason or f"completed with winner {winner_key}",
        apply=apply,
    )


def experiment_rollback(
    *,
    actor: str,
    key: str,
    reason: str,
    evidence: Mapping[str, Any] | None = None,
    on_commit: Callable[[Experiment], None] | None = None,
) -> TransitionResult:
    """Send all traffic back to control; exactly once however many callers race for it."""
    if not reason.strip():
        raise InvalidInput({"reason": ["A rollback needs a reason."]})
    return _transition(
        actor=actor,
        key=key,
        target=S.ROLLED_BACK,
        action="rollback",
        reason=reason,
        evidence=evidence,
        on_commit=on_commit,
    )


def experiment_advance_ramp(
    *,
    actor: str,
    key: str,
    from_position: int | None = None,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
) -> TransitionResult:
    """Move a running canary to its next ramp step; at the last step, complete it.

    `from_position` makes the call idempotent for racing workers: only the caller that saw
    the current step moves it, a second caller with the same `from_position` is a no-op.
    """
    with transaction.atomic():
        experiment = locked(key)
        if experiment.kind != ExperimentKind.CANARY:
            raise InvalidTransition(experiment.status, "next ramp step", "advance")
        if experiment.status != S.RUNNING:
            raise InvalidTransition(experiment.status, "next ramp step", "advance")
        position = experiment.ramp_position or 0
        if from_position is not None and from_position != position:
            return TransitionResult(experiment=experiment, changed=False)
        steps = list(experiment.ramp_steps.all())
        if position + 1 >= len(steps):
            canary = experiment.variants.filter(is_control=False, is_shadow=False).first()
            winner = canary.key if canary else experiment.variants.get(is_control=True).key
        else:
            before = experiment_state(experiment)
            experiment.ramp_position = position + 1
            experiment.step_started_at = timezone.now()
            experiment.save(update_fields=["ramp_position", "step_started_at", "updated_at"])
            entry = audit(
                experiment=experiment,
                actor=actor,
                action="advance",
                before=before,
                after={
                    **experiment_state(experiment),
                    "canary_share": steps[position + 1].canary_share,
                    **({"evidence": dict(evidence)} if evidence else {}),
                },
                reason=reason,
            )
            config_version_bump()
            _announce(experiment, entry, before_status=experiment.status)
            return TransitionResult(experiment=experiment, changed=True)
    return experiment_complete(
        actor=actor,
        key=key,
        winner_key=winner,
        reason=reason or "canary passed every ramp step",
    )
