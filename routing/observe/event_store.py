"""Business events into the database: one transaction per batch, stored event ids skipped.

Shared by the events API (``routing.edge.ingest``) and the observation flusher, which writes
the proxy's per-user LLM cost as events (``routing.observe.observations``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from django.db import connection, transaction

from routing.models import Event

# (event_id, unit_id, name, value, timestamp)
EventRow = tuple[str, str, str, float, datetime]

_STAGING_TABLE: Final = "rampart_event_staging"
# Connections on which the staging table exists (it lives as long as the session).
_staged_connections: weakref.WeakSet[Any] = weakref.WeakSet()


def events_insert(*, rows: Sequence[EventRow], received_at: datetime) -> int:
    """Insert events in one transaction, skipping event_ids already stored; returns inserted.

    ``rows`` must not repeat an event_id (``parse_events`` keeps the first). On PostgreSQL
    rows are inserted in event_id order, so two batches racing on the same ids take the
    unique index's locks in the same order and cannot deadlock each other; SQLite has one
    writer at a time.
    """
    if not rows:
        return 0
    with transaction.atomic():
        if connection.vendor == "postgresql":
            inserted = _insert_postgresql(rows, received_at)
        else:
            inserted = _insert_rows(rows, received_at)
    if connection.vendor == "postgresql":
        # Only now: a rolled-back transaction takes the table it created with it.
        _staged_connections.add(connection.connection)
    return inserted


def _insert_postgresql(rows: Sequence[EventRow], received_at: datetime) -> int:
    table = connection.ops.quote_name(Event._meta.db_table)
    with connection.cursor() as wrapper:
        cursor = wrapper.cursor  # the psycopg cursor, for COPY
        if connection.connection not in _staged_connections:
            # Temporary, so it is private to this connection and skips the WAL; emptied by
            # every commit, so each batch starts from an empty table.
            cursor.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGING_TABLE} ("
                "event_id text, unit_id text, name text, value double precision, "
                "timestamp timestamptz) ON COMMIT DELETE ROWS"
            )
        copy_sql = f"COPY {_STAGING_TABLE} (event_id, unit_id, name, value, timestamp) FROM STDIN"
        with cursor.copy(copy_sql) as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f"INSERT INTO {table} (event_id, unit_id, name, value, timestamp, received_at) "
            f"SELECT event_id, unit_id, name, value, timestamp, %s FROM {_STAGING_TABLE} "
            'ORDER BY event_id COLLATE "C" ON CONFLICT (event_id) DO NOTHING',
            [received_at],
        )
        return int(cursor.rowcount)


def _insert_rows(rows: Sequence[EventRow], received_at: datetime) -> int:
    table = connection.ops.quote_name(Event._meta.db_table)
    adapt = connection.ops.adapt_datetimefield_value
    received = adapt(received_at)
    adapted: dict[datetime, Any] = {}
    params = []
    for event_id, unit_id, name, value, timestamp in rows:
        stored = adapted.get(timestamp)
        if stored is None:
            stored = adapted[timestamp] = adapt(timestamp)
        params.append((event_id, unit_id, name, value, stored, received))
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {table} (event_id, unit_id, name, value, timestamp, received_at) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
            params,
        )
        # sqlite3 sums the rows changed by every statement of an executemany; a skipped
        # conflict changes none.
        return int(cursor.rowcount)
