"""Below 100 units per arm, results say "not enough data" with the reason, not a number."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from analysis import services
from analysis.reporting import withhold_small_samples
from experiments import services as experiment_services
from experiments.models import DEFAULT_WINDOW_S
from tests.analysis.conftest import add_events, add_exposures, start_experiment, traffic

pytestmark = pytest.mark.django_db

REASON = "v1 has 3 and v2 has 3 of the 100 units per arm a report needs"


def test_three_units_per_arm_show_the_reason_in_api_and_page(api: APIClient, metrics: Any) -> None:
    experiment = start_experiment(
        "tiny", kind="ab", ramp=[], metrics=[{"metric": "conversion", "role": "primary"}]
    )
    t0 = experiment.started_at
    add_exposures(experiment.pk, "v1", ["a1", "a2", "a3"], t0)
    add_exposures(experiment.pk, "v2", ["b1", "b2", "b3"], t0)
    add_events([("a1", "purchase", 1.0, t0), ("b1", "purchase", 1.0, t0)])
    add_events([("b2", "purchase", 1.0, t0)], prefix="f")
    now = t0 + timedelta(seconds=DEFAULT_WINDOW_S + 1)
    result = services.analysis_run(experiment_id=experiment.pk, now=now)
    assert result is not None
    row = next(m for m in result.snapshot.metrics if m["metric"] == "conversion")
    assert (row["n_control"], row["n_treatment"]) == (3, 3)
    assert row["not_enough_data"] == REASON
    assert row["status"] == "insufficient"
    for name in ("control_estimate", "treatment_estimate", "rel_effect", "p_value"):
        assert row[name] is None, name
    assert row["ci_always_valid"] == [None, None] and row["ci_fixed"] == [None, None]
    assert row["summary"] == f"Conversion on v2: not enough data ({REASON})"
    body = api.get("/api/v1/experiments/tiny/results").json()
    api_row = next(m for m in body["metrics"] if m["metric"] == "conversion")
    assert api_row["not_enough_data"] == REASON and api_row["rel_effect"] is None
    User.objects.create_user("carol", password="pw-for-tests-only")
    experiment_services.user_role_assign(actor="test", username="carol", role="viewer")
    web = Client()
    web.login(username="carol", password="pw-for-tests-only")
    html = web.get(reverse("analysis:results", args=["tiny"])).content.decode()
    assert REASON in html and "Not enough data" in html
    assert "%" not in html.split('id="results-table"')[1].split("</table>")[0]


def test_enough_data_is_shown_and_a_breach_always_is(metrics: Any) -> None:
    experiment = start_experiment("enough", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = experiment.step_started_at + timedelta(seconds=30)
    traffic(experiment, control_n=500, canary_n=500, at=at - timedelta(seconds=10), users=True)
    traffic(
        experiment,
        control_n=2000,
        canary_n=2000,
        canary_slowdown=1.4,
        at=at,
        unit_prefix="n",
        users=True,
    )
    # 15 s later, so the users the quantile guardrail bets on have their windows closed.
    result = services.analysis_run(experiment_id=experiment.pk, now=at + timedelta(seconds=15))
    assert result is not None
    p95 = next(m for m in result.snapshot.metrics if m["metric"] == "latency-p95")
    assert p95["not_enough_data"] is None and p95["rel_effect"] is not None
    breach = {
        "name": "p95",
        "arm": "v2",
        "control_arm": "v1",
        "n_control": 40,
        "n_treatment": 3,
        "status": "breach",
        "rel_effect": 2.5,
    }
    small = {**breach, "status": "ok"}
    withhold_small_samples([breach, small])
    assert breach["not_enough_data"] is None and breach["rel_effect"] == 2.5
    assert small["rel_effect"] is None and small["status"] == "insufficient"
    assert small["not_enough_data"] == (
        "v1 has 40 and v2 has 3 of the 100 units per arm a report needs"
    )
