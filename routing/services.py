"""Services of the routing app: the writes the edge's background threads make."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django.db import IntegrityError, connection, transaction

from routing.models import Exposure

# Rows per INSERT statement. Building one statement's parameters costs the edge's flush
# thread about 1.5 ms of Python for 250 rows (measured on SQLite), time in which the request
# loop cannot run; the database call that follows releases the GIL. Larger statements save
# little: per-row work dominates from about 100 rows on.
EXPOSURE_INSERT_BATCH = 250

ExposureRow = tuple[int, str, str, datetime]


def exposures_insert(*, rows: Sequence[ExposureRow]) -> int:
    """Insert (experiment_id, unit_id, variant_key, first_seen_at) rows, skipping duplicates.

    The unique constraint on (experiment, unit, variant) makes the first write win
    (``INSERT ... ON CONFLICT DO NOTHING``, which PostgreSQL and SQLite >= 3.24 both
    speak). Multi-row INSERTs built here instead of ``bulk_create``: the edge's flush thread
    shares the GIL with the request loop, and model instances cost it ten times the Python
    work. Returns the number of rows actually inserted. Raises IntegrityError when a row
    names an experiment that no longer exists (see ``exposures_insert_by_experiment``).
    """
    if not rows:
        return 0
    table = connection.ops.quote_name(Exposure._meta.db_table)
    adapt = connection.ops.adapt_datetimefield_value
    inserted = 0
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, len(rows), EXPOSURE_INSERT_BATCH):
            chunk = rows[start : start + EXPOSURE_INSERT_BATCH]
            params: list[object] = []
            for experiment_id, unit_id, variant_key, first_seen_at in chunk:
                params.extend((experiment_id, unit_id, variant_key, adapt(first_seen_at)))
            values = ", ".join(["(%s, %s, %s, %s)"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {table} (experiment_id, unit_id, variant_key, first_seen_at) "
                f"VALUES {values} ON CONFLICT DO NOTHING",
                params,
            )
            inserted += max(cursor.rowcount, 0)
    return inserted


def exposures_insert_by_experiment(*, rows: Sequence[ExposureRow]) -> tuple[int, int]:
    """Insert rows one experiment at a time; drop the rows of experiments that are gone.

    The fallback after a bulk insert failed on the foreign key: a draft experiment can be
    deleted while its exposures wait in a buffer. Returns (rows inserted, rows dropped).
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
