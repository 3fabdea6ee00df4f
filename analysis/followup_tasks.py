"""Celery tasks that services queue after a commit: fold an event backlog, deliver alerts.

They live apart from ``analysis.tasks`` so that ``analysis.services`` and ``analysis.alerts``,
which queue them, do not import the module whose tasks call those services (no cycle).
"""

from __future__ import annotations

from celery import shared_task

from analysis import alert_delivery, folding


@shared_task(name="analysis.fold_events", acks_late=True, ignore_result=True)
def events_fold(*, experiment_id: int) -> int:
    """Fold one chunk of an experiment's event backlog into the rollup.

    Each analysis run that finds a large backlog queues one chunk, so the fold advances one
    chunk per interval and never multiplies into parallel chains.
    """
    return folding.events_fold(experiment_id=experiment_id)


@shared_task(name="analysis.deliver_alerts", acks_late=True, ignore_result=True)
def alerts_deliver() -> dict[str, int]:
    """Deliver due alerts from the outbox (also swept by beat)."""
    report = alert_delivery.deliver_due()
    return {"delivered": report.delivered, "failed": report.failed, "dead": report.dead}
