"""Celery tasks of the analysis pipeline: thin, idempotent, by id; the services do the work.

The tasks the services queue after a commit (fold an event backlog, deliver alerts) are in
``analysis.followup_tasks``, which the services import, so a worker that loads this module
registers them as well.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from analysis import services


@shared_task(name="analysis.fan_out", acks_late=True, ignore_result=True)
def analysis_fan_out() -> int:
    """Beat's entry point: one `analysis.run` per running experiment.

    The runs expire after one interval, so a backlog built while workers were down does not
    replay stale looks: the next fan-out brings fresh ones.
    """
    interval = float(settings.ANALYSIS_INTERVAL_S)
    ids = services.running_experiment_ids()
    for experiment_id in ids:
        analysis_run.apply_async(kwargs={"experiment_id": experiment_id}, expires=interval)
    return len(ids)


@shared_task(name="analysis.run", acks_late=True, ignore_result=True)
def analysis_run(*, experiment_id: int) -> str | None:
    """Analyse one experiment and act; a missing or stopped experiment is a no-op."""
    result = services.analysis_run(experiment_id=experiment_id)
    return None if result is None else result.snapshot.decision
