"""Racing transitions: exactly one state change and one audit entry, however many callers race."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from experiments import services
from experiments.errors import InvalidTransition
from experiments.models import AuditEntry, Experiment
from tests.factories import create_experiment

RACERS = 8


def _race(action: Callable[[], services.TransitionResult]) -> list[Any]:
    barrier = threading.Barrier(RACERS)
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            outcome: Any = action()
        except InvalidTransition as exc:
            outcome = exc
        finally:
            connection.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


@pytest.mark.django_db(transaction=True)
def test_racing_starts_make_one_transition(metrics: Any) -> None:
    create_experiment("race")
    results = _race(lambda: services.experiment_start(actor="racer", key="race"))
    assert len(results) == RACERS
    assert sum(1 for r in results if isinstance(r, services.TransitionResult) and r.changed) == 1
    assert AuditEntry.objects.filter(experiment__key="race", action="start").count() == 1
    assert Experiment.objects.get(key="race").status == "running"


@pytest.mark.django_db(transaction=True)
def test_racing_rollbacks_make_one_transition(metrics: Any) -> None:
    create_experiment("race")
    services.experiment_start(actor="t", key="race")
    committed: list[int] = []
    results = _race(
        lambda: services.experiment_rollback(
            actor="worker",
            key="race",
            reason="p95 breach",
            on_commit=lambda experiment: committed.append(experiment.pk),
        )
    )
    assert sum(1 for r in results if r.changed) == 1
    assert AuditEntry.objects.filter(experiment__key="race", action="rollback").count() == 1
    assert len(committed) == 1  # the after-commit hook (alerts) ran exactly once


@pytest.mark.django_db(transaction=True)
def test_racing_ramp_advances_move_one_step(metrics: Any) -> None:
    create_experiment("race")
    services.experiment_start(actor="t", key="race")
    results = _race(
        lambda: services.experiment_advance_ramp(actor="worker", key="race", from_position=0)
    )
    assert sum(1 for r in results if r.changed) == 1
    assert Experiment.objects.get(key="race").ramp_position == 1
    assert AuditEntry.objects.filter(experiment__key="race", action="advance").count() == 1
