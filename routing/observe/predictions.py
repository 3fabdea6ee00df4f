"""Buffered recording of sampled predictions: the proxy never waits for the database.

The same discipline as the exposure recorder (``routing.observe.recorder``): ``record``
appends a row to an in-memory buffer under a lock and returns; a background task hands the
buffer to a dedicated thread that bulk-inserts it ("on conflict do nothing" on (experiment,
request id), so a caller's repeated request id keeps its first prediction) at least every
``RECORDER_FLUSH_S`` seconds, sooner when ``RECORDER_BATCH_ROWS`` rows wait, and once more on
``stop()``. Nothing is dropped silently:

  * while the database is unreachable, rows stay buffered and the flush is retried after a
    capped exponential backoff (``routing.observe.backoff``), logged once per
    ``RECORDER_FAILURE_LOG_S``;
  * past ``RECORDER_MAX_BUFFER`` rows, new rows are dropped, counted
    (``rampart_predictions_dropped_total{cause="buffer_full"}``) and logged;
  * rows of an experiment deleted meanwhile, and rows the database refuses as data, are
    dropped, counted and logged.

What reading each answer gave (``ok``, ``not_json``, ``missing``, ``wrong_type``,
``streamed``) is counted in plain integers and published on ``/metrics``
(``rampart_predictions_read_total``) at every flush.
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

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, connection, transaction

from routing.db import close_thread_connections, run_with_db
from routing.models import Prediction
from routing.observe import metrics, quality_metrics
from routing.observe.backoff import Backoff, FailureLog

logger = logging.getLogger(__name__)

# (experiment_id, request_id, variant_key, unit_id, predicted_at (epoch s), kind, status, value)
PredictionRow = tuple[int, str, str, str, float, str, str, str]
# Rows per INSERT statement; see routing.services.EXPOSURE_INSERT_BATCH for the reasoning.
PREDICTION_INSERT_BATCH = 250
_DROP_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class PredictionStats:
    """Rows waiting now, and totals since the recorder was created."""

    buffered: int
    written: int
    dropped: int
    failed_flushes: int
    read: dict[str, int]


def predictions_insert(*, rows: Sequence[PredictionRow]) -> int:
    """Insert prediction rows, skipping (experiment, request id, variant) rows already stored.

    Raises IntegrityError when a row names an experiment that no longer exists.
    """
    if not rows:
        return 0
    table = connection.ops.quote_name(Prediction._meta.db_table)
    inserted = 0
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, len(rows), PREDICTION_INSERT_BATCH):
            chunk = rows[start : start + PREDICTION_INSERT_BATCH]
            params: list[object] = []
            for row in chunk:
                params.extend(row)
            values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s)"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {table} (experiment_id, request_id, variant_key, unit_id, "
                f"predicted_at, kind, status, value) VALUES {values} ON CONFLICT DO NOTHING",
                params,
            )
            inserted += max(cursor.rowcount, 0)
    return inserted


def _insert_salvaging(rows: Sequence[PredictionRow]) -> tuple[int, int, int]:
    """Insert ``rows``; on a bad row, retry row by row. (inserted, experiment gone, refused)."""
    try:
        return predictions_insert(rows=rows), 0, 0
    except (IntegrityError, DataError):
        pass
    written = gone = refused = 0
    for row in rows:
        try:
            with transaction.atomic():
                written += predictions_insert(rows=[row])
        except IntegrityError:
            gone += 1
        except DataError:
            refused += 1
    return written, gone, refused


class PredictionRecorder:
    """Buffers prediction rows and writes them in bulk from a background thread."""

    def __init__(
        self,
        *,
        flush_s: float | None = None,
        batch_rows: int | None = None,
        max_buffer: int | None = None,
        insert: Callable[[Sequence[PredictionRow]], tuple[int, int, int]] | None = None,
    ) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self.batch_rows = int(settings.RECORDER_BATCH_ROWS if batch_rows is None else batch_rows)
        self.max_buffer = int(settings.RECORDER_MAX_BUFFER if max_buffer is None else max_buffer)
        self._insert = insert or _insert_salvaging
        self._backoff = Backoff(
            base_s=float(settings.RECORDER_BACKOFF_BASE_S),
            max_s=float(settings.RECORDER_BACKOFF_MAX_S),
        )
        self._failure_log = FailureLog(
            logger, "writing predictions", interval_s=float(settings.RECORDER_FAILURE_LOG_S)
        )
        self._backoff_gauge = metrics.FLUSH_BACKOFF.labels("predictions")
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._buffer: list[PredictionRow] = []
        # What reading answers gave, counted here and added to the counter at each flush.
        self.read: dict[str, int] = {}
        self._published_read: dict[str, int] = {}
        self._written = 0
        self._dropped = 0
        self._failed_flushes = 0
        self._last_drop_log = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def stats(self) -> PredictionStats:
        with self._lock:
            return PredictionStats(
                buffered=len(self._buffer),
                written=self._written,
                dropped=self._dropped,
                failed_flushes=self._failed_flushes,
                read=dict(self.read),
            )

    def count(self, outcome: str) -> None:
        """Count an answer whose prediction is not recorded (say, a streamed one)."""
        read = self.read
        read[outcome] = read.get(outcome, 0) + 1

    def record(self, row: PredictionRow) -> bool:
        """Buffer one row (its outcome counted); False when the full buffer dropped it.

        Called from the event loop only, so ``read`` needs no lock.
        """
        read = self.read
        status = row[6]
        read[status] = read.get(status, 0) + 1
        with self._lock:
            buffer = self._buffer
            if len(buffer) >= self.max_buffer:
                self._drop_locked(1, "buffer_full")
                return False
            buffer.append(row)
            due = len(buffer) >= self.batch_rows
        if due and self._wakeup is not None and not self._backoff.current_s:
            self._wakeup.set()
        return True

    def flush_now(self) -> int:
        """Write everything buffered, in the calling thread; returns rows inserted."""
        return self._flush()[0]

    def _flush(self) -> tuple[int, DatabaseError | None]:
        with self._flush_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            written = 0
            error: DatabaseError | None = None
            for start in range(0, len(rows), PREDICTION_INSERT_BATCH):
                chunk = rows[start : start + PREDICTION_INSERT_BATCH]
                try:
                    inserted, gone, refused = self._insert(chunk)
                except DatabaseError as failure:
                    quality_metrics.PREDICTIONS_FLUSH_ERRORS.inc()
                    error = failure
                    with self._lock:
                        self._failed_flushes += 1
                    self._requeue(rows[start:])
                    break
                written += inserted
                quality_metrics.PREDICTIONS_WRITTEN.inc(inserted)
                with self._lock:
                    self._written += inserted
                    if gone:
                        self._drop_locked(gone, "experiment_gone")
                    if refused:
                        self._drop_locked(refused, "refused_by_database")
            self._publish_metrics()
            return written, error

    def _requeue(self, rows: list[PredictionRow]) -> None:
        with self._lock:
            room = max(self.max_buffer - len(self._buffer), 0)
            self._buffer[:0] = rows[:room]
            if len(rows) > room:
                self._drop_locked(len(rows) - room, "buffer_full")

    def _drop_locked(self, count: int, cause: str) -> None:
        """Count dropped rows (the caller holds ``_lock``) and log, at most every 10 s."""
        self._dropped += count
        quality_metrics.PREDICTIONS_DROPPED.labels(cause).inc(count)
        now = time.monotonic()
        if cause != "buffer_full" or now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            logger.error(
                "dropped %d prediction row(s) (%s); %d dropped in total, %d buffered",
                count,
                cause,
                self._dropped,
                len(self._buffer),
            )

    def _publish_metrics(self) -> None:
        # A copy: the event loop may add a key while this thread iterates.
        read = dict(self.read)
        for outcome, total in read.items():
            delta = total - self._published_read.get(outcome, 0)
            if delta:
                quality_metrics.PREDICTIONS_READ.labels(outcome).inc(delta)
        self._published_read = read
        quality_metrics.PREDICTIONS_BUFFERED.set(self.stats.buffered)

    async def start(self) -> None:
        """Start flushing in the background (at least every ``flush_s`` seconds)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-predictions")
        self._task = asyncio.create_task(self._run(), name="rampart-prediction-flush")

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
            logger.error("stopped with %d prediction row(s) unwritten", left)

    async def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            delay = self._backoff.current_s
            if delay:
                # Backing off: a full buffer does not wake the flush early.
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=self.flush_s)
            wakeup.clear()
            error: Exception | None
            try:
                _, error = await loop.run_in_executor(self._executor, run_with_db, self._flush)
            except Exception as exc:  # e.g. closing a broken connection
                quality_metrics.PREDICTIONS_FLUSH_ERRORS.inc()
                error = exc
            self._after_flush(error)

    def _after_flush(self, error: Exception | None) -> None:
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
