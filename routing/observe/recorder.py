"""Buffered recording of first exposures: the edge never waits for the database.

``ExposureRecorder.record`` appends a row to an in-memory buffer (the event loop's;
``routing.observe.buffered``) and returns.
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

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError

from routing.observe import metrics
from routing.observe.buffered import BufferedRecorder, FlushResult
from routing.services import (
    EXPOSURE_INSERT_BATCH,
    ExposureRow,
    exposures_insert,
    exposures_insert_by_experiment,
    exposures_insert_one_by_one,
)

logger = logging.getLogger(__name__)


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


class ExposureRecorder(BufferedRecorder[ExposureRow]):
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
        super().__init__(
            noun="exposure",
            kind="exposures",
            logger=logger,
            flush_errors=metrics.RECORDER_FLUSH_ERRORS,
            dropped=metrics.RECORDER_DROPPED,
            flush_s=flush_s,
            batch_rows=batch_rows,
            max_buffer=max_buffer,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            failure_log_s=failure_log_s,
        )
        self.cache_size = int(settings.EXPOSURE_CACHE_SIZE if cache_size is None else cache_size)
        self._insert = insert or _insert_rows
        # Two generations of plain dicts with string keys instead of one LRU OrderedDict:
        # a dict holding only strings is invisible to the cyclic garbage collector, whereas
        # a million-entry OrderedDict of tuples adds ~50 ms to every full collection, a
        # pause every request in flight would wait for. A unit seen in the older generation
        # is promoted; when the recent one holds half the cache, it becomes the older one.
        self._recent: dict[str, None] = {}
        self._older: dict[str, None] = {}
        self._generation_size = max(self.cache_size // 2, 1)
        self._skipped = 0
        self._accepted = 0
        self._published_accepted = 0
        self._published_skipped = 0

    @property
    def stats(self) -> RecorderStats:
        buffered = len(self._buffer)
        with self._lock:
            return RecorderStats(
                buffered=buffered,
                written=self._written,
                dropped=self._dropped,
                skipped_cached=self._skipped,
                failed_flushes=self._failed_flushes,
            )

    def record(
        self, *, experiment_id: int, unit_id: str, variant_key: str, at: datetime | None = None
    ) -> bool:
        """Buffer the exposure unless this process already did; never blocks on I/O.

        False when the exposure was dropped because the buffer is full. Called from the event
        loop only (like the buffer, the cache and its counters are the loop's).
        """
        key = f"{experiment_id}\x1f{variant_key}\x1f{unit_id}"
        if key in self._recent:
            self._skipped += 1
            return True
        if key in self._older:
            self._skipped += 1
            self._remember(key)
            return True
        seconds = time.time() if at is None else at.timestamp()
        due = self._append((experiment_id, unit_id, variant_key, seconds))
        if due is None:
            return False
        self._accepted += 1
        self._remember(key)
        if due:
            self._wake()
        return True

    def _remember(self, key: str) -> None:
        recent = self._recent
        recent[key] = None
        if len(recent) >= self._generation_size:
            self._older = recent
            self._recent = {}

    def _write_rows(self, rows: list[ExposureRow]) -> FlushResult[ExposureRow]:
        written = 0
        # One statement per chunk: the flush thread shares the GIL with the request loop,
        # and the database call between chunks releases it, so no request waits behind more
        # than one chunk's worth of Python work.
        for start in range(0, len(rows), EXPOSURE_INSERT_BATCH):
            inserted = self._write(rows[start : start + EXPOSURE_INSERT_BATCH])
            if isinstance(inserted, DatabaseError):
                return written, inserted, rows[start:]
            written += inserted
        return written, None, []

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
            # Logged after the flush, at most once per RECORDER_FAILURE_LOG_S.
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

    def _publish_metrics(self) -> None:
        # The loop increases the totals without a lock: read each once.
        accepted_total, skipped_total = self._accepted, self._skipped
        with self._lock:
            accepted = accepted_total - self._published_accepted
            skipped = skipped_total - self._published_skipped
            self._published_accepted, self._published_skipped = accepted_total, skipped_total
        buffered = len(self._buffer)
        metrics.RECORDER_ACCEPTED.inc(accepted)
        metrics.RECORDER_SKIPPED.inc(skipped)
        metrics.RECORDER_BUFFERED.set(buffered)


def _insert_rows(rows: Sequence[ExposureRow]) -> int:
    return exposures_insert(rows=rows)
