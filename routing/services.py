"""Services of the routing app: the writes the edge's background threads make."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django.db import IntegrityError, transaction

from routing.models import Exposure

# Rows per INSERT statement: well under SQLite's 32766 bound variables (4 per row) and
# small enough that one statement never holds the write lock for long.
EXPOSURE_INSERT_BATCH = 1000

ExposureRow = tuple[int, str, str, datetime]


def exposures_insert(*, rows: Sequence[ExposureRow]) -> int:
    """Insert (experiment_id, unit_id, variant_key, first_seen_at) rows, skipping duplicates.

    The unique constraint on (experiment, unit, variant) makes the first write win:
    ``INSERT ... ON CONFLICT DO NOTHING`` on PostgreSQL, ``INSERT OR IGNORE`` on SQLite.
    Returns the number of rows handed to the database. Raises IntegrityError when a row
    names an experiment that no longer exists (see ``exposures_insert_by_experiment``).
    """
    Exposure.objects.bulk_create(
        [
            Exposure(
                experiment_id=experiment_id,
                unit_id=unit_id,
                variant_key=variant_key,
                first_seen_at=first_seen_at,
            )
            for experiment_id, unit_id, variant_key, first_seen_at in rows
        ],
        batch_size=EXPOSURE_INSERT_BATCH,
        ignore_conflicts=True,
    )
    return len(rows)


def exposures_insert_by_experiment(*, rows: Sequence[ExposureRow]) -> tuple[int, int]:
    """Insert rows one experiment at a time; drop the rows of experiments that are gone.

    The fallback after a bulk insert failed on the foreign key: a draft experiment can be
    deleted while its exposures wait in a buffer. Returns (rows written, rows dropped).
    """
    by_experiment: dict[int, list[ExposureRow]] = {}
    for row in rows:
        by_experiment.setdefault(row[0], []).append(row)
    written = dropped = 0
    for group in by_experiment.values():
        try:
            # Foreign keys are checked when the transaction commits, so count after it.
            with transaction.atomic():
                inserted = exposures_insert(rows=group)
        except IntegrityError:
            dropped += len(group)
        else:
            written += inserted
    return written, dropped
