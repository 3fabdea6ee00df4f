"""Writing a flush of the observation aggregator (``routing.observe.observations``).

Runs in the aggregator's writer thread: the users' cost events, window counts and LLM sums,
then the per-bucket cells, each in its own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from routing.observe.llm_costs import CostRow
from routing.observe.unit_llm import LLMUnitRow, write_llm_unit_rows
from routing.observe.unit_outcomes import UnitRow, write_unit_rows


def write_all(
    rows: Sequence[dict[str, object]],
    unit_rows: Sequence[UnitRow],
    *,
    batch_rows: int,
    cost_rows: Sequence[CostRow] = (),
    llm_rows: Sequence[LLMUnitRow] = (),
) -> int:
    """Write the users' cost events, window counts and LLM sums, then the cells; returns cell
    rows.

    Separate transactions (PostgreSQL checks the foreign keys at commit, where each writer's
    fallback for deleted experiments catches the error): the exception says from which write
    on nothing was written (`CostsUnwritten`, `UnitsUnwritten`, `LLMUnitsUnwritten`); a failure
    after them concerns the cells only.
    """
    from django.db import close_old_connections

    if cost_rows:
        from routing.observe.event_store import events_insert

        close_old_connections()
        try:
            events_insert(rows=cost_rows, received_at=datetime.now(tz=UTC))
        except Exception as exc:
            raise CostsUnwritten from exc
    if unit_rows:
        close_old_connections()
        try:
            write_unit_rows(unit_rows)
        except Exception as exc:
            raise UnitsUnwritten from exc
    if llm_rows:
        close_old_connections()
        try:
            write_llm_unit_rows(llm_rows)
        except Exception as exc:
            raise LLMUnitsUnwritten from exc
    return write_observation_rows(rows, batch_rows=batch_rows)


class LLMUnitsUnwritten(Exception):
    """The users' LLM sums of a flush were not written (the cells neither)."""


class UnitsUnwritten(LLMUnitsUnwritten):
    """The users' window counts of a flush were not written (nor the LLM sums, nor the cells)."""


class CostsUnwritten(UnitsUnwritten):
    """The users' cost events were not written (nor anything after them)."""


def write_observation_rows(rows: Sequence[dict[str, object]], *, batch_rows: int) -> int:
    """Append rows to ObservationBucket; rows of experiments deleted meanwhile are skipped."""
    # Imported here so that the aggregator can be used (and unit-tested) without Django set up;
    # this function only ever runs in a process where it is.
    from django.db import IntegrityError, close_old_connections, transaction

    from routing.models import ObservationBucket

    if not rows:
        return 0
    close_old_connections()
    objects = [ObservationBucket(**row) for row in rows]
    try:
        with transaction.atomic():
            ObservationBucket.objects.bulk_create(objects, batch_size=batch_rows)
    except IntegrityError:
        # An experiment deleted between the request and the flush fails the foreign key for
        # the whole batch; keep the rows whose experiment still exists.
        from experiments.selectors import experiment_view_by_id

        existing = {
            experiment_id
            for experiment_id in {row.experiment_id for row in objects}
            if experiment_view_by_id(experiment_id=experiment_id) is not None
        }
        objects = [row for row in objects if row.experiment_id in existing]
        with transaction.atomic():
            ObservationBucket.objects.bulk_create(objects, batch_size=batch_rows)
    return len(objects)


def close_connections() -> None:
    from django.db import connections

    connections.close_all()
