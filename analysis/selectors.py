"""Read-only queries of analysis results and alerts, for the API, the UI and the CLI."""

from __future__ import annotations

from django.db.models import QuerySet

from analysis.models import AlertOutbox, ResultSnapshot, WebhookEndpoint


def latest_result(*, experiment_id: int) -> ResultSnapshot | None:
    """The newest result snapshot of an experiment, or None before its first analysis."""
    return (
        ResultSnapshot.objects.filter(experiment_id=experiment_id)
        .order_by("-created_at", "-id")
        .first()
    )


def result_history(*, experiment_id: int, limit: int = 500) -> list[ResultSnapshot]:
    """The newest `limit` snapshots in chronological order (oldest first), for time series."""
    newest = ResultSnapshot.objects.filter(experiment_id=experiment_id).order_by(
        "-created_at", "-id"
    )[: max(limit, 0)]
    return list(reversed(list(newest)))


def alerts_for(*, experiment_id: int) -> QuerySet[AlertOutbox]:
    """Alerts about one experiment, newest first (payloads carry no URLs or secrets)."""
    return AlertOutbox.objects.filter(experiment_id=experiment_id).order_by("-id")


def webhook_list() -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.order_by("id")


def webhooks_enabled() -> list[WebhookEndpoint]:
    return list(WebhookEndpoint.objects.filter(enabled=True).order_by("id"))
