"""Per-bucket counts of watched request fields, written off the hot path (input drift).

``add`` merges one sampled request's cells into in-memory counts keyed by (experiment, field,
time bucket) under a lock and returns; a background task hands the counts to a thread that
inserts one ``InputDriftBucket`` row per key every ``RECORDER_FLUSH_S``, and once more on
``stop()``. Memory grows with experiments, fields and buckets between flushes, not with
traffic (a field keeps at most ``MAX_CELLS`` distinct cells per bucket; more become
``(other)``). While the database is unreachable the counts stay and are merged with new
ones, retried after a capped backoff (``routing.observe.backoff``); past ``MAX_KEYS`` keys new
ones are dropped and counted (``rampart_input_drift_dropped_total``). Rows of an experiment
deleted meanwhile are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
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

INPUTS_COUNTED = Counter(
    "rampart_input_drift_values_total", "Watched request-field values counted for input drift"
)
INPUTS_DROPPED = Counter(
    "rampart_input_drift_dropped_total", "Input-drift counts dropped", ["cause"]
)


class InputRecorder:
    """Buffers per-bucket input counts and writes them from a background thread."""

    def __init__(self, *, flush_s: float | None = None) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self._backoff = Backoff(
            base_s=float(settings.RECORDER_BACKOFF_BASE_S),
            max_s=float(settings.RECORDER_BACKOFF_MAX_S),
        )
        self._failure_log = FailureLog(
            logger, "writing input counts", interval_s=float(settings.RECORDER_FAILURE_LOG_S)
        )
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._counts: dict[Key, dict[str, int]] = {}
        # Values counted since the last flush, added to the Prometheus counter there (a
        # request never pays for the counter's own lock).
        self._added = 0
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._counts)

    def add(self, experiment_id: int, bucket: float, cells: list[tuple[str, str]]) -> None:
        with self._lock:
            counts = self._counts
            for path, cell in cells:
                key = (experiment_id, path, bucket)
                found = counts.get(key)
                if found is None:
                    if len(counts) >= MAX_KEYS:
                        INPUTS_DROPPED.labels("buffer_full").inc()
                        continue
                    found = counts[key] = {}
                if cell not in found and len(found) >= MAX_CELLS:
                    cell = OTHER
                found[cell] = found.get(cell, 0) + 1
            self._added += len(cells)

    def _merge_back(self, pending: dict[Key, dict[str, int]]) -> None:
        with self._lock:
            for key, cells in pending.items():
                found = self._counts.setdefault(key, {})
                for cell, n in cells.items():
                    found[cell] = found.get(cell, 0) + n

    def flush_now(self) -> int:
        """Write the counts in the calling thread; returns the rows written."""
        with self._flush_lock:
            with self._lock:
                pending, self._counts = self._counts, {}
                added, self._added = self._added, 0
            INPUTS_COUNTED.inc(added)
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
            try:
                with transaction.atomic():
                    InputDriftBucket.objects.bulk_create(rows)
                return len(rows)
            except IntegrityError:
                return self._one_by_one(rows)
            except DatabaseError:
                self._merge_back(pending)
                raise

    def _one_by_one(self, rows: list[InputDriftBucket]) -> int:
        written = 0
        for row in rows:
            try:
                with transaction.atomic():
                    row.save(force_insert=True)
                written += 1
            except IntegrityError:
                INPUTS_DROPPED.labels("experiment_gone").inc()
        return written

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
        try:
            await loop.run_in_executor(executor, run_with_db, self.flush_now)
        except DatabaseError as error:
            logger.error("stopped with input counts unwritten (%s)", type(error).__name__)
        finally:
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._backoff.current_s or self.flush_s)
            try:
                await loop.run_in_executor(self._executor, run_with_db, self.flush_now)
            except Exception as error:  # the database being down must not stop the loop
                delay = self._backoff.failed()
                self._failure_log.failed(error, f"counts kept, next attempt in {delay:.1f} s")
                continue
            if self._backoff.failures:
                self._backoff.succeeded()
                self._failure_log.succeeded("input counts written again")
