"""Services of the routing app: the writes the edge's background threads make."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from django.db import DataError, IntegrityError, connection, transaction

from routing.db import insert_rows
from routing.models import Exposure

# Rows per INSERT statement. Building one statement's parameters costs the edge's flush
# thread about 1.5 ms of Python for 250 rows (measured on SQLite), time in which the request
# loop cannot run; the database call that follows releases the GIL. Larger statements save
# little: per-row work dominates from about 100 rows on.
EXPOSURE_INSERT_BATCH = 250

# (experiment_id, unit_id, variant_key, first_seen_at as Unix seconds).
ExposureRow = tuple[int, str, str, float]


def exposures_insert(*, rows: Sequence[ExposureRow]) -> int:
    """Insert exposure rows, skipping duplicates; returns the rows actually inserted.

    The unique constraint on (experiment, unit, variant) makes the first write win
    (``INSERT ... ON CONFLICT DO NOTHING``, which PostgreSQL and SQLite >= 3.24 both
    speak). Multi-row INSERTs built here instead of ``bulk_create``: the edge's flush thread
    shares the GIL with the request loop, and model instances cost it several times the
    Python work. Raises IntegrityError when a row names an experiment that no longer exists
    (see ``exposures_insert_by_experiment``).
    """
    if not rows:
        return 0
    to_db = _timestamp_adapter()
    return insert_rows(
        Exposure._meta.db_table,
        ("experiment_id", "unit_id", "variant_key", "first_seen_at"),
        [(experiment, unit, variant, to_db(seen)) for experiment, unit, variant, seen in rows],
        batch=EXPOSURE_INSERT_BATCH,
    )


def _timestamp_adapter() -> Callable[[float], object]:
    """Unix seconds -> the value this connection stores in a DateTimeField.

    Django's generic adapter (``adapt_datetimefield_value``) costs ~4 µs a row on SQLite,
    most of it converting time zones; with the database in UTC (Django's default when the
    DATABASES entry sets no TIME_ZONE) the stored text is simply the naive UTC time, which
    ``_sqlite_utc_text`` writes in a fraction of that.
    """
    if connection.vendor == "sqlite" and connection.timezone_name == "UTC":
        return _sqlite_utc_text
    adapt = connection.ops.adapt_datetimefield_value

    def generic(seconds: float) -> object:
        return adapt(datetime.fromtimestamp(seconds, UTC))

    return generic


@functools.lru_cache(maxsize=4096)
def _utc_second_text(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))


def _sqlite_utc_text(seconds: float) -> str:
    """``str(naive UTC datetime)``, the format Django's SQLite backend stores and parses."""
    second, micro = divmod(round(seconds * 1_000_000), 1_000_000)
    return f"{_utc_second_text(second)}.{micro:06d}"


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


def exposures_insert_one_by_one(*, rows: Sequence[ExposureRow]) -> tuple[int, int]:
    """Insert rows singly, dropping the ones the database refuses as data.

    The fallback after a chunk failed with DataError (PostgreSQL refuses a NUL character or a
    unit id longer than the column): without it one such row would send its whole chunk back
    to the buffer at every flush forever. Returns (rows inserted, rows refused).
    """
    written = refused = 0
    for row in rows:
        try:
            with transaction.atomic():
                written += exposures_insert(rows=[row])
        except (DataError, IntegrityError):
            refused += 1
    return written, refused
