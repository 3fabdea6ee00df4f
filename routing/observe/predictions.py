"""Buffered recording of sampled predictions: the proxy never waits for the database.

The same discipline as the exposure recorder (``routing.observe.recorder``): ``record``
appends a row to an in-memory buffer (the event loop's; ``routing.observe.buffered``) and
returns; a background task hands the buffer to a dedicated thread that bulk-inserts it ("on
conflict do nothing" on (experiment, request id), so a caller's repeated request id keeps its
first prediction) at least every
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

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.db import DatabaseError, DataError, IntegrityError, transaction

from routing.db import insert_rows
from routing.models import Prediction
from routing.observe import quality_metrics
from routing.observe.buffered import BufferedRecorder, FlushResult

logger = logging.getLogger(__name__)

# (experiment_id, request_id, variant_key, unit_id, predicted_at (epoch s), kind, status, value)
PredictionRow = tuple[int, str, str, str, float, str, str, str]
PREDICTION_COLUMNS = (
    "experiment_id",
    "request_id",
    "variant_key",
    "unit_id",
    "predicted_at",
    "kind",
    "status",
    "value",
)
# Rows per INSERT statement; see routing.services.EXPOSURE_INSERT_BATCH for the reasoning.
PREDICTION_INSERT_BATCH = 250
# Rows per transaction. Each commit rewrites the pages the rows touched (SQLite's WAL), so
# ten statements a commit cost a row about 0.4 µs less of the flush thread's CPU than one.
PREDICTION_TRANSACTION_ROWS = 2_500


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
    return insert_rows(
        Prediction._meta.db_table, PREDICTION_COLUMNS, rows, batch=PREDICTION_INSERT_BATCH
    )


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


class PredictionRecorder(BufferedRecorder[PredictionRow]):
    """Buffers prediction rows and writes them in bulk from a background thread."""

    def __init__(
        self,
        *,
        flush_s: float | None = None,
        batch_rows: int | None = None,
        max_buffer: int | None = None,
        insert: Callable[[Sequence[PredictionRow]], tuple[int, int, int]] | None = None,
    ) -> None:
        super().__init__(
            noun="prediction",
            kind="predictions",
            logger=logger,
            flush_errors=quality_metrics.PREDICTIONS_FLUSH_ERRORS,
            dropped=quality_metrics.PREDICTIONS_DROPPED,
            flush_s=flush_s,
            batch_rows=batch_rows,
            max_buffer=max_buffer,
        )
        self._insert = insert or _insert_salvaging
        # What reading answers gave, counted here and added to the counter at each flush.
        self.read: dict[str, int] = {}
        self._published_read: dict[str, int] = {}

    @property
    def stats(self) -> PredictionStats:
        buffered = len(self._buffer)
        with self._lock:
            return PredictionStats(
                buffered=buffered,
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
        due = self._append(row)
        if due is None:
            return False
        if due:
            self._wake()
        return True

    def _write_rows(self, rows: list[PredictionRow]) -> FlushResult[PredictionRow]:
        written = 0
        for start in range(0, len(rows), PREDICTION_TRANSACTION_ROWS):
            chunk = rows[start : start + PREDICTION_TRANSACTION_ROWS]
            try:
                inserted, gone, refused = self._insert(chunk)
            except DatabaseError as failure:
                quality_metrics.PREDICTIONS_FLUSH_ERRORS.inc()
                with self._lock:
                    self._failed_flushes += 1
                return written, failure, rows[start:]
            written += inserted
            quality_metrics.PREDICTIONS_WRITTEN.inc(inserted)
            with self._lock:
                self._written += inserted
                if gone:
                    self._drop_locked(gone, "experiment_gone")
                if refused:
                    self._drop_locked(refused, "refused_by_database")
        return written, None, []

    def _publish_metrics(self) -> None:
        # A copy: the event loop may add a key while this thread iterates.
        read = dict(self.read)
        for outcome, total in read.items():
            delta = total - self._published_read.get(outcome, 0)
            if delta:
                quality_metrics.PREDICTIONS_READ.labels(outcome).inc(delta)
        self._published_read = read
        quality_metrics.PREDICTIONS_BUFFERED.set(self.stats.buffered)
