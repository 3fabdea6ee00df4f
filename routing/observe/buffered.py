"""What the edge's row recorders share: a bounded buffer written by a background thread.

A recorder (``routing.observe.recorder`` for exposures, ``routing.observe.predictions``
for predictions) appends rows from the event loop and never waits for the database. A
background task hands the buffer to a thread of its own at least every ``flush_s`` seconds,
sooner when ``batch_rows`` rows wait, and once more on ``stop()``. While flushes fail, the
next one waits a capped exponential backoff with jitter (``routing.observe.backoff``), a
full buffer does not wake it early, and the failures are logged once per failure-log
interval. Rows a flush could not write go back to the front of the buffer; past
``max_buffer`` rows, rows are dropped, counted and logged (a full buffer at most every
10 s, any other cause at once).

The buffer belongs to the event loop's thread: rows are appended there (``_append``) and the
background task takes them there (``_take``) before handing them to the flush thread, and rows
a flush could not write come back there (``_give_back``), so buffering a row is a list append
and the request loop never waits on a lock the flush thread holds (``bench.proxy``'s drift
setup records every answer's prediction; see the README for what this changed). ``_lock``
guards only the counters the flush thread also updates. ``flush_now()`` is for a caller on the
loop's thread or while no loop records (tests, shutdown).

A subclass writes rows in ``_write_rows()`` (in the flush thread, under ``_flush_lock``; it
returns the rows inserted, the database error that stopped it and the rows left unwritten)
and publishes its counters in ``_publish_metrics()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeAlias, TypeVar

from django.conf import settings
from django.db import DatabaseError
from prometheus_client import Counter

from routing.db import close_thread_connections, run_with_db
from routing.observe import metrics
from routing.observe.backoff import Backoff, FailureLog
from routing.observe.in_flight import InFlight

# At most one "buffer full" log line per this many seconds; the counter counts every row.
_DROP_LOG_INTERVAL_S = 10.0

Row = TypeVar("Row")
# What a flush did: rows inserted, the database error that stopped it, rows left unwritten.
FlushResult: TypeAlias = tuple[int, DatabaseError | None, list[Row]]


class BufferedRecorder(ABC, Generic[Row]):
    """A bounded row buffer flushed by a background thread, with backoff on failures.

    ``noun`` names the rows in log lines ("exposure"); ``kind`` labels the backoff gauge
    and the flush thread ("exposures").
    """

    def __init__(
        self,
        *,
        noun: str,
        kind: str,
        logger: logging.Logger,
        flush_errors: Counter,
        dropped: Counter,
        flush_s: float | None,
        batch_rows: int | None,
        max_buffer: int | None,
        backoff_base_s: float | None = None,
        backoff_max_s: float | None = None,
        failure_log_s: float | None = None,
    ) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self.batch_rows = int(settings.RECORDER_BATCH_ROWS if batch_rows is None else batch_rows)
        self.max_buffer = int(settings.RECORDER_MAX_BUFFER if max_buffer is None else max_buffer)
        self._noun = noun
        self._kind = kind
        self._logger = logger
        self._flush_errors = flush_errors
        self._dropped_counter = dropped
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
            f"writing {kind}",
            interval_s=float(
                settings.RECORDER_FAILURE_LOG_S if failure_log_s is None else failure_log_s
            ),
        )
        self._backoff_gauge = metrics.FLUSH_BACKOFF.labels(kind)
        # Guards the counters (written, dropped, failed flushes), not the buffer.
        self._lock = threading.Lock()
        # One flush at a time: the periodic one and a size-triggered one must not interleave
        # their writes.
        self._flush_lock = threading.Lock()
        # The event loop's thread's (see the module docstring).
        self._buffer: list[Row] = []
        self._written = 0
        self._dropped = 0
        self._failed_flushes = 0
        self._last_drop_log = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: InFlight[Exception | None] = InFlight()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wakeup: asyncio.Event | None = None

    @abstractmethod
    def _write_rows(self, rows: list[Row]) -> FlushResult[Row]:
        """Write ``rows`` (flush thread, under ``_flush_lock``): rows inserted, the database
        error that stopped it, and the rows left unwritten."""

    @abstractmethod
    def _publish_metrics(self) -> None:
        """Publish the recorder's counters and its buffered-rows gauge."""

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def flush_now(self) -> int:
        """Write everything buffered, in the calling thread; returns rows inserted.

        On a database error the rows go back to the front of the buffer for the next flush;
        so do all of them when the flush raises (the inserts skip rows already stored).
        """
        rows = self._take()
        try:
            written, _, left = self._flush_rows(rows)
        except BaseException:
            self._give_back(rows)
            raise
        self._give_back(left)
        return written

    def _append(self, row: Row) -> bool | None:
        """Buffer a row (event loop): None when the full buffer dropped it, else whether a
        flush is due."""
        buffer = self._buffer
        if len(buffer) >= self.max_buffer:
            with self._lock:
                self._drop_locked(1, "buffer_full")
            return None
        buffer.append(row)
        return len(buffer) >= self.batch_rows

    def _take(self) -> list[Row]:
        """Every buffered row, for a flush (event loop)."""
        rows, self._buffer = self._buffer, []
        return rows

    def _give_back(self, rows: list[Row]) -> None:
        """Put rows a flush could not write back at the front, as many as fit (event loop)."""
        if not rows:
            return
        room = max(self.max_buffer - len(self._buffer), 0)
        self._buffer[:0] = rows[:room]
        if len(rows) > room:
            with self._lock:
                self._drop_locked(len(rows) - room, "buffer_full", force_log=True)

    def _flush_rows(self, rows: list[Row]) -> FlushResult[Row]:
        """Write ``rows`` and publish the counters (flush thread)."""
        with self._flush_lock:
            result = self._write_rows(rows)
            self._publish_metrics()
        return result

    async def _flush_in_thread(self, executor: ThreadPoolExecutor) -> Exception | None:
        """Take the buffer and write it in ``executor``'s thread; the error that stopped it.

        Rows left unwritten go back to the buffer. When the thread failed before it could say
        what it wrote (say, closing a broken connection), all of them do: the inserts skip
        rows already stored, so a row is never written twice.
        """
        rows = self._take()
        done: list[FlushResult[Row]] = []

        def flush() -> None:
            done.append(self._flush_rows(rows))

        try:
            await asyncio.get_running_loop().run_in_executor(executor, run_with_db, flush)
        except Exception as raised:  # raised around the write, so not counted there
            self._flush_errors.inc()
            self._give_back(done[0][2] if done else rows)
            return raised
        _, error, left = done[0]
        self._give_back(left)
        return error

    def _drop_locked(self, count: int, cause: str, *, force_log: bool = False) -> None:
        """Count dropped rows (the caller holds ``_lock``) and log them: a full buffer at
        most every 10 s, any other cause (or ``force_log``) at once."""
        self._dropped += count
        self._dropped_counter.labels(cause).inc(count)
        now = time.monotonic()
        if force_log or cause != "buffer_full" or now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            self._logger.error(
                "dropped %d %s row(s) (%s); %d dropped in total, %d buffered",
                count,
                self._noun,
                cause,
                self._dropped,
                len(self._buffer),
            )

    def _wake(self) -> None:
        """Start a flush early (a batch is waiting); from any thread."""
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
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"rampart-{self._kind}"
        )
        self._task = asyncio.create_task(self._run(), name=f"rampart-{self._kind}-flush")

    async def stop(self) -> None:
        """Stop the background task and flush what is left."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._in_flight.wait()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            self._after_flush(await self._flush_in_thread(executor))
        finally:
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)
            self._wakeup = None
            self._loop = None
        left = self.buffered
        if left:
            self._logger.error("stopped with %d %s row(s) unwritten", left, self._noun)

    async def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
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
            executor = self._executor
            assert executor is not None
            self._after_flush(await self._in_flight.run(self._flush_in_thread(executor)))

    def _after_flush(self, error: Exception | None) -> None:
        """Back off and report after a failed flush; reset after a good one."""
        waiting = self.buffered
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
