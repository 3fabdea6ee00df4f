"""The few raw-SQL helpers the aggregation queries share (SQLite and PostgreSQL alike)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from django.db import connection


def table(model: Any) -> str:
    """A model's table name, quoted for the current backend."""
    return connection.ops.quote_name(model._meta.db_table)


def db_datetime(value: datetime) -> Any:
    """A datetime as the backend stores it (text on SQLite), for raw-SQL comparisons."""
    return connection.ops.adapt_datetimefield_value(value)


def fetch(sql: str, params: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        yield from cursor.fetchall()
