"""Folding an experiment's backlog of business events into its rollup, a chunk at a time.

An analysis run (``analysis.services``) folds a small backlog itself; a larger one is left to
``analysis.fold_events`` tasks (``analysis.followup_tasks``), each of which folds one chunk
here, so no run waits for a big fold.
"""

from __future__ import annotations

from django.db import transaction

from analysis.aggregation import fold_unit_events, metric_event_windows
from analysis.models import AnalysisState
from experiments import selectors as experiment_selectors
from experiments.contracts import ExperimentView

# Event ids one ``analysis.fold_events`` task folds.
FOLD_CHUNK = 500_000


def event_windows(view: ExperimentView) -> list[tuple[str, int]]:
    return metric_event_windows([use.metric for use in view.metrics])


def events_fold(*, experiment_id: int, limit: int = FOLD_CHUNK) -> int:
    """Fold one chunk of settled events into the rollup; returns the ids still to fold."""
    view = experiment_selectors.experiment_view_by_id(experiment_id=experiment_id)
    if view is None:
        return 0
    with transaction.atomic():
        state = (
            AnalysisState.objects.select_for_update().filter(experiment_id=experiment_id).first()
        )
        if state is None:
            return 0
        remaining = fold_unit_events(state=state, event_windows=event_windows(view), limit=limit)
        state.save(update_fields=["event_cursor"])
    return remaining
