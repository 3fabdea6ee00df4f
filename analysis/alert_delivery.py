"""Alert delivery from the outbox: Slack Block Kit messages and HMAC-signed webhooks.

Rows are queued by `analysis.alerts.alert_enqueue` (step 1 of the flow described there).

Flow
    2. `deliver_due` (Celery task `analysis.deliver_alerts`, also swept by beat) claims one
       due row at a time, sends it, and records the outcome in the same transaction as the
       claim: `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so parallel workers take
       different rows; on SQLite the IMMEDIATE transaction is the claim (one writer at a
       time). A row is therefore sent by one worker only and marked delivered when its
       send succeeded. If the worker dies after the receiver got the request but before the
       commit, the row is sent again: receivers deduplicate on the `X-Rampart-Delivery`
       header, which is the same for every attempt of one alert.
    3. A failed send is retried with exponential backoff and full jitter (AWS Architecture
       Blog, "Exponential Backoff And Jitter", 2015): the n-th retry waits a uniform random
       time in [0, min(ALERT_BACKOFF_MAX_S, ALERT_BACKOFF_BASE_S * 2**(n-1))]. After
       ALERT_MAX_ATTEMPTS attempts the row is marked dead. A receiver that is down gets the
       alert once it is back, as long as that happens within the retry budget.

Secrets
    Webhook URLs (Slack's are bearer secrets) and signing secrets are read at delivery time
    and never stored in the outbox, logged, or returned by the API. Errors are recorded by
    exception type and HTTP status only, and httpx's request log (which prints the URL at
    INFO level) is raised to WARNING.

Verifying a Rampart webhook (receivers)
    Each request carries `X-Rampart-Signature: t=<unix seconds>,v1=<hex>` where `<hex>` is
    HMAC-SHA256 with the endpoint's secret over the bytes `<t>.<raw body>`. Recompute it over
    the raw body, compare in constant time, and reject timestamps older than a few minutes
    (replays); `verify_signature` below is a reference implementation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from analysis import metrics
from analysis.models import AlertOutbox, AlertStatus, WebhookEndpoint
from experiments import selectors as experiment_selectors

logger = logging.getLogger(__name__)
# httpx logs every request with its full URL at INFO; webhook URLs are secrets.
logging.getLogger("httpx").setLevel(logging.WARNING)

SLACK = "slack"
WEBHOOK_PREFIX = "webhook:"
SIGNATURE_HEADER = "X-Rampart-Signature"
DELIVERY_HEADER = "X-Rampart-Delivery"
SEND_TIMEOUT_S = 5.0
SIGNATURE_TOLERANCE_S = 300


# --------------------------------------------------------------------------- Slack


def _percent(value: Any) -> str:
    return f"{float(value) * 100:+.1f}%" if isinstance(value, int | float) else "unbounded"


_TITLES = {
    "manual": ":bust_in_silhouette: Changed by hand",
    "rollback": ":rotating_light: Rolled back",
    "hold": ":warning: Ramp held",
    "health_warning": ":warning: Health warning",
    "advance": ":arrow_up: Canary advanced",
    "complete": ":white_check_mark: Canary completed",
    "test": ":wave: Test alert",
    "shadow_verdict": ":busts_in_silhouette: Shadow verdict",
    "prediction_drift": ":chart_with_upwards_trend: Prediction drift",
    "input_drift": ":chart_with_downwards_trend: Input drift",
}


def slack_message(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Render an alert as a Slack Block Kit message (with plain `text` as the fallback)."""
    experiment = payload.get("experiment", {})
    details = payload.get("details", {})
    title = f"{_TITLES.get(payload.get('type', ''), 'Rampart')}: {experiment.get('name', '')}"
    fields = [
        f"*Experiment*\n`{experiment.get('key', '')}`",
        f"*Action*\n{payload.get('action', '')}",
    ]
    if details.get("metric"):
        fields.append(f"*Metric*\n{details.get('metric_name') or details['metric']}")
    if details.get("arm"):
        fields.append(f"*Arm*\n`{details['arm']}` vs `{details.get('control_arm', '')}`")
    if "rel_effect" in details:
        interval = details.get("interval") or [None, None]
        level = details.get("interval_level")
        label = f"{float(level) * 100:.4g}% always-valid" if level else "always-valid"
        fields.append(
            f"*Effect*\n{_percent(details.get('rel_effect'))} ({label} interval "
            f"{_percent(interval[0])} to {_percent(interval[1])})"
        )
    if isinstance(details.get("p_value"), int | float):
        method = f" ({details['method']})" if details.get("method") else ""
        fields.append(f"*Always-valid p*\n{float(details['p_value']):.2g}{method}")
    if details.get("n"):
        counts = ", ".join(f"{arm}: {n:,}" for arm, n in details["n"].items())
        fields.append(f"*n per arm*\n{counts}")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150], "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": payload.get("reason", "")[:3000]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields[:10]]},
    ]
    if experiment.get("url"):
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open experiment"},
                        "url": experiment["url"],
                    }
                ],
            }
        )
    return {"text": f"{title}: {payload.get('reason', '')}", "blocks": blocks}


# --------------------------------------------------------------------------- signing


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Rampart-Signature` value: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">."""
    message = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Reference check for receivers: valid HMAC and a timestamp within the tolerance."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def delivery_id(row: AlertOutbox) -> str:
    """Stable across retries of one alert, so receivers can drop duplicates."""
    return hashlib.sha256(row.dedupe_key.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- delivery


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    dead: int = 0


def backoff_delay(attempts: int, *, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number `attempts` (1-based)."""
    base = float(settings.ALERT_BACKOFF_BASE_S)
    cap = float(settings.ALERT_BACKOFF_MAX_S)
    ceiling = min(cap, base * 2 ** max(attempts - 1, 0))
    return (rng or random).uniform(0.0, ceiling)


def _request(row: AlertOutbox) -> tuple[str, dict[str, str], bytes] | None:
    """URL, headers and body for one outbox row; None if the destination is gone."""
    headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id(row)}
    if row.destination == SLACK:
        url = (
            experiment_selectors.experiment_slack_webhook(experiment_id=row.experiment_id)
            if row.experiment_id is not None
            else ""
        ) or settings.SLACK_WEBHOOK_URL
        if not url:
            return None
        return url, headers, json.dumps(slack_message(row.payload)).encode()
    if row.destination.startswith(WEBHOOK_PREFIX):
        endpoint = WebhookEndpoint.objects.filter(
            pk=row.destination.removeprefix(WEBHOOK_PREFIX), enabled=True
        ).first()
        if endpoint is None:
            return None
        body = json.dumps({"delivery": delivery_id(row), **row.payload}).encode()
        headers[SIGNATURE_HEADER] = sign(endpoint.secret, body, int(time.time()))
        return endpoint.url, headers, body
    return None


def _destination_type(destination: str) -> str:
    return SLACK if destination == SLACK else "webhook"


def _claim(now: datetime) -> AlertOutbox | None:
    due = AlertOutbox.objects.filter(status=AlertStatus.PENDING, next_attempt_at__lte=now)
    if connection.vendor == "postgresql":
        due = due.select_for_update(skip_locked=True)
    return due.order_by("next_attempt_at", "id").first()


def _deliver_one(client: httpx.Client, now: datetime, report: DeliveryReport) -> bool:
    """Claim, send and settle one due alert in one transaction; False when none is due."""
    with transaction.atomic():
        row = _claim(now)
        if row is None:
            return False
        row.attempts += 1
        kind = _destination_type(row.destination)
        request = _request(row)
        error = ""
        if request is None:
            error = "destination is no longer configured"
        else:
            url, headers, body = request
            try:
                response = client.post(url, content=body, headers=headers)
                if response.status_code >= 300:
                    error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
        if not error:
            row.status = AlertStatus.DELIVERED
            row.delivered_at = timezone.now()
            row.last_error = ""
            report.delivered += 1
            metrics.ALERT_DELIVERIES.labels(kind, "success").inc()
        elif request is None or row.attempts >= settings.ALERT_MAX_ATTEMPTS:
            row.status = AlertStatus.DEAD
            row.last_error = error
            report.dead += 1
            metrics.ALERT_DELIVERIES.labels(kind, "dead").inc()
            logger.error("alert %s to %s gave up: %s", row.pk, kind, error)
        else:
            row.last_error = error
            row.next_attempt_at = timezone.now() + timedelta(seconds=backoff_delay(row.attempts))
            report.failed += 1
            metrics.ALERT_DELIVERIES.labels(kind, "failure").inc()
            logger.warning("alert %s to %s failed (%s); will retry", row.pk, kind, error)
        row.save(
            update_fields=["attempts", "status", "delivered_at", "last_error", "next_attempt_at"]
        )
    return True


def deliver_due(*, limit: int = 100, now: datetime | None = None) -> DeliveryReport:
    """Deliver up to `limit` due alerts, one claimed row per transaction."""
    report = DeliveryReport()
    moment = now or timezone.now()
    with httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False) as client:
        for _ in range(limit):
            if not _deliver_one(client, moment, report):
                break
    return report
