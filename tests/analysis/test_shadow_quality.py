"""A shadow's quality paired with control's on the same requests' labels, the user as the unit."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from analysis.models import ShadowAnalysis
from analysis.quality_metrics import quality_cohort_stats
from analysis.services import analysis_run
from analysis.shadow_quality import shadow_quality_pairs
from experiments import roles, services
from experiments.selectors import experiment_view_get
from routing.models import Label, ObservationBucket, Prediction
from routing.observe.shadow_pairs import PairCell
from tests.experiments.test_roles import user_with_role

pytestmark = pytest.mark.django_db


def _experiment(key: str) -> int:
    services.metric_create(
        actor="test",
        key=f"{key}-accuracy",
        name="Accuracy",
        kind="mean",
        source="quality:accuracy",
        direction="higher",
        window_s=600,
    )
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
        metrics=[services.MetricUseInput(f"{key}-accuracy", "guardrail", 0.02)],
        quality_enabled=True,
        quality_prediction_path="label",
        quality_prediction_kind="class",
    )
    services.experiment_start(actor="test", key=key)
    return int(experiment.id)


def _labelled_pairs(
    experiment_id: int, *, users: int, control_right: float, shadow_right: float, seed: int
) -> None:
    """Each user: two requests predicted by control and the shadow, then labelled."""
    rng = np.random.default_rng(seed)
    start = timezone.now().timestamp() - 300
    predictions, labels = [], []
    for user in range(users):
        for request in range(2):
            request_id = f"{seed}-{user}-{request}"
            at = start + user * 0.01 + request * 50
            truth = "fraud" if rng.random() < 0.5 else "legitimate"
            other = "legitimate" if truth == "fraud" else "fraud"
            right = rng.random()
            for variant, share in (("v1", control_right), ("s1", shadow_right)):
                predictions.append(
                    Prediction(
                        experiment_id=experiment_id,
                        request_id=request_id,
                        variant_key=variant,
                        unit_id=f"u{user}",
                        predicted_at=at,
                        kind="class",
                        status="ok",
                        value=f'"{truth if right < share else other}"',
                    )
                )
            labels.append(
                Label(request_id=request_id, value=f'"{truth}"', labelled_at=at + 5, received_at=at)
            )
    Prediction.objects.bulk_create(predictions)
    Label.objects.bulk_create(labels)


def _identical_latency_pairs(experiment_id: int, n: int) -> None:
    rng = np.random.default_rng(0)
    cell = PairCell()
    for latency in rng.lognormal(3.0, 0.1, n):
        cell.add(float(latency), float(latency), disagreed=False, abs_diff=None)
    ObservationBucket.objects.create(
        experiment_id=experiment_id,
        variant_key="s1",
        is_shadow=True,
        bucket_start=timezone.now() - timedelta(seconds=60),
        count=n,
        compared_count=n,
        pairs=cell.to_json(),
    )


def test_each_user_gives_its_first_labelled_pair_and_routed_arms_ignore_the_shadow() -> None:
    experiment_id = _experiment("sq-pairs")
    _labelled_pairs(experiment_id, users=50, control_right=0.9, shadow_right=0.9, seed=1)
    view = experiment_view_get(key="sq-pairs")
    (quality,) = shadow_quality_pairs(view, "s1", now=timezone.now())
    assert quality.metric == "sq-pairs-accuracy" and quality.margin == 0.02
    assert quality.pairs.n == 50  # one pair per user, not 100
    # The quality guardrail's own statistics leave the shadow's predictions out.
    stats, coverage = quality_cohort_stats(
        experiment_id=experiment_id,
        metrics=[use.metric for use in view.metrics],
        now=timezone.now(),
        variants=["v1", "v2"],
    )
    assert set(stats["sq-pairs-accuracy"]) == set(coverage["sq-pairs-accuracy"]) == {"v1"}
    assert coverage["sq-pairs-accuracy"]["v1"].predictions == 100


def test_a_less_accurate_shadow_is_worse_on_its_labels_and_an_equal_one_ready() -> None:
    worse_id = _experiment("sq-worse")
    _labelled_pairs(worse_id, users=600, control_right=0.95, shadow_right=0.7, seed=2)
    _identical_latency_pairs(worse_id, 600)
    analysis_run(experiment_id=worse_id)
    row = ShadowAnalysis.objects.get(experiment_id=worse_id)
    assert row.verdict == "worse", row.result
    assert "Accuracy at most" in row.reason
    (quality,) = row.result["quality"]
    assert quality["pairs"] == 600
    assert quality["ratio"]["upper"] < 0.98

    same_id = _experiment("sq-same")
    _labelled_pairs(same_id, users=600, control_right=0.9, shadow_right=0.9, seed=3)
    _identical_latency_pairs(same_id, 3000)
    analysis_run(experiment_id=same_id)
    row = ShadowAnalysis.objects.get(experiment_id=same_id)
    # Predictions agree on every request (the same draw decides both), so the paired interval
    # of the accuracy ratio is tight around 1.
    assert row.verdict == "ready", row.result
    (quality,) = row.result["quality"]
    assert quality["ratio"]["lower"] > 0.98
    # The page shows the paired accuracy with its interval.
    client = Client()
    client.force_login(user_with_role(roles.VIEWER, "quality-viewer"))
    html = client.get(reverse("analysis:results", args=["sq-same"])).content.decode()
    assert "Accuracy +0.0% (" in html and "on 600 users&#x27; labels" in html
