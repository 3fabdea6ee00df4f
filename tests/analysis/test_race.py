"""Two workers analysing the same experiment at the same moment roll it back exactly once."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection

from analysis import alerts, services
from analysis.models import AlertOutbox, ResultSnapshot
from experiments.models import AuditEntry, Experiment
from tests.analysis.conftest import later, start_experiment, traffic

WORKERS = 4


@pytest.mark.django_db(transaction=True)
def test_racing_workers_roll_back_once_with_one_alert(
    metrics: Any, slack_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduled: list[int] = []
    monkeypatch.setattr(alerts, "schedule_delivery", lambda: scheduled.append(1))
    experiment = start_experiment("race", ramp=[(0.5, 3600, 10), (1.0, 0, 0)])
    at = later(experiment.step_started_at, 30)
    traffic(experiment, control_n=500, canary_n=500, at=later(at, -10), unit_prefix="w", users=True)
    traffic(experiment, control_n=2000, canary_n=2000, canary_slowdown=1.4, at=at, users=True)
    barrier = threading.Barrier(WORKERS)
    outcomes: list[Any] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            # After the bucket at `at` has closed (the quantile guardrail reads closed ones).
            outcomes.append(services.analysis_run(experiment_id=experiment.pk, now=later(at, 15)))
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    acted = [o for o in outcomes if o is not None and o.action_taken]
    assert len(acted) == 1
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    assert AuditEntry.objects.filter(experiment_id=experiment.pk, action="rollback").count() == 1
    assert AlertOutbox.objects.filter(experiment_id=experiment.pk).count() == 1
    assert (
        ResultSnapshot.objects.filter(experiment_id=experiment.pk, decision="rollback").count() == 1
    )
    assert scheduled == [1]
    # On PostgreSQL the workers really overlapped on row locks; SQLite serialises writers.
    assert connection.vendor in ("postgresql", "sqlite")
