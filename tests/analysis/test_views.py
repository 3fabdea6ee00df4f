"""Web UI parts served by the analysis app: results, charts data, alerts, decisions, webhooks."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from analysis import services
from analysis.models import AlertOutbox, ResultSnapshot, WebhookEndpoint
from experiments import services as experiment_services
from tests.analysis.conftest import add_exposures, later, start_experiment, traffic

WEBHOOK_URL = "https://alerts.example.com/hooks/rampart?token=top-secret-token"
WEBHOOK_SECRET = "s3cret-signing-key-0123456789"


@pytest.fixture
def web(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_user("bob", password="pw-for-tests-only"))
    # An admin, who may manage webhooks; tests/experiments/test_roles.py covers the others.
    experiment_services.user_role_assign(actor="test", username="bob", role="admin")
    return client


def p95_row(**overrides: Any) -> dict[str, Any]:
    """A snapshot metric row in the shape `analysis.guardrails` writes."""
    row: dict[str, Any] = {
        "metric": "latency-p95",
        "name": "p95 latency",
        "kind": "quantile",
        "role": "guardrail",
        "direction": "lower",
        "arm": "v2",
        "control_arm": "v1",
        "n_control": 2000,
        "n_treatment": 1990,
        "control_estimate": 164.0,
        "treatment_estimate": 226.3,
        "abs_effect": 62.3,
        "rel_effect": 0.38,
        "ci_fixed": [0.25, 0.5],
        "ci_always_valid": [0.21, 0.55],
        "p_value": 0.0000012,
        "p_always_valid": None,
        "harm_bound": 0.21,
        "margin": 0.1,
        "status": "breach",
        "summary": "p95 latency is 38% higher on v2, 95% always-valid interval +21% to +55%",
    }
    row.update(overrides)
    return row


def conversion_row(**overrides: Any) -> dict[str, Any]:
    row = p95_row(
        metric="conversion",
        name="Conversion",
        kind="binomial",
        role="primary",
        direction="higher",
        control_estimate=0.0412,
        treatment_estimate=0.0398,
        rel_effect=-0.034,
        ci_always_valid=[-0.12, None],
        p_value=0.41,
        p_always_valid=0.93,
        harm_bound=None,
        margin=0.0,
        status="inconclusive",
        summary="Conversion is 3% lower on v2, 95% always-valid interval -12% to unbounded",
    )
    row.update(overrides)
    return row


def snapshot(experiment_id: int, *, seconds_ago: float = 0, **fields: Any) -> ResultSnapshot:
    values: dict[str, Any] = {
        "decision": "rollback",
        "reason": "guardrail p95 latency breached on v2",
        "health": {
            "srm": {"p": 0.4, "e_value": 1.0, "flagged": False},
            "multiple_exposure": {"share": 0.0, "units": 0, "flagged": False},
            "no_traffic": False,
        },
        "exposures": {"v1": 2000, "v2": 1990},
        "metrics": [p95_row(), conversion_row()],
        "latency": {
            "v1": {
                "n": 2000,
                "mean": 101.0,
                "p50": 98.0,
                "p95": 164.0,
                "p99": 201.0,
                "error_rate": 0.001,
            },
            "v2": {
                "n": 1990,
                "mean": 140.0,
                "p50": 137.0,
                "p95": 226.3,
                "p99": 290.0,
                "error_rate": 0.0,
            },
        },
    }
    values.update(fields)
    return ResultSnapshot.objects.create(
        experiment_id=experiment_id,
        created_at=timezone.now() - timedelta(seconds=seconds_ago),
        **values,
    )


def test_every_part_requires_login(metrics: Any) -> None:
    start_experiment("gated")
    client = Client()
    for url in (
        reverse("analysis:results", args=["gated"]),
        reverse("analysis:chart-data", args=["gated"]),
        reverse("analysis:alerts", args=["gated"]),
        reverse("analysis:decisions") + "?keys=gated",
        reverse("analysis:webhooks"),
    ):
        response = client.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"], url
    assert client.post(reverse("analysis:alert-test")).status_code == 302
    assert not AlertOutbox.objects.exists()


def test_results_table_says_it_in_plain_words(web: Client, metrics: Any) -> None:
    experiment = start_experiment("ranker")
    add_exposures(experiment.pk, "v1", ["a", "b", "c"], timezone.now())
    add_exposures(experiment.pk, "v2", ["d"], timezone.now())
    snapshot(experiment.pk)
    html = web.get(reverse("analysis:results", args=["ranker"])).content.decode()
    assert "Rolled back" in html and "guardrail p95 latency breached on v2" in html
    assert "p95 latency is 38% higher on v2, 95% always-valid interval +21% to +55%" in html
    # Lift and interval, coloured and labelled as worse because lower latency is better.
    assert '<span class="lift-down">+38.0% <span class="visually-hidden">(worse)</span>' in html
    assert "+21.0% to +55.0%" in html
    assert "Guardrail breached" in html and "guardrail: may rise at most 10%" in html
    # Estimates in the metric's unit: milliseconds for latency, percentages for rates.
    assert "164 ms" in html and "226 ms" in html
    assert "4.12%" in html and "3.98%" in html
    # An unbounded side of the interval, and the p-values (always-valid when there is one).
    assert "−12.0% to unbounded" in html
    assert '<td class="num">0.930</td>' in html
    assert '&lt; 0.001<div class="summary-line">fixed-horizon</div>' in html
    # Users exposed come live from routing; requests and latency from the snapshot.
    assert re.search(r"<td class=\"num\">3 <span class=\"muted\">\(75\.0%\)</span>", html)
    assert "2,000" in html and "290 ms" in html and "0.10%" in html


def test_results_before_the_first_analysis(web: Client, metrics: Any) -> None:
    start_experiment("fresh")
    html = web.get(reverse("analysis:results", args=["fresh"])).content.decode()
    assert "No analysis yet." in html
    assert "99.0%" in html and "1.0%" in html  # the planned split of the first ramp step


def test_health_warnings_are_explained(web: Client, metrics: Any) -> None:
    experiment = start_experiment("unhealthy")
    snapshot(
        experiment.pk,
        decision="hold",
        reason="health check failed: sample ratio mismatch",
        health={
            "srm": {"p": 0.00002, "e_value": 5e4, "flagged": True},
            "multiple_exposure": {"share": 0.021, "units": 42, "flagged": True},
            "no_traffic": True,
        },
    )
    html = web.get(reverse("analysis:results", args=["unhealthy"])).content.decode()
    assert "Hold: the ramp waits" in html
    assert "Sample ratio mismatch" in html
    assert "(anytime-valid e-value 5e+04; chi-square p = &lt; 0.001)" in html
    assert "2.1% of users (42) were served two versions" in html
    assert "A version receives no requests." in html


def test_real_analysis_run_feeds_the_page(web: Client, metrics: Any) -> None:
    experiment = start_experiment("slow", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 30)
    traffic(experiment, control_n=500, canary_n=500, at=later(at, -10), unit_prefix="w", users=True)
    traffic(experiment, control_n=2000, canary_n=2000, canary_slowdown=1.4, at=at, users=True)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 15))
    assert result is not None and result.snapshot.decision == "rollback"
    html = web.get(reverse("analysis:results", args=["slow"])).content.decode()
    row = next(m for m in result.snapshot.metrics if m["metric"] == "latency-p95")
    assert row["summary"] in html
    assert "Guardrail breached" in html
    assert "betting e-process on users" in html  # the method behind the p-value
    data = web.get(reverse("analysis:chart-data", args=["slow"])).json()
    series = next(s for s in data["lift"] if s["metric"] == "latency-p95")
    assert series["lift"] == [row["rel_effect"]]
    assert data["latency"]["v2"]["p95"] == [result.snapshot.latency["v2"]["p95"]]


def test_chart_data_is_one_point_per_run(web: Client, metrics: Any) -> None:
    experiment = start_experiment("series")
    snapshot(
        experiment.pk,
        seconds_ago=20,
        metrics=[p95_row(rel_effect=0.1, ci_always_valid=[None, None])],
    )
    snapshot(experiment.pk, seconds_ago=10, metrics=[p95_row(rel_effect=0.3)])
    data = web.get(reverse("analysis:chart-data", args=["series"])).json()
    assert len(data["times"]) == 2 and data["arms"] == ["v1", "v2"] and data["control"] == "v1"
    (series,) = data["lift"]
    assert series["lift"] == [0.1, 0.3]
    assert series["lower"] == [None, 0.21] and series["upper"] == [None, 0.55]
    # Harm for a lower-is-better guardrail is a rise, so its line sits at +margin.
    assert series["margin"] == 0.1
    assert data["latency"]["v1"]["p99"] == [201.0, 201.0]


def test_alerts_show_destination_and_status_but_no_url(web: Client, metrics: Any) -> None:
    experiment = start_experiment("alerted")
    hook = WebhookEndpoint.objects.create(name="On-call", url=WEBHOOK_URL, secret=WEBHOOK_SECRET)
    AlertOutbox.objects.create(
        experiment_id=experiment.pk,
        kind="rollback",
        destination=f"webhook:{hook.pk}",
        payload={"action": "rolled back", "reason": "p95 latency breached"},
        status="dead",
        attempts=12,
        next_attempt_at=timezone.now(),
        last_error=f"Server error '503' for url '{WEBHOOK_URL}'",
        dedupe_key="rollback:1:webhook",
    )
    AlertOutbox.objects.create(
        experiment_id=experiment.pk,
        kind="rollback",
        destination="slack",
        payload={"action": "rolled back", "reason": "p95 latency breached"},
        status="delivered",
        attempts=1,
        next_attempt_at=timezone.now(),
        dedupe_key="rollback:1:slack",
    )
    html = web.get(reverse("analysis:alerts", args=["alerted"])).content.decode()
    assert (
        "Rollback → Webhook “On-call”" in html and "Gave up" in html and "after 12 attempts" in html
    )
    assert "Rollback → Slack" in html and "Delivered" in html
    assert "p95 latency breached" in html and "Server error &#x27;503&#x27; for url" in html
    assert "top-secret-token" not in html and "alerts.example.com" not in html


def test_decisions_fill_the_list_cells_out_of_band(web: Client, metrics: Any) -> None:
    first = start_experiment("first")
    start_experiment("second")
    snapshot(first.pk, decision="continue", reason="all guardrails within margin")
    html = web.get(reverse("analysis:decisions"), {"keys": "first,second"}).content.decode()
    assert '<span id="decision-first" hx-swap-oob="true"' in html
    assert "Healthy" in html and "all guardrails within margin" in html
    assert "decision-second" not in html  # no analysis yet: the cell keeps its placeholder


def test_webhooks_show_name_and_host_only(web: Client, db: None) -> None:
    WebhookEndpoint.objects.create(name="On-call", url=WEBHOOK_URL, secret=WEBHOOK_SECRET)
    html = web.get(reverse("analysis:webhooks")).content.decode()
    assert "On-call" in html and "alerts.example.com" in html
    assert "top-secret-token" not in html and "/hooks/rampart" not in html
    assert WEBHOOK_SECRET not in html


def test_webhook_create_delete_and_test_alert(web: Client, db: None) -> None:
    hx = {"HTTP_HX_REQUEST": "true"}
    refused = web.post(
        reverse("analysis:webhook-create"),
        {"name": "Pager", "url": "https://pager.example.com/in", "secret": "short"},
        **hx,
    )
    assert refused.status_code == 200  # htmx swaps only successful responses
    assert re.search(
        r'id="id_webhook_secret_error"><li>Use at least 16 characters', refused.content.decode()
    )
    assert 'value="short"' not in refused.content.decode()  # secrets are not echoed back
    created = web.post(
        reverse("analysis:webhook-create"),
        {"name": "Pager", "url": "https://pager.example.com/in", "secret": WEBHOOK_SECRET},
        **hx,
    )
    assert created.status_code == 200
    assert "Added webhook “Pager” (pager.example.com)." in created.content.decode()
    endpoint = WebhookEndpoint.objects.get(name="Pager")
    assert endpoint.secret == WEBHOOK_SECRET

    tested = web.post(reverse("analysis:alert-test"), **hx)
    assert "Queued a test alert to 1 destination" in tested.content.decode()
    assert AlertOutbox.objects.filter(kind="test", destination=f"webhook:{endpoint.pk}").exists()

    confirm = web.get(reverse("analysis:webhook-delete", args=[endpoint.pk]))
    assert "Delete webhook “Pager”?" in confirm.content.decode()
    deleted = web.post(reverse("analysis:webhook-delete", args=[endpoint.pk]))
    assert deleted.status_code == 302 and deleted["Location"].endswith("/settings/#webhooks")
    assert not WebhookEndpoint.objects.exists()


def test_experiment_page_pulls_in_the_analysis_parts(web: Client, metrics: Any) -> None:
    start_experiment("ranker")
    html = web.get(reverse("experiments:detail", args=["ranker"])).content.decode()
    assert f'hx-get="{reverse("analysis:results", args=["ranker"])}"' in html
    assert 'hx-trigger="load, every 5s"' in html
    assert f'data-chart-source="{reverse("analysis:chart-data", args=["ranker"])}"' in html
    assert f'hx-get="{reverse("analysis:alerts", args=["ranker"])}"' in html
    listing = web.get("/").content.decode()
    assert f'hx-get="{reverse("analysis:decisions")}?keys=ranker"' in listing
    experiment_services.experiment_rollback(actor="t", key="ranker", reason="done")
    ended = web.get(reverse("experiments:detail", args=["ranker"])).content.decode()
    assert 'hx-trigger="load"' in ended  # no polling once the experiment has ended


def test_a_healthy_verdict_is_history_once_the_experiment_ended(web: Client, metrics: Any) -> None:
    experiment = start_experiment("ended")
    snapshot(experiment.pk, decision="continue", reason="all guardrails within margin")
    experiment_services.experiment_rollback(actor="oncall", key="ended", reason="by hand")
    html = web.get(reverse("analysis:results", args=["ended"])).content.decode()
    assert "Last analysis before the experiment ended: healthy" in html
    assert "Healthy: collecting data" not in html
    cells = web.get(reverse("analysis:decisions"), {"keys": "ended"}).content.decode()
    assert "decision-ended" not in cells
