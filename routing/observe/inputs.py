"""Per-bucket counts of watched request fields, written off the hot path (input drift).

The proxy counts a sampled request's cells straight into the open bucket of its experiment
(``slot``: one dict lookup, then plain dict increments; no lock, because counting and
``take`` both run on the event loop's thread). Every ``RECORDER_FLUSH_S`` the background task
takes the counts on the loop and hands them to a thread that inserts one
``InputDriftBucket`` row per (experiment, field, bucket); once more on ``stop()``. Memory
grows with experiments, fields and buckets between flushes, not with traffic (a field keeps
at most ``MAX_CELLS`` distinct cells per bucket; more become ``(other)``). While the database
is unreachable the counts are merged back and retried after a capped backoff
(``routing.observe.backoff``); past ``MAX_KEYS`` waiting keys the oldest are dropped and
counted (``rampart_input_drift_dropped_total``). Rows of an experiment deleted meanwhile are
dropped.

The proxy counts a sampled user once per window (``first_in_window``): one set of the window's
users' hashes per experiment, replaced when the window changes, at most ``cap`` users (then
the window's later new users are dropped and counted, cause ``users_cap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Final

import orjson
from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from prometheus_client import Counter

from routing.db import close_thread_connections, run_with_db
from routing.models import InputDriftBucket
from routing.observe.backoff import Backoff, FailureLog

logger = logging.getLogger(__name__)

MAX_CELLS: Final = 50
MAX_KEYS: Final = 20_000
OTHER: Final = "(other)"
Key = tuple[int, str, float]
# field path -> cell -> count, for one experiment and bucket
Cells = dict[str, dict[str, int]]

INPUTS_COUNTED = Counter(
    "rampart_input_drift_values_total", "Watched request-field values counted for input drift"
)
INPUTS_DROPPED = Counter(
    "rampart_input_drift_dropped_total", "Input-drift counts dropped", ["cause"]
)


def count(cells: Cells, path: str, cell: str) -> None:
    """Add one value of field `path` to an open bucket (at most MAX_CELLS cells per field)."""
    found = cells.get(path)
    if found is None:
        found = cells[path] = {}
    n = found.get(cell)
    if n is not None:
        found[cell] = n + 1
    elif len(found) < MAX_CELLS:
        found[cell] = 1
    else:
        found[OTHER] = found.get(OTHER, 0) + 1


class InputRecorder:
    """Per-bucket input counts, written in bulk from a background thread."""

    def __init__(self, *, flush_s: float | None = None) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self._backoff = Backoff(
            base_s=float(settings.RECORDER_BACKOFF_BASE_S),
            max_s=float(settings.RECORDER_BACKOFF_MAX_S),
        )
        self._failure_log = FailureLog(
            logger, "writing input counts", interval_s=float(settings.RECORDER_FAILURE_LOG_S)
        )
        # experiment -> (bucket start, its counts): the bucket requests count into now.
        self._open: dict[int, tuple[float, Cells]] = {}
        # Closed buckets (and counts a failed flush gave back), waiting for the next flush.
        self._waiting: dict[Key, dict[str, int]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        # experiment -> (window, hashes of the users counted in it by this process).
        self._users: dict[int, tuple[object, set[int]]] = {}

    def first_in_window(self, experiment_id: int, window: object, user: int, cap: int) -> bool:
        """Whether `user` is new in `experiment_id`'s `window` (then remembered; event loop)."""
        current = self._users.get(experiment_id)
        if current is None or current[0] != window:
            current = self._users[experiment_id] = (window, set())
        seen = current[1]
        if user in seen:
            return False
        if len(seen) >= cap:
            INPUTS_DROPPED.labels("users_cap").inc()
            return False
        seen.add(user)
        return True

    def slot(self, experiment_id: int, bucket: float) -> Cells:
        """The counts of `experiment_id`'s bucket starting at `bucket` (event loop only)."""
        current = self._open.get(experiment_id)
        if current is not None:
            if current[0] == bucket:
                return current[1]
            self._close(experiment_id, current)
        cells: Cells = {}
        self._open[experiment_id] = (bucket, cells)
        return cells

    def _close(self, experiment_id: int, current: tuple[float, Cells]) -> None:
        bucket, cells = current
        for path, found in cells.items():
            self._merge((experiment_id, path, bucket), found)

    def _merge(self, key: Key, found: dict[str, int]) -> None:
        waiting = self._waiting
        target = waiting.get(key)
        if target is None:
            if len(waiting) >= MAX_KEYS:
                INPUTS_DROPPED.labels("buffer_full").inc(sum(found.values()))
                return
            waiting[key] = dict(found)
            return
        for cell, n in found.items():
            target[cell] = target.get(cell, 0) + n

    def take(self) -> dict[Key, dict[str, int]]:
        """Everything counted so far, open buckets included (event loop only)."""
        for experiment_id, current in self._open.items():
            self._close(experiment_id, current)
        self._open = {}
        pending, self._waiting = self._waiting, {}
        return pending

    def give_back(self, pending: dict[Key, dict[str, int]]) -> None:
        """Counts a failed flush could not write, merged with newer ones (event loop only)."""
        for key, found in pending.items():
            self._merge(key, found)

    @property
    def buffered(self) -> int:
        return len(self._waiting) + sum(len(cells) for _, cells in self._open.values())

    def flush_now(self) -> int:
        """Take and write everything in the calling thread (tests; no loop running)."""
        pending = self.take()
        try:
            return write(pending)
        except DatabaseError:
            self.give_back(pending)
            raise

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-inputs")
        self._task = asyncio.create_task(self._run(), name="rampart-input-flush")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        pending = self.take()
        try:
            await loop.run_in_executor(executor, run_with_db, partial(write, pending))
        except DatabaseError as error:
            logger.error("stopped with input counts unwritten (%s)", type(error).__name__)
        finally:
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._backoff.current_s or self.flush_s)
            pending = self.take()
            if not pending:
                continue
            try:
                await loop.run_in_executor(self._executor, run_with_db, partial(write, pending))
            except Exception as error:  # the database being down must not stop the loop
                self.give_back(pending)
                delay = self._backoff.failed()
                self._failure_log.failed(error, f"counts kept, next attempt in {delay:.1f} s")
                continue
            if self._backoff.failures:
                self._backoff.succeeded()
                self._failure_log.succeeded("input counts written again")


def write(pending: dict[Key, dict[str, int]]) -> int:
    """Insert one row per key; returns the rows written (rows of deleted experiments dropped)."""
    if not pending:
        return 0
    rows = [
        InputDriftBucket(
            experiment_id=experiment_id,
            field_path=path,
            bucket_start=bucket,
            counts=orjson.dumps(cells).decode(),
        )
        for (experiment_id, path, bucket), cells in pending.items()
    ]
    INPUTS_COUNTED.inc(sum(sum(cells.values()) for cells in pending.values()))
    try:
        with transaction.atomic():
            InputDriftBucket.objects.bulk_create(rows)
        return len(rows)
    except IntegrityError:
        pass
    written = 0
    for row in rows:
        try:
            with transaction.atomic():
                row.save(force_insert=True)
            written += 1
        except IntegrityError:
            INPUTS_DROPPED.labels("experiment_gone").inc()
    return written
