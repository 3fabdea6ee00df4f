"""Django database connections in the edge's long-lived threads, and their bulk inserts.

The snapshot holder, the exposure recorder, the events API and the readiness check run their
queries on a dedicated thread that outlives any request, so Django's per-request connection
housekeeping never runs there; ``run_with_db`` and ``close_thread_connections`` do it
instead. ``insert_rows`` and ``insert_returning`` are the recorders' multi-row INSERTs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, TypeVar

from django.db import close_old_connections, connection, connections, transaction

_T = TypeVar("_T")


def run_with_db(function: Callable[[], _T]) -> _T:
    """Run ``function`` with Django connections that are fresh before and tidied after.

    Used by the background threads of the snapshot holder and the recorder: a long-lived
    thread must drop connections that broke or outlived CONN_MAX_AGE, as Django does around
    each request.
    """
    close_old_connections()
    try:
        return function()
    finally:
        close_old_connections()


def close_thread_connections() -> None:
    """Close this thread's database connections (at shutdown of a worker thread)."""
    connections.close_all()


def insert_rows(
    table: str, columns: Sequence[str], rows: Sequence[Sequence[object]], *, batch: int
) -> int:
    """INSERT ``rows`` into ``table`` in statements of ``batch`` rows, in one transaction,
    skipping rows that conflict with stored ones; returns the rows inserted.

    Raises Django's database errors (IntegrityError, DataError, ...). Runs on the driver's own
    cursor with its own placeholder: Django's SQLite cursor rewrites each "%s" of a statement
    with a regular expression, about 0.9 µs a row for eight columns, and the edge's flush
    thread would do that work holding the GIL the request loop needs. ``table`` and
    ``columns`` come from code, never from input.
    """
    inserted = 0

    def count(cursor: Any) -> None:
        nonlocal inserted
        inserted += max(cursor.rowcount, 0)

    with transaction.atomic():
        _insert(table, columns, rows, batch, "ON CONFLICT DO NOTHING", count)
    return inserted


def insert_returning(
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    batch: int,
    unique: Sequence[str],
    returning: Sequence[str],
) -> list[tuple[Any, ...]]:
    """``insert_rows`` for claims: the ``returning`` columns of the rows this call inserted,
    those conflicting on ``unique`` with stored rows skipped (SQLite >= 3.35 and PostgreSQL).

    In the caller's transaction when there is one (no savepoint), else in its own.
    """
    inserted: list[tuple[Any, ...]] = []
    with transaction.atomic(savepoint=False):
        _insert(
            table,
            columns,
            rows,
            batch,
            f"ON CONFLICT ({', '.join(unique)}) DO NOTHING RETURNING {', '.join(returning)}",
            lambda cursor: inserted.extend(cursor.fetchall()),
        )
    return inserted


def _insert(
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    batch: int,
    conflict: str,
    after_each: Callable[[Any], None],
) -> None:
    """Multi-row INSERT statements of ``rows``, ``after_each`` given the cursor after each."""
    if not rows:
        return
    marker = "?" if connection.vendor == "sqlite" else "%s"
    one_row = "(" + ", ".join([marker] * len(columns)) + ")"
    head = f"INSERT INTO {connection.ops.quote_name(table)} ({', '.join(columns)}) VALUES "
    with connection.wrap_database_errors:
        cursor = connection.connection.cursor()
        try:
            for start in range(0, len(rows), batch):
                chunk = rows[start : start + batch]
                cursor.execute(
                    f"{head}{', '.join([one_row] * len(chunk))} {conflict}",
                    list(chain.from_iterable(chunk)),
                )
                after_each(cursor)
        finally:
            cursor.close()
