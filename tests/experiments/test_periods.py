"""Traffic periods of an experiment, read from its real audit trail (experiments.periods)."""

from __future__ import annotations

from typing import Any

import pytest

from experiments import services
from experiments.models import AuditEntry
from experiments.periods import step_periods
from tests.analysis.conftest import start_experiment

pytestmark = pytest.mark.django_db


def _times(key: str) -> dict[str, list[Any]]:
    times: dict[str, list[Any]] = {}
    for entry in AuditEntry.objects.filter(experiment__key=key).order_by("created_at", "id"):
        times.setdefault(entry.action, []).append(entry.created_at)
    return times


def test_a_canary_ramp_with_a_pause_and_a_rollback(metrics: Any) -> None:
    experiment = start_experiment(
        "ramped", ramp=[(0.01, 0, 0), (0.05, 0, 0), (0.25, 0, 0), (1.0, 0, 0)]
    )
    services.experiment_advance_ramp(actor="test", key="ramped", from_position=0)
    services.experiment_pause(actor="test", key="ramped", reason="look at the logs")
    services.experiment_resume(actor="test", key="ramped")
    services.experiment_advance_ramp(actor="test", key="ramped", from_position=1)
    services.experiment_rollback(actor="test", key="ramped", reason="conversion fell")
    periods = step_periods(experiment_id=experiment.pk)
    times = _times("ramped")
    assert [(p.state, p.step_position) for p in periods] == [
        ("running", 0),
        ("running", 1),
        ("paused", None),
        ("running", 1),
        ("running", 2),
        ("ended", None),
    ]
    starts = [
        times["start"][0],
        times["advance"][0],
        times["pause"][0],
        times["resume"][0],
        times["advance"][1],
        times["rollback"][0],
    ]
    assert [p.start for p in periods] == starts
    assert [p.end for p in periods] == [*starts[1:], None]
    assert [p.index for p in periods] == list(range(6))
    assert periods[0].shares == pytest.approx({"v1": 0.99, "v2": 0.01})
    assert periods[1].shares == pytest.approx({"v1": 0.95, "v2": 0.05})
    assert periods[2].shares == {"v1": 1.0} and not periods[2].compares_arms
    assert periods[3].shares == periods[1].shares and periods[3].compares_arms
    assert periods[4].shares == pytest.approx({"v1": 0.75, "v2": 0.25})
    assert periods[5].shares == {"v1": 1.0}


def test_an_ab_test_that_never_paused_has_one_period(metrics: Any) -> None:
    experiment = start_experiment("split", kind="ab", ramp=[])
    services.experiment_update(actor="test", key="split", name="Renamed")  # not a split change
    (period,) = step_periods(experiment_id=experiment.pk)
    assert period.state == "running" and period.step_position is None and period.end is None
    assert period.shares == {"v1": 0.5, "v2": 0.5}
    assert period.start == _times("split")["start"][0]


def test_no_periods_before_the_start_or_for_an_unknown_experiment(metrics: Any) -> None:
    from tests.factories import create_experiment

    draft = create_experiment("draft")
    assert step_periods(experiment_id=draft.pk) == ()
    assert step_periods(experiment_id=10**9) == ()
