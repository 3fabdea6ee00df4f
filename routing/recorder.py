"""Buffered recording of first exposures: the edge never waits for the database.

``ExposureRecorder.record`` appends a row to an in-memory buffer under a lock and returns.
A background task hands the buffer to a dedicated thread that bulk-inserts it with
"on conflict do nothing" (``routing.services.exposures_insert``) at least every
``RECORDER_FLUSH_S`` seconds, sooner when ``RECORDER_BATCH_ROWS`` rows are waiting, and
once more on ``stop()``.

Bounded memory, nothing dropped silently:
  * a bounded cache (at most ``EXPOSURE_CACHE_SIZE`` entries, roughly least recently
    used evicted) of (experiment, unit, variant) already buffered in this process skips
    repeat requests; an evicted unit is written again and ignored by the unique constraint;
  * when the database is unreachable, rows stay buffered and the flush is retried; past
    ``RECORDER_MAX_BUFFER`` rows, new rows are dropped, counted and logged;
  * rows of an experiment deleted meanwhile are dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError

from routing import metrics
from routing.services import (
    EXPOSURE_INSERT_BATCH,
    ExposureRow,
    exposures_insert,
    exposures_insert_by_experiment,
    exposures_insert_one_by_one,
)
from routing.snapshot import close_thread_connections, run_with_db

logger = logging.getLogger(__name__)

# At most one "buffer full" log line per this many seconds; the counter counts every row.
_DROP_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """Counters of one recorder: rows waiting now, and totals since it was created.

    ``written`` counts rows inserted; a row the unique constraint turned away (the unit
    was already recorded, by another process or before it left the cache) is not counted.
    """

    buffered: int
    written: int
    dropped: int
    skipped_cached: int


class ExposureRecorder:
    """Buffers first exposures and writes them in bulk from a background thread."""

    def __init__(
        self,
        *,
        flush_s: float | None = None,
        batch_rows: int | None = None,
        max_buffer: int | None = None,
        cache_size: int | None = None,
        insert: Callable[[Sequence[ExposureRow]], int] | None = None,
    ) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self.batch_rows = int(settings.RECORDER_BATCH_ROWS if batch_rows is None else batch_rows)
        self.max_buffer = int(settings.RECORDER_MAX_BUFFER if max_buffer is None else max_buffer)
        self.cache_size = int(settings.EXPOSURE_CACHE_SIZE if cache_size is None else cache_size)
        self._insert = insert or _insert_rows
        self._lock = threading.Lock()
        # One flush at a time: the periodic one, a size-triggered one and flush_now() from
        # another thread must not write the same rows twice or reorder retries.
        self._flush_lock = threading.Lock()
        self._buffer: list[ExposureRow] = []
        # Two generations of plain dicts with string keys instead of one LRU OrderedDict:
        # a dict holding only strings is invisible to the cyclic garbage collector, whereas
        # a million-entry OrderedDict of tuples adds ~50 ms to every full collection, a
        # pause every request in flight would wait for. A unit seen in the older generation
        # is promoted; when the recent one holds half the cache, it becomes the older one.
        self._recent: dict[str, None] = {}
        self._older: dict[str, None] = {}
        self._generation_size = max(self.cache_size // 2, 1)
        self._written = 0
        self._dropped = 0
        self._skipped = 0
        self._accepted = 0
        self._published_accepted = 0
        self._published_skipped = 0
        self._last_drop_log = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def stats(self) -> RecorderStats:
        with self._lock:
            return RecorderStats(
                buffered=len(self._buffer),
                written=self._written,
                dropped=self._dropped,
                skipped_cached=self._skipped,
            )

    def record(
        self, *, experiment_id: int, unit_id: str, variant_key: str, at: datetime | None = None
    ) -> bool:
        """Buffer the exposure unless this process already did; never blocks on I/O.

        False when the exposure was dropped because the buffer is full.
        """
        key = f"{experiment_id}\x1f{variant_key}\x1f{unit_id}"
        with self._lock:
            if key in self._recent:
                self._skipped += 1
                return True
            if key in self._older:
                self._skipped += 1
                self._remember(key)
                return True
            buffer = self._buffer
            if len(buffer) >= self.max_buffer:
                self._drop_locked(1, "buffer_full")
                return False
            seconds = time.time() if at is None else at.timestamp()
            buffer.append((experiment_id, unit_id, variant_key, seconds))
            self._accepted += 1
            self._remember(key)
            due = len(buffer) >= self.batch_rows
        if due:
            self._wake()
        return True

    def _remember(self, key: str) -> None:
        recent = self._recent
        recent[key] = None
        if len(recent) >= self._generation_size:
            self._older = recent
            self._recent = {}

    def flush_now(self) -> int:
        """Write everything buffered, in the calling thread; returns rows inserted.

        On a database error the rows go back to the front of the buffer for the next flush.
        """
        with self._flush_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            written = 0
            # One statement per chunk: the flush thread shares the GIL with the request
            # loop, and the database call between chunks releases it, so no request waits
            # behind more than one chunk's worth of Python work.
            for start in range(0, len(rows), EXPOSURE_INSERT_BATCH):
                inserted = self._write(rows[start : start + EXPOSURE_INSERT_BATCH])
                if inserted is None:
                    self._requeue(rows[start:])
                    break
                written += inserted
            self._publish_metrics()
            return written

    def _write(self, rows: list[ExposureRow]) -> int | None:
        """Insert one chunk; the rows inserted, or None if the database failed."""
        dropped = refused = 0
        try:
            try:
                written = self._insert(rows)
            except IntegrityError:
                written, dropped = exposures_insert_by_experiment(rows=rows)
            except DataError:
                written, refused = exposures_insert_one_by_one(rows=rows)
        except DatabaseError:
            metrics.RECORDER_FLUSH_ERRORS.inc()
            logger.exception("writing exposures failed; keeping them for the next flush")
            return None
        with self._lock:
            self._written += written
            if dropped:
                self._drop_locked(dropped, "experiment_gone", force_log=True)
            if refused:
                self._drop_locked(refused, "refused_by_database", force_log=True)
        metrics.RECORDER_WRITTEN.inc(written)
        return written

    def _requeue(self, rows: list[ExposureRow]) -> None:
        with self._lock:
            room = max(self.max_buffer - len(self._buffer), 0)
            kept = rows[:room]
            self._buffer[:0] = kept
            if len(rows) > len(kept):
                self._drop_locked(len(rows) - len(kept), "buffer_full", force_log=True)

    def _drop_locked(self, count: int, cause: str, *, force_log: bool = False) -> None:
        """Count dropped rows (the caller holds ``_lock``) and log, at most every 10 s."""
        self._dropped += count
        metrics.RECORDER_DROPPED.labels(cause).inc(count)
        now = time.monotonic()
        if force_log or now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            logger.error(
                "dropped %d exposure row(s) (%s); %d dropped in total, %d buffered",
                count,
                cause,
                self._dropped,
                len(self._buffer),
            )

    def _publish_metrics(self) -> None:
        with self._lock:
            accepted, self._published_accepted = (
                self._accepted - self._published_accepted,
                self._accepted,
            )
            skipped, self._published_skipped = (
                self._skipped - self._published_skipped,
                self._skipped,
            )
            buffered = len(self._buffer)
        metrics.RECORDER_ACCEPTED.inc(accepted)
        metrics.RECORDER_SKIPPED.inc(skipped)
        metrics.RECORDER_BUFFERED.set(buffered)

    def _wake(self) -> None:
        wakeup, loop = self._wakeup, self._loop
        if wakeup is None or loop is None or wakeup.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            wakeup.set()
        else:
            loop.call_soon_threadsafe(wakeup.set)

    async def start(self) -> None:
        """Start flushing in the background (at least every ``flush_s`` seconds)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-exposures")
        self._task = asyncio.create_task(self._run(), name="rampart-exposure-flush")

    async def stop(self) -> None:
        """Stop the background task and flush what is left."""
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
        finally:
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)
            self._wakeup = None
            self._loop = None
        left = self.stats.buffered
        if left:
            logger.error("stopped with %d exposure row(s) unwritten", left)

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.flush_s)
            self._wakeup.clear()
            try:
                await loop.run_in_executor(self._executor, run_with_db, self.flush_now)
            except Exception:
                metrics.RECORDER_FLUSH_ERRORS.inc()
                logger.exception("exposure flush failed")


def _insert_rows(rows: Sequence[ExposureRow]) -> int:
    return exposures_insert(rows=rows)
