"""Input drift in the analysis run: windows of users, the rollup, uploads, one alert per episode."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from analysis import alert_delivery, services
from analysis.drift_models import InputDriftState
from analysis.input_drift import grace_s
from analysis.models import AlertOutbox
from experiments import services as experiment_services
from experiments.models import AuditEntry
from routing.models import InputDriftBucket
from tests.analysis.conftest import add_exposures, later, start_experiment

ALPHA = 0.05

pytestmark = pytest.mark.django_db


def _minutes(experiment_id: int, start: datetime, minutes: int, shares: dict[str, float]) -> None:
    """`minutes` buckets of 500 users each, the field `country` drawn from `shares`."""
    rng = random.Random(f"{start.isoformat()} {minutes}")
    rows = []
    for minute in range(minutes):
        values = rng.choices(list(shares), weights=list(shares.values()), k=500)
        counts = {value: values.count(value) for value in shares}
        rows.append(
            InputDriftBucket(
                experiment_id=experiment_id,
                field_path="country",
                bucket_start=(start + timedelta(minutes=minute)).timestamp(),
                counts=orjson.dumps(counts).decode(),
            )
        )
    InputDriftBucket.objects.bulk_create(rows)


def _experiment(key: str, kind: str = "ab", **drift: Any) -> Any:
    experiment = start_experiment(
        key,
        kind,
        metrics=[],
        input_drift={
            "fields": [{"path": "country", "kind": "category", "threshold": 0.1}],
            **drift,
        },
    )
    at = later(experiment.started_at, 1)
    add_exposures(experiment.pk, "v1", [f"a{i}" for i in range(50)], at)
    add_exposures(experiment.pk, "v2", [f"b{i}" for i in range(50)], at)
    return experiment


def _window(experiment: Any, minutes: int) -> dict[str, Any]:
    start = experiment.started_at
    return {
        "type": "window",
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=minutes)).isoformat(),
    }


def _run(experiment: Any, seconds: float) -> Any:
    """An analysis run `seconds` after the start, once the windows ended by then are settled."""
    result = services.analysis_run(
        experiment_id=experiment.pk, now=later(experiment.started_at, seconds + grace_s())
    )
    assert result is not None
    return result


def test_a_field_that_moves_away_from_its_reference_window_alerts_once_per_episode(
    slack_url: str, settings: Any
) -> None:
    settings.INPUT_DRIFT_WINDOW_S = 600
    experiment = _experiment("shifting")
    experiment_services.experiment_update(
        actor="test",
        key="shifting",
        input_drift={**experiment.input_drift, "reference": _window(experiment, 10)},
    )
    start = experiment.started_at
    _minutes(experiment.pk, start, 10, {"DE": 0.5, "FR": 0.3, "IT": 0.2})
    # Steady for the first 10-minute window after the reference: within the threshold.
    _minutes(experiment.pk, start + timedelta(minutes=10), 10, {"DE": 0.5, "FR": 0.3, "IT": 0.2})
    report = _run(experiment, 20 * 60).snapshot.health["input_drift"]
    assert report["drifting"] == [] and report["collecting_reference"] is False
    field = report["fields"][0]
    assert field["window"] == 1 and field["psi"] < 0.1 and field["recent_n"] == 5000
    assert field["reference_n"] == 5000 and field["e_threshold"] == pytest.approx(2 / ALPHA)
    # Then the traffic turns mostly Italian: flagged, one alert, the decision stands (warn).
    _minutes(experiment.pk, start + timedelta(minutes=20), 10, {"DE": 0.2, "FR": 0.1, "IT": 0.7})
    for seconds in (30 * 60, 30 * 60 + 5):
        result = _run(experiment, seconds)
        assert result.snapshot.decision == "continue"
        assert "input drift" in result.snapshot.reason
    field = result.snapshot.health["input_drift"]["fields"][0]
    assert field["flagged"] and field["window"] == 2 and field["psi"] > 0.5
    # The p of window 2 carries its share of alpha: p = 1 / (w_2 E_2), w_2 = 1/6.
    assert field["p"] == pytest.approx(6 / field["e_value"]) and field["p"] < 0.05
    assert field["since_n"] == 10_000
    alerts = AlertOutbox.objects.filter(experiment=experiment, kind="input_drift")
    assert alerts.count() == 1
    message = str(alert_delivery.slack_message(alerts[0].payload))
    assert "Input drift" in message and "country" in message
    # Back to normal (window 3 no longer drifts), then drifting again: a new episode.
    _minutes(experiment.pk, start + timedelta(minutes=30), 10, {"DE": 0.5, "FR": 0.3, "IT": 0.2})
    assert _run(experiment, 40 * 60).snapshot.health["input_drift"]["drifting"] == []
    _minutes(experiment.pk, start + timedelta(minutes=40), 10, {"DE": 0.1, "FR": 0.1, "IT": 0.8})
    assert _run(experiment, 50 * 60).snapshot.health["input_drift"]["drifting"] == ["country"]
    assert AlertOutbox.objects.filter(experiment=experiment, kind="input_drift").count() == 2
    # The page: the field's PSI over the runs, with its threshold marked.
    web = Client()
    web.force_login(User.objects.create_user("ann", password="pw-for-tests-only"))
    experiment_services.user_role_assign(actor="test", username="ann", role="admin")
    html = web.get(reverse("analysis:results", args=["shifting"])).content.decode()
    assert "Input drift" in html and "<polyline" in html and "stroke-dasharray" in html
    assert "drifting beyond the threshold" in html


def test_nothing_is_flagged_while_the_reference_window_is_open(settings: Any) -> None:
    settings.INPUT_DRIFT_REFERENCE_S = 3600
    experiment = _experiment("young")
    _minutes(experiment.pk, experiment.started_at, 10, {"DE": 0.5, "IT": 0.5})
    report = _run(experiment, 600).snapshot.health["input_drift"]
    assert report["collecting_reference"] is True and report["drifting"] == []
    assert report["fields"][0]["reference_n"] == 5000 and report["fields"][0]["window"] is None
    assert InputDriftState.objects.get(experiment=experiment).reference_counts == ""


def test_a_run_reads_only_the_windows_closed_since_the_last_one(settings: Any) -> None:
    """The rollup: the reference's counts are kept once it closed, each window is tested once."""
    settings.INPUT_DRIFT_REFERENCE_S = 600
    settings.INPUT_DRIFT_WINDOW_S = 300
    experiment = _experiment("rolled")
    start = experiment.started_at
    steady = {"DE": 0.5, "FR": 0.3, "IT": 0.2}
    _minutes(experiment.pk, start, 15, steady)
    # The reference (two 5-minute windows) and window 1 are summed and kept.
    first = _run(experiment, 15 * 60).snapshot.health["input_drift"]["fields"][0]
    assert (first["window"], first["reference_n"], first["recent_n"]) == (1, 5000, 2500)
    state = InputDriftState.objects.get(experiment=experiment)
    assert state.last_window == 1 and state.since_n == 2500
    kept = orjson.loads(state.reference_counts)
    assert sum(kept.values()) == 5000
    # Buckets that are already rolled up are not read again: deleting them changes nothing,
    # and late rows for a window already tested are not added to it.
    InputDriftBucket.objects.filter(
        experiment_id=experiment.pk, bucket_start__lt=later(start, 15 * 60).timestamp()
    ).delete()
    _minutes(experiment.pk, start + timedelta(minutes=11), 1, {"IT": 1.0})
    again = _run(experiment, 15 * 60 + 30).snapshot.health["input_drift"]["fields"][0]
    assert again == first
    # Window 2 (Italian) is read and tested; the reference is the kept one.
    _minutes(experiment.pk, start + timedelta(minutes=15), 5, {"IT": 1.0})
    second = _run(experiment, 20 * 60).snapshot.health["input_drift"]["fields"][0]
    assert (second["window"], second["reference_n"], second["recent_n"]) == (2, 5000, 2500)
    assert second["flagged"] and second["since_n"] == 5000
    # After an outage, at most MAX_FOLD closed windows are read; older ones are not tested.
    _minutes(experiment.pk, start + timedelta(minutes=20), 30, steady)
    late = _run(experiment, 50 * 60).snapshot.health["input_drift"]["fields"][0]
    assert late["window"] == 8 and not late["flagged"] and late["since_n"] == 5000 + 3 * 2500


def test_a_new_reference_starts_a_new_rollup(settings: Any) -> None:
    settings.INPUT_DRIFT_REFERENCE_S = 600
    settings.INPUT_DRIFT_WINDOW_S = 300
    experiment = _experiment("rebased")
    _minutes(experiment.pk, experiment.started_at, 15, {"DE": 0.5, "FR": 0.5})
    assert _run(experiment, 15 * 60).snapshot.health["input_drift"]["fields"][0]["window"] == 1
    experiment_services.experiment_update(
        actor="test",
        key="rebased",
        input_drift={**experiment.input_drift, "reference": _window(experiment, 5)},
    )
    field = _run(experiment, 15 * 60 + 1).snapshot.health["input_drift"]["fields"][0]
    # Windows of 5 minutes from minute 5: windows 1 and 2 have closed (at most MAX_FOLD read).
    assert field["window"] == 2 and field["reference_n"] == 2500 and field["since_n"] == 5000


def test_a_training_upload_as_reference_and_input_drift_as_a_guardrail_rolls_back(
    slack_url: str, settings: Any
) -> None:
    settings.INPUT_DRIFT_WINDOW_S = 240
    experiment = _experiment(
        "trained",
        action="rollback",
        reference={
            "type": "training",
            "distributions": {"country": {"counts": {"DE": 500, "FR": 300, "IT": 200}}},
        },
    )
    _minutes(experiment.pk, experiment.started_at, 5, {"DE": 0.1, "FR": 0.1, "IT": 0.8})
    # No window has closed yet: nothing is tested.
    assert _run(experiment, 200).snapshot.decision != "rollback"
    # The first 4-minute window from the start has: rolled back.
    assert _run(experiment, 240).snapshot.decision == "rollback"
    evidence = AuditEntry.objects.get(experiment=experiment, action="rollback").after["evidence"]
    assert evidence["metric"] == "input_drift:country" and evidence["margin"] == 0.1
    assert AlertOutbox.objects.filter(experiment=experiment, kind="rollback").count() == 1
    assert not AlertOutbox.objects.filter(experiment=experiment, kind="input_drift").exists()
