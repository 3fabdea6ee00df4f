"""Quality metrics from predictions and labels: windows, the missing-label rule, rollback."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from analysis import alert_delivery, services
from analysis.models import AlertOutbox
from analysis.quality_metrics import quality_cohort_stats
from experiments import services as experiment_services
from experiments.errors import InvalidInput
from experiments.models import AuditEntry, Experiment
from experiments.selectors import experiment_view_get
from routing.models import Label, Prediction
from tests.analysis.conftest import add_exposures, later, start_experiment

pytestmark = pytest.mark.django_db

QUALITY = {
    "quality_enabled": True,
    "quality_prediction_path": "label",
    "quality_prediction_kind": "class",
}


def _accuracy_metric(key: str = "accuracy", **extra: Any) -> Any:
    return experiment_services.metric_create(
        actor="test",
        key=key,
        name="Accuracy",
        kind="mean",
        source="quality:accuracy",
        direction="higher",
        window_s=600,
        **extra,
    )


def _predict(
    experiment_id: int,
    variant: str,
    unit: str,
    request_id: str,
    at: datetime,
    prediction: str,
    label: str | None = None,
    label_after_s: float = 10.0,
) -> None:
    Prediction.objects.create(
        experiment_id=experiment_id,
        request_id=request_id,
        variant_key=variant,
        unit_id=unit,
        predicted_at=at.timestamp(),
        kind="class",
        status="ok",
        value=f'"{prediction}"',
    )
    if label is not None:
        Label.objects.create(
            request_id=request_id,
            value=f'"{label}"',
            labelled_at=at.timestamp() + label_after_s,
            received_at=at.timestamp() + label_after_s,
        )


def test_quality_metrics_are_validated_in_the_catalogue() -> None:
    with pytest.raises(InvalidInput) as caught:
        experiment_services.metric_create(
            actor="test",
            key="acc",
            name="acc",
            kind="binomial",
            source="quality:accuracy",
            direction="lower",
        )
    assert set(caught.value.errors) == {"kind", "direction"}
    with pytest.raises(InvalidInput) as caught:
        _accuracy_metric("acc2", missing_label="legit")
    assert set(caught.value.errors) == {"missing_label"}
    with pytest.raises(InvalidInput) as caught:
        experiment_services.metric_create(
            actor="test", key="x", name="x", kind="mean", source="quality:f1", direction="higher"
        )
    assert set(caught.value.errors) == {"source"}


def test_label_window_and_missing_label_rule(metrics: Any) -> None:
    _accuracy_metric()
    _accuracy_metric("accuracy-legit", missing_label='"legit"')
    experiment = start_experiment(
        "windows",
        "ab",
        metrics=[
            {"metric": "accuracy", "role": "guardrail"},
            {"metric": "accuracy-legit", "role": "secondary"},
        ],
        **QUALITY,
    )
    at = experiment.started_at
    pid = experiment.pk
    # u1: right, labelled in the window; wrong, labelled after it (counts as missing).
    _predict(pid, "v1", "u1", "r1", at, "fraud", "fraud")
    _predict(pid, "v1", "u1", "r2", at, "fraud", "legit", label_after_s=900)
    # u2: no label, window closed (missing); u3: no label, window open (waits).
    _predict(pid, "v1", "u2", "r3", at, "legit")
    _predict(pid, "v1", "u3", "r4", later(at, 500), "fraud")
    # A label that cannot be told apart from an unreadable answer: not counted.
    Prediction.objects.create(
        experiment_id=pid,
        request_id="r5",
        variant_key="v1",
        unit_id="u4",
        predicted_at=at.timestamp(),
        kind="class",
        status="not_json",
        value="",
    )
    view = experiment_view_get(key="windows")
    metrics_views = [use.metric for use in view.metrics]
    stats, coverage = quality_cohort_stats(
        experiment_id=pid, metrics=metrics_views, now=later(at, 700)
    )
    # Skipped when missing: only u1's first prediction counts (accuracy 1).
    plain = stats["accuracy"]["v1"][0]
    assert (plain.n, plain.sum) == (1, 1.0)
    # "No label means legit": u1 = mean(1, 0) = 0.5 (r2's late label does not count),
    # u2 = 1 (predicted legit).
    legit = stats["accuracy-legit"]["v1"][0]
    assert (legit.n, legit.sum, legit.sum_squares) == (2, 1.5, 1.25)
    arm = coverage["accuracy"]["v1"]
    assert (arm.predictions, arm.unreadable, arm.labelled, arm.missing, arm.waiting) == (
        5,
        1,
        1,
        2,
        1,
    )
    assert arm.labelled_share == pytest.approx(1 / 3)
    assert arm.mean_delay_s == pytest.approx(10.0)


def test_a_less_accurate_canary_is_rolled_back_on_the_accuracy_guardrail(
    metrics: Any, slack_url: str
) -> None:
    _accuracy_metric()
    experiment = start_experiment(
        "degraded",
        "ab",
        metrics=[{"metric": "accuracy", "role": "guardrail", "margin": 0.01}],
        **QUALITY,
    )
    at = later(experiment.started_at, 1)
    for variant, right_of_three in (("v1", 3), ("v2", 1)):
        units = add_exposures(experiment.pk, variant, [f"{variant}-u{i}" for i in range(300)], at)
        for index, unit in enumerate(units):
            # Most control users get all three right; most canary users one of three.
            right = right_of_three if index % 10 else 2
            for request in range(3):
                truth = "cat" if (index + request) % 2 else "dog"
                wrong = "dog" if truth == "cat" else "cat"
                _predict(
                    experiment.pk,
                    variant,
                    unit,
                    f"{unit}-{request}",
                    at,
                    truth if request < right else wrong,
                    truth,
                )
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 60))
    assert result is not None and result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    evidence = AuditEntry.objects.get(experiment=experiment, action="rollback").after["evidence"]
    assert evidence["metric"] == "accuracy" and evidence["arm"] == "v2"
    assert evidence["n"] == {"v1": 300, "v2": 300}
    row = next(m for m in result.snapshot.metrics if m["metric"] == "accuracy")
    assert row["status"] == "breach"
    # Label health in the snapshot: every prediction labelled 10 s after it, in both arms.
    labels = result.snapshot.health["labels"]
    assert labels["metric"] == "accuracy" and labels["balance"]["flagged"] is False
    assert labels["arms"]["v2"]["labelled_share"] == 1.0
    assert labels["arms"]["v2"]["mean_label_delay_s"] == pytest.approx(10.0)
    # The Slack alert names the quality guardrail and its evidence.
    alert = AlertOutbox.objects.get(experiment=experiment, kind="rollback")
    assert alert.payload["details"]["metric"] == "accuracy"
    message = str(alert_delivery.slack_message(alert.payload))
    assert "Accuracy" in message and "v2" in message
    # The experiment page shows the row and the labels per version.
    web = Client()
    web.force_login(User.objects.create_user("ann", password="pw-for-tests-only"))
    experiment_services.user_role_assign(actor="test", username="ann", role="admin")
    html = web.get(reverse("analysis:results", args=["degraded"])).content.decode()
    assert "Labels per version" in html and "10.0 s" in html
    assert row["summary"] in html


def test_arms_labelled_at_different_rates_get_a_warning(metrics: Any) -> None:
    _accuracy_metric()
    experiment = start_experiment(
        "unbalanced", "ab", metrics=[{"metric": "accuracy", "role": "guardrail"}], **QUALITY
    )
    at = later(experiment.started_at, 1)
    for variant, labelled_every in (("v1", 1), ("v2", 3)):
        for index in range(300):
            unit = f"{variant}-u{index}"
            label = "cat" if index % labelled_every == 0 else None
            _predict(experiment.pk, variant, unit, f"{unit}-0", at, "cat", label)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 700))
    assert result is not None
    balance = result.snapshot.health["labels"]["balance"]
    assert balance["flagged"] is True and balance["p"] < 1e-6
    web = Client()
    web.force_login(User.objects.create_user("ann", password="pw-for-tests-only"))
    experiment_services.user_role_assign(actor="test", username="ann", role="admin")
    html = web.get(reverse("analysis:results", args=["unbalanced"])).content.decode()
    assert "Arms get labels at different rates" in html
    assert "v1 100.0%, v2 33.3%" in html


def test_arms_labelled_at_different_speeds_get_a_warning(metrics: Any) -> None:
    _accuracy_metric()
    experiment = start_experiment(
        "slow-labels", "ab", metrics=[{"metric": "accuracy", "role": "guardrail"}], **QUALITY
    )
    at = later(experiment.started_at, 1)
    # Every prediction is labelled in its 600 s window; v2's labels mostly after 300 s.
    for variant, slow_every in (("v1", 10), ("v2", 2)):
        for index in range(300):
            unit = f"{variant}-u{index}"
            after = 400.0 if index % slow_every == 0 else 20.0
            _predict(experiment.pk, variant, unit, f"{unit}-0", at, "cat", "cat", after)
    result = services.analysis_run(experiment_id=experiment.pk, now=later(at, 700))
    assert result is not None
    labels = result.snapshot.health["labels"]
    assert labels["balance"]["flagged"] is False and labels["balance"]["p"] == 1.0
    delay = labels["delay"]
    assert delay["flagged"] is True and delay["p"] < 1e-6
    assert delay["early_shares"] == {"v1": 0.9, "v2": 0.5}
    web = Client()
    web.force_login(User.objects.create_user("ann", password="pw-for-tests-only"))
    experiment_services.user_role_assign(actor="test", username="ann", role="admin")
    html = web.get(reverse("analysis:results", args=["slow-labels"])).content.decode()
    assert "Arms get labels at different speeds" in html
    assert "v1 90.0%, v2 50.0%" in html
    assert "Arms get labels at different rates" not in html
