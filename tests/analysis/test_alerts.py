"""Alerts: Block Kit rendering, HMAC signatures, outbox delivery with retries, no leaks."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from analysis import alert_delivery, alerts, services
from analysis.models import AlertOutbox
from experiments import services as experiment_services
from tests.analysis.conftest import start_experiment
from tests.slack_sink import SlackSink

SECRET = "whsec-0123456789abcdef"


@pytest.fixture
def sink() -> Iterator[SlackSink]:
    server = SlackSink().start()
    yield server
    server.stop()


def _rollback_payload() -> dict[str, Any]:
    return alerts.alert_payload(
        kind="rollback",
        experiment_key="ranker-v2",
        experiment_name="Ranker v2",
        action="rolled back: all traffic goes to control",
        reason="p95 latency is 38% higher on v2",
        details={
            "metric": "latency-p95",
            "metric_name": "p95 latency",
            "arm": "v2",
            "control_arm": "v1",
            "rel_effect": 0.38,
            "interval": [0.21, 0.55],
            "interval_level": 0.95,
            "n": {"v1": 5120, "v2": 498},
            "p_value": 0.00031,
            "method": "exceedance e-process, per time window",
        },
    )


def test_slack_message_names_everything_a_reader_needs(settings: Any) -> None:
    settings.RAMPART_BASE_URL = "https://rampart.example.com/"
    message = alert_delivery.slack_message(_rollback_payload())
    text = json.dumps(message)
    assert message["blocks"][0]["type"] == "header"
    assert "Rolled back" in message["blocks"][0]["text"]["text"]
    for expected in ("ranker-v2", "p95 latency", "`v2`", "+38.0%", "+21.0%", "+55.0%"):
        assert expected in text
    assert "5,120" in text and "498" in text
    assert "Always-valid p" in text and "0.00031 (exceedance e-process, per time window)" in text
    assert "rolled back: all traffic goes to control" in text
    button = message["blocks"][-1]["elements"][0]
    assert button["url"] == "https://rampart.example.com/experiments/ranker-v2/"
    assert message["text"].startswith(":rotating_light: Rolled back")


def test_signature_matches_an_independent_hmac_and_rejects_replays_and_tampering() -> None:
    body = b'{"type":"rollback"}'
    header = alert_delivery.sign(SECRET, body, 1_700_000_000)
    # Independent computation with the standard library, as a receiver would do it.
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert alert_delivery.verify_signature(SECRET, body, header, now=1_700_000_100)
    assert not alert_delivery.verify_signature(SECRET, body, header, now=1_700_001_000)  # replay
    assert not alert_delivery.verify_signature(SECRET, body + b" ", header, now=1_700_000_100)
    assert not alert_delivery.verify_signature(
        "another-secret-value", body, header, now=1_700_000_100
    )
    assert not alert_delivery.verify_signature(SECRET, body, "v1=abc", now=1_700_000_100)


def test_backoff_is_exponential_with_full_jitter_and_capped(settings: Any) -> None:
    settings.ALERT_BACKOFF_BASE_S = 2.0
    settings.ALERT_BACKOFF_MAX_S = 60.0
    rng = random.Random(7)
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (20, 60.0)):
        delays = [alert_delivery.backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert min(delays) >= 0.0 and max(delays) <= ceiling
        assert max(delays) > 0.8 * ceiling  # the jitter spans the whole window


@pytest.mark.django_db
def test_alert_survives_a_receiver_outage_and_is_delivered_once(
    settings: Any, sink: SlackSink, metrics: Any
) -> None:
    settings.ALERT_BACKOFF_BASE_S = 0.01
    settings.ALERT_BACKOFF_MAX_S = 0.02
    experiment = start_experiment("outage")
    settings.SLACK_WEBHOOK_URL = sink.url()
    endpoint = services.webhook_create(
        actor="test", name="pager", url=sink.url("/hook"), secret=SECRET
    )
    alerts.alert_enqueue(
        experiment_id=experiment.pk, kind="rollback", payload=_rollback_payload(), dedupe="r:1"
    )
    # Queuing the same event again (a retried decision) adds nothing.
    alerts.alert_enqueue(
        experiment_id=experiment.pk, kind="rollback", payload=_rollback_payload(), dedupe="r:1"
    )
    assert AlertOutbox.objects.count() == 2

    sink.stop()  # the receiver is down
    report = alert_delivery.deliver_due()
    assert (report.delivered, report.failed) == (0, 2)
    rows = list(AlertOutbox.objects.order_by("id"))
    assert all(r.status == "pending" and r.attempts == 1 for r in rows)
    assert all(r.last_error == "ConnectError" for r in rows)

    sink.start()  # back on the same port
    later = timezone.now() + timedelta(seconds=1)
    report = alert_delivery.deliver_due(now=later)
    assert report.delivered == 2
    assert alert_delivery.deliver_due(now=later + timedelta(seconds=60)).delivered == 0
    assert len(sink.messages("/services/T0/B0/hook")) == 1
    hooks = sink.messages("/hook")
    assert len(hooks) == 1
    received = hooks[0]
    assert alert_delivery.verify_signature(
        SECRET, received.body, received.headers["x-rampart-signature"]
    )
    assert received.json["type"] == "rollback"
    assert received.json["experiment"]["key"] == "ranker-v2"
    assert received.headers["x-rampart-delivery"] == received.json["delivery"]
    assert all(r.status == "delivered" for r in AlertOutbox.objects.all())
    assert endpoint.pk


@pytest.mark.django_db
def test_a_receiver_that_keeps_failing_ends_dead(settings: Any, sink: SlackSink) -> None:
    settings.ALERT_MAX_ATTEMPTS = 3
    settings.ALERT_BACKOFF_BASE_S = 0.0
    settings.SLACK_WEBHOOK_URL = sink.url()
    sink.status = 500
    services.alert_test(actor="test")
    moment = timezone.now()
    for step in range(3):
        alert_delivery.deliver_due(now=moment + timedelta(seconds=step + 1))
    row = AlertOutbox.objects.get()
    assert row.status == "dead" and row.attempts == 3 and row.last_error == "HTTP 500"
    assert len(sink.messages()) == 3


@pytest.mark.django_db
def test_urls_and_secrets_never_reach_logs_or_outbox(
    settings: Any, sink: SlackSink, caplog: pytest.LogCaptureFixture, metrics: Any
) -> None:
    slack = sink.url("/services/T0/B0/very-secret-slack-token")
    hook = sink.url("/hooks/secret-path")
    experiment = start_experiment("quiet")
    experiment_services.experiment_update(actor="test", key="quiet", slack_webhook_url=slack)
    services.webhook_create(actor="test", name="pager", url=hook, secret=SECRET)
    caplog.set_level(logging.DEBUG)
    alerts.alert_enqueue(
        experiment_id=experiment.pk, kind="rollback", payload=_rollback_payload(), dedupe="q"
    )
    sink.status = 503
    alert_delivery.deliver_due()
    sink.status = 200
    alert_delivery.deliver_due(now=timezone.now() + timedelta(hours=1))
    assert len(sink.messages("/services/T0/B0/very-secret-slack-token")) == 2
    stored = json.dumps(list(AlertOutbox.objects.values()), default=str)
    for secret in ("very-secret-slack-token", "secret-path", SECRET):
        assert secret not in caplog.text
        assert secret not in stored
