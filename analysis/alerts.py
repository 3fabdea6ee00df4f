"""Alerts: Slack Block Kit messages and HMAC-signed webhooks, delivered through an outbox.

Flow
    1. The service that changes state (rollback, ramp step, hold) calls `alert_enqueue` in
       the same transaction: one `AlertOutbox` row per destination ("slack" and
       "webhook:<id>"), with a unique `dedupe_key`, so a retried or raced decision cannot
       queue the same alert twice. After the commit a Celery task is asked to deliver.
    2. Delivery, retries, signing and the Slack rendering: `analysis.alert_delivery`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from analysis.alert_delivery import SLACK, WEBHOOK_PREFIX
from analysis.followup_tasks import alerts_deliver
from analysis.models import AlertOutbox, WebhookEndpoint
from experiments import selectors as experiment_selectors

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- enqueue


def destinations(*, experiment_id: int | None) -> list[str]:
    """Where an alert about this experiment goes: Slack if a webhook is set, and every
    enabled generic webhook."""
    found: list[str] = []
    experiment_url = (
        experiment_selectors.experiment_slack_webhook(experiment_id=experiment_id)
        if experiment_id is not None
        else ""
    )
    if experiment_url or settings.SLACK_WEBHOOK_URL:
        found.append(SLACK)
    found.extend(
        f"{WEBHOOK_PREFIX}{pk}"
        for pk in WebhookEndpoint.objects.filter(enabled=True).values_list("pk", flat=True)
    )
    return found


def alert_enqueue(
    *, experiment_id: int | None, kind: str, payload: Mapping[str, Any], dedupe: str
) -> int:
    """Queue one alert for every destination, in the caller's transaction; returns the count.

    `dedupe` identifies the event (e.g. "rollback:12"); re-queuing it is a no-op.
    """
    now = timezone.now()
    rows = [
        AlertOutbox(
            experiment_id=experiment_id,
            kind=kind,
            destination=destination,
            payload=dict(payload),
            next_attempt_at=now,
            dedupe_key=f"{dedupe}:{destination}"[:200],
        )
        for destination in destinations(experiment_id=experiment_id)
    ]
    if not rows:
        return 0
    AlertOutbox.objects.bulk_create(rows, ignore_conflicts=True)
    transaction.on_commit(schedule_delivery)
    return len(rows)


def schedule_delivery() -> None:
    """Ask a worker to deliver now; if the broker is unreachable, beat's sweep will."""
    try:
        alerts_deliver.delay()
    except Exception as exc:  # the broker being down must not fail the committed change
        logger.warning("could not enqueue alert delivery (%s); beat will sweep", type(exc).__name__)


# --------------------------------------------------------------------------- payloads


def experiment_url(key: str) -> str:
    return f"{settings.RAMPART_BASE_URL.rstrip('/')}/experiments/{key}/"


def alert_payload(
    *,
    kind: str,
    experiment_key: str,
    experiment_name: str,
    action: str,
    reason: str,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body every destination receives (Slack gets it rendered as Block Kit)."""
    return {
        "type": kind,
        "experiment": {
            "key": experiment_key,
            "name": experiment_name,
            "url": experiment_url(experiment_key),
        },
        "action": action,
        "reason": reason,
        "details": dict(details or {}),
        "occurred_at": timezone.now().isoformat(),
    }


# --------------------------------------------------------------------------- manual changes

# The analysis worker alerts on its own actions with their statistical evidence; changes
# made by people (UI, API, CLI) reach on-call through this receiver of
# `experiments.signals.experiment_transitioned`, in the same transaction as the change.
ANALYSIS_ACTOR = "rampart:analysis"
# Starting is done by the person watching the launch; what on-call must hear about is
# traffic changing under them.
MANUAL_ALERT_ACTIONS = frozenset({"pause", "resume", "advance", "complete", "rollback"})


def alert_on_manual_transition(
    *,
    experiment_id: int,
    key: str,
    name: str,
    action: str,
    actor: str,
    reason: str,
    before: str,
    after: str,
    audit_id: int,
    **_: Any,
) -> None:
    if actor == ANALYSIS_ACTOR or action not in MANUAL_ALERT_ACTIONS:
        return
    payload = alert_payload(
        kind="manual",
        experiment_key=key,
        experiment_name=name,
        action=f"{action} by {actor} ({before} → {after})",
        reason=reason or f"{actor} chose to {action} the experiment.",
        details={"actor": actor, "before": before, "after": after},
    )
    alert_enqueue(
        experiment_id=experiment_id, kind="manual", payload=payload, dedupe=f"audit:{audit_id}"
    )
