"""Shadow verdicts from paired buckets: folding without double counting, verdicts, one alert."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from analysis.models import AlertOutbox, ShadowAnalysis
from analysis.services import analysis_run
from experiments import roles, services
from experiments.models import Experiment
from routing.models import ObservationBucket
from routing.observe.shadow_pairs import PairCell
from tests.experiments.test_roles import user_with_role

pytestmark = pytest.mark.django_db


def _experiment(key: str) -> int:
    experiment = services.experiment_create(
        actor="test",
        key=key,
        name=key,
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url="http://127.0.0.1:9001", weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url="http://127.0.0.1:9002", weight=0.5),
            services.VariantInput(
                key="s1", upstream_url="http://127.0.0.1:9003", weight=0.0, is_shadow=True
            ),
        ],
        slack_webhook_url="http://127.0.0.1:9/slack",
    )
    services.experiment_start(actor="test", key=key)
    return int(experiment.id)


def _add_pairs(
    experiment_id: int, *, n: int, disagree: float, slowdown: float, seed: int, bucket: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    cell = PairCell()
    control = rng.lognormal(3.0, 0.5, n)
    shadow = control * slowdown * rng.lognormal(0.0, 0.05, n)
    differs = rng.permutation(n) < round(disagree * n)
    for c, s, d in zip(control, shadow, differs, strict=True):
        cell.add(float(c), float(s), disagreed=bool(d), abs_diff=None)
    ObservationBucket.objects.create(
        experiment_id=experiment_id,
        variant_key="s1",
        is_shadow=True,
        bucket_start=timezone.now() - timedelta(seconds=600 - 10 * bucket),
        count=n,
        compared_count=n,
        disagreement_count=round(disagree * n),
        pairs=cell.to_json(),
    )


def test_an_identical_shadow_is_ready_and_alerted_once() -> None:
    experiment_id = _experiment("shadow-same")
    _add_pairs(experiment_id, n=100, disagree=0.0, slowdown=1.0, seed=1)
    analysis_run(experiment_id=experiment_id)
    row = ShadowAnalysis.objects.get(experiment_id=experiment_id)
    assert row.verdict == "collecting"
    assert "100 of the 200 pairs" in row.result["reason"]
    # The p95 ratio is the slowest to settle (a union of both arms' quantile CSs).
    for bucket in range(1, 7):
        _add_pairs(experiment_id, n=500, disagree=0.0, slowdown=1.0, seed=bucket, bucket=bucket)
    analysis_run(experiment_id=experiment_id)
    analysis_run(experiment_id=experiment_id)
    row.refresh_from_db()
    assert row.verdict == "ready", row.result
    # Folded once each: the settled part and the tail never double count.
    assert row.result["compared"] == 3100
    assert row.result["pairs"] == 3100
    assert row.result["disagreement"]["upper"] < 0.05
    latency = row.result["latency_ratio"]
    assert latency["lower"] < 1.0 < latency["upper"] < 1.1
    alerts = AlertOutbox.objects.filter(experiment_id=experiment_id, kind="shadow_verdict")
    assert alerts.count() == 1
    assert alerts.get().payload["action"] == "shadow ready to canary"


def test_the_results_api_carries_each_shadows_verdict_and_intervals(
    make_key: Callable[..., str],
) -> None:
    experiment_id = _experiment("shadow-api")
    for bucket in range(3):
        _add_pairs(experiment_id, n=300, disagree=0.2, slowdown=1.0, seed=bucket, bucket=bucket)
    analysis_run(experiment_id=experiment_id)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {make_key('read')}")
    body = client.get("/api/v1/experiments/shadow-api/results").json()
    (shadow,) = body["shadows"]
    assert shadow["variant"] == "s1"
    assert shadow["verdict"] == "worse"
    latest = shadow["latest"]
    assert latest["compared"] == 900
    assert latest["disagreement"]["estimate"] == pytest.approx(0.2)
    assert latest["disagreement"]["lower"] < 0.2 < latest["disagreement"]["upper"]
    assert latest["latency_ratio"]["lower"] < 1.0 < latest["latency_ratio"]["upper"]
    # History entries do not carry them (they are the latest look only).
    history = client.get("/api/v1/experiments/shadow-api/results/history").json()
    assert history["results"][0]["shadows"] == []


def test_a_shadow_disagreeing_on_a_fifth_of_requests_is_worse_by_its_bound() -> None:
    experiment_id = _experiment("shadow-differs")
    for bucket in range(3):
        _add_pairs(experiment_id, n=300, disagree=0.2, slowdown=1.0, seed=bucket, bucket=bucket)
    analysis_run(experiment_id=experiment_id)
    row = ShadowAnalysis.objects.get(experiment_id=experiment_id)
    assert row.verdict == "worse"
    lower = row.result["disagreement"]["lower"]
    assert 0.05 < lower < 0.2
    assert f"at least {lower * 100:.1f}% of requests" in row.reason


def test_a_slower_shadow_is_worse_on_latency() -> None:
    experiment_id = _experiment("shadow-slow")
    for bucket in range(3):
        _add_pairs(experiment_id, n=400, disagree=0.0, slowdown=1.3, seed=bucket, bucket=bucket)
    analysis_run(experiment_id=experiment_id)
    row = ShadowAnalysis.objects.get(experiment_id=experiment_id)
    assert row.verdict == "worse"
    assert "mean latency at least +" in row.reason
    assert row.result["latency_ratio"]["lower"] > 1.1


def _web(role: str) -> Client:
    client = Client()
    client.force_login(user_with_role(role, f"web-{role}"))
    return client


def test_the_page_shows_each_shadows_intervals_verdict_and_a_start_button() -> None:
    experiment_id = _experiment("shadow-page")
    for bucket in range(3):
        _add_pairs(experiment_id, n=300, disagree=0.2, slowdown=1.0, seed=bucket, bucket=bucket)
    analysis_run(experiment_id=experiment_id)
    page = _web(roles.EXPERIMENTER).get(reverse("analysis:results", args=["shadow-page"]))
    html = page.content.decode()
    table = html[html.index('id="shadows-table"') :]
    assert "Worse than control" in table
    assert "20.0% (" in table  # the disagreement estimate with its interval
    assert "disagrees with control on at least" in table
    assert "900" in table
    start = reverse("experiments:shadow-canary", args=["shadow-page", "s1"])
    assert f'action="{start}"' in table
    # Viewers see the verdict but no button.
    viewer = _web(roles.VIEWER).get(reverse("analysis:results", args=["shadow-page"]))
    assert "Worse than control" in viewer.content.decode()
    assert start not in viewer.content.decode()


def test_the_start_button_creates_the_canary_once_and_opens_it() -> None:
    _experiment("shadow-click")
    client = _web(roles.EXPERIMENTER)
    start = reverse("experiments:shadow-canary", args=["shadow-click", "s1"])
    first = client.post(start)
    assert first.status_code == 302
    assert first["location"] == reverse("experiments:detail", args=["shadow-click-s1-canary"])
    second = client.post(start)
    assert second["location"] == first["location"]
    assert Experiment.objects.filter(key="shadow-click-s1-canary").count() == 1
    assert _web(roles.VIEWER).post(start).status_code == 403
    wrong = client.post(reverse("experiments:shadow-canary", args=["shadow-click", "v2"]))
    assert wrong["location"] == reverse("experiments:detail", args=["shadow-click"])


def test_the_results_api_carries_the_paired_p95_and_its_verdict(
    make_key: Callable[..., str],
) -> None:
    """A shadow 40% slower on every request: worse at the paired p95, whose bound the reason
    names; a row of the earlier format (no ratio histogram) is read and left out of it."""
    experiment_id = _experiment("shadow-p95")
    _add_pairs(experiment_id, n=200, disagree=0.0, slowdown=1.4, seed=9, bucket=0)
    legacy = ObservationBucket.objects.get(experiment_id=experiment_id)
    data = json.loads(legacy.pairs)
    del data["hr"]
    legacy.pairs = json.dumps(data)
    legacy.save(update_fields=["pairs"])
    for bucket in range(1, 3):
        _add_pairs(experiment_id, n=300, disagree=0.0, slowdown=1.4, seed=bucket, bucket=bucket)
    analysis_run(experiment_id=experiment_id)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {make_key('read')}")
    (shadow,) = client.get("/api/v1/experiments/shadow-p95/results").json()["shadows"]
    latest = shadow["latest"]
    assert latest["pairs"] == 800
    paired = latest["p95_pair_ratio"]
    # 1.4 times control on every request, times noise symmetric in the log: theta = 1.4; the
    # shadow's 1-in-20 slowdown 1.4 exp(1.645 * 0.05), control's against it exp(1.645 * 0.05) / 1.4.
    assert paired["estimate"] == pytest.approx(1.4, rel=0.02)
    assert 1.2 < paired["lower"] < paired["estimate"] < paired["upper"]
    assert paired["slowdown"] == pytest.approx(1.4 * np.exp(1.645 * 0.05), rel=0.03)
    assert paired["speedup"] == pytest.approx(np.exp(1.645 * 0.05) / 1.4, rel=0.03)
    assert shadow["verdict"] == "worse"
    assert f"paired p95 latency ratio at least {paired['lower']:.2f}x" in shadow["reason"]
    assert "(tolerance 1.20x; on 5% of users' requests the shadow took at least" in shadow["reason"]
    # The per-arm p95 ratio stays in the results, for context.
    assert latest["p95_ratio"]["lower"] < 1.4 < latest["p95_ratio"]["upper"]
