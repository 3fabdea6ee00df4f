"""Django database connections in the edge's long-lived threads: fresh before, tidied after.

The snapshot holder, the exposure recorder, the events API and the readiness check run their
queries on a dedicated thread that outlives any request, so Django's per-request connection
housekeeping never runs there; these two functions do it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.db import close_old_connections, connections

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
