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
  * while flushes fail, the next one waits a capped exponential backoff with jitter
    (``RECORDER_BACKOFF_BASE_S`` to ``RECORDER_BACKOFF_MAX_S``, ``routing.observe.backoff``) and
    full buffers do not wake it early; the failures are logged once per
    ``RECORDER_FAILURE_LOG_S`` with counts, and ``/metrics`` shows the rows waiting, the
    failed flushes and the current backoff;
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

from routing.db import close_thread_connections, run_with_db
from routing.observe import metrics
from routing.observe.backoff import Backoff, FailureLog
from routing.services import (
    EXPOSURE_INSERT_BATCH,
    ExposureRow,
    exposures_insert,
    exposures_insert_by_experiment,
    exposures_insert_one_by_one,
)

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
    failed_flushes: int = 0


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
        backoff_base_s: float | None = None,
        backoff_max_s: float | None = None,
        failure_log_s: float | None = None,
    ) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self.batch_rows = int(settings.RECORDER_BATCH_ROWS if batch_rows is None else batch_rows)
        self.max_buffer = int(settings.RECORDER_MAX_BUFFER if max_buffer is None else max_buffer)
        self.cache_size = int(settings.EXPOSURE_CACHE_SIZE if cache_size is None else cache_size)
        self._insert = insert or _insert_rows
        self._backoff = Backoff(
            base_s=float(
                settings.RECORDER_BACKOFF_BASE_S if backoff_base_s is None else backoff_base_s
            ),
            max_s=float(
                settings.RECORDER_BACKOFF_MAX_S if backoff_max_s is None else backoff_max_s
            ),
        )
        self._failure_log = FailureLog(
            logger,
            "writing exposures",
            interval_s=float(
                settings.RECORDER_FAILURE_LOG_S if failure_log_s is None else failure_log_s
            ),
        )
        self._backoff_gauge = metrics.FLUSH_BACKOFF.labels("exposures")
        self._failed_flushes = 0
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
                failed_flushes=self._failed_flushes,
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
        return self._flush()[0]

    def _flush(self) -> tuple[int, DatabaseError | None]:
        """Write everything buffered: rows inserted, and the database error that stopped it."""
        with self._flush_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            written = 0
            error = None
            # One statement per chunk: the flush thread shares the GIL with the request
            # loop, and the database call between chunks releases it, so no request waits
            # behind more than one chunk's worth of Python work.
            for start in range(0, len(rows), EXPOSURE_INSERT_BATCH):
                inserted = self._write(rows[start : start + EXPOSURE_INSERT_BATCH])
                if isinstance(inserted, DatabaseError):
                    error = inserted
                    self._requeue(rows[start:])
                    break
                written += inserted
            self._publish_metrics()
            return written, error

    def _write(self, rows: list[ExposureRow]) -> int | DatabaseError:
        """Insert one chunk; the rows inserted, or the error if the database failed."""
        dropped = refused = 0
        try:
            try:
                written = self._insert(rows)
            except IntegrityError:
                written, dropped = exposures_insert_by_experiment(rows=rows)
            except DataError:
                written, refused = exposures_insert_one_by_one(rows=rows)
        except DatabaseError as error:
            # Logged by the caller of _flush, at most once per RECORDER_FAILURE_LOG_S.
            metrics.RECORDER_FLUSH_ERRORS.inc()
            with self._lock:
                self._failed_flushes += 1
            return error
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
            _, error = await loop.run_in_executor(executor, run_with_db, self._flush)
            self._after_flush(error)
        finally:
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)
            self._wakeup = None
            self._loop = None
        left = self.stats.buffered
        if left:
            logger.error("stopped with %d exposure row(s) unwritten", left)

    async def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        loop = asyncio.get_running_loop()
        backoff = self._backoff
        while True:
            if backoff.current_s:
                # Backing off: rows keep arriving, but a full buffer does not wake a flush
                # (that made hundreds of failed flushes a second); the gauges still move.
                await self._sleep_publishing(backoff.current_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=self.flush_s)
            wakeup.clear()
            error: Exception | None
            try:
                _, error = await loop.run_in_executor(self._executor, run_with_db, self._flush)
            except Exception as exc:  # e.g. closing a broken connection
                metrics.RECORDER_FLUSH_ERRORS.inc()
                error = exc
            self._after_flush(error)

    def _after_flush(self, error: Exception | None) -> None:
        """Back off and report after a failed flush; reset after a good one."""
        waiting = self.stats.buffered
        if error is None:
            if self._backoff.failures:
                self._backoff.succeeded()
                self._backoff_gauge.set(0.0)
                self._failure_log.succeeded(f"{waiting} row(s) still waiting")
            return
        delay = self._backoff.failed()
        self._backoff_gauge.set(delay)
        self._failure_log.failed(
            error, f"{waiting} row(s) kept for the next attempt, in {delay:.1f} s"
        )

    async def _sleep_publishing(self, seconds: float) -> None:
        """Sleep, refreshing the buffered-rows gauge at least every ``flush_s``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.flush_s))
            self._publish_metrics()


def _insert_rows(rows: Sequence[ExposureRow]) -> int:
    return exposures_insert(rows=rows)
