"""Local evaluation: decide in-process from the edge's /v1/config, with the edge's own code.

``LocalEvaluator`` (a background thread) and ``AsyncLocalEvaluator`` (an asyncio task)
fetch ``GET /v1/config`` once at start, then poll it every ``refresh_s`` seconds with
``If-None-Match``; an unchanged config costs a 304 and no parsing. Each experiment is
compiled into a ``rampart_sdk.assignment.AssignmentSpec`` built from the document's bucket
``ranges``, and ``decide`` follows the steps of ``routing.edge.app``'s docstring: a fixed
variant (not running, rolled back, completed), then ``rampart_sdk.assignment.assign`` (override,
namespace, hash and bucket). So a local decision equals the edge's for every unit id,
including non-ASCII and emoji ids (hashed as UTF-16 code units, like GrowthBook's
JavaScript SDK).

A config change reaches the process within one poll interval. A failed poll keeps the last
config and is retried at the next interval (``stats.failed`` counts them).

Exposures (``track_exposures=True``, the default): the edge records an exposure for every
decision it answers with ``in_experiment``, and analysis counts only units with one. So a
local decision with ``in_experiment`` queues the exposure (experiment, unit, variant, time
of the decision), and a background flusher (``rampart_sdk.sending.BatchFlusher``, the one
that sends ``Client.track``'s events) posts the queue to ``POST /v1/exposures`` every
``exposure_flush_interval_s`` seconds, or as soon as ``exposure_batch_size`` are waiting;
``flush()`` sends now, ``close()`` (the end of the ``with`` block) sends what is left.
  * Repeated decisions send nothing. Each experiment remembers unit -> variant of the
    exposures taken for sending, in two generations of plain dicts holding about
    ``exposure_cache_size`` units in all (the least recently decided forgotten first); a
    remembered unit costs ``decide`` one dict lookup. A unit decided again before the
    flusher ran is queued again and the flusher drops the repeat; a forgotten unit is sent
    again and the edge stores it once.
  * Failures: connection errors and 5xx answers are retried (``retry``), then the batch
    goes back to the queue for the next flush. The queue holds at most
    ``max_buffered_exposures``; past that, new exposures are dropped, counted
    (``exposure_stats.dropped``) and logged, and their units queued again when next decided.
  * The edge checks each exposure against its own decision and refuses, by position, those
    it would not have recorded; that happens around a config change, while this process or
    the edge has not caught up (a canary step moves units between arms). The refused ones
    are dropped and counted (``exposure_stats.rejected``), the rest sent again at once.
  * An edge without ``/v1/exposures`` (404) turns reporting off for this evaluator, with one
    error logged: its units would be missing from the analysis.
  * Without ``start()`` (``refresh()`` called by hand) nothing is sent in the background:
    exposures wait for ``flush()`` or ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType

import httpx

from rampart_sdk._transport import (
    RetryPolicy,
    auth_headers,
    connection_error,
    is_retryable,
)
from rampart_sdk.errors import RampartError
from rampart_sdk.evaluator import Evaluator
from rampart_sdk.exposures import (
    DEFAULT_EXPOSURE_BATCH_SIZE,
    DEFAULT_EXPOSURE_CACHE_SIZE,
    DEFAULT_EXPOSURE_FLUSH_INTERVAL_S,
    DEFAULT_MAX_BUFFERED_EXPOSURES,
    EXPOSURES_PATH,
    Exposure,
    ExposureQueue,
    ExposureResult,
    check_exposure_settings,
    exposures_body,
)
from rampart_sdk.sending import (
    AsyncBatchFlusher,
    BatchFlusher,
    acall_with_retries,
    call_with_retries,
)


def _exposure_queue(
    track: bool,
    batch_size: int,
    flush_interval_s: float,
    cache_size: int,
    max_buffered: int,
    wake: Callable[[], None],
) -> ExposureQueue | None:
    if not track:
        return None
    check_exposure_settings(batch_size, flush_interval_s, cache_size, max_buffered)
    return ExposureQueue(
        batch_size=batch_size, cache_size=cache_size, max_buffered=max_buffered, wake=wake
    )


class LocalEvaluator(Evaluator):
    """Local evaluation in a synchronous program; polls /v1/config from a daemon thread.

    Use as ``with LocalEvaluator(url, key) as evaluator: evaluator.decide(...)``, or call
    ``start()`` and ``close()``. ``decide`` is thread-safe and does no I/O; with
    ``track_exposures`` a daemon thread sends exposures (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        refresh_s: float = 5.0,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        track_exposures: bool = True,
        exposure_batch_size: int = DEFAULT_EXPOSURE_BATCH_SIZE,
        exposure_flush_interval_s: float = DEFAULT_EXPOSURE_FLUSH_INTERVAL_S,
        exposure_cache_size: int = DEFAULT_EXPOSURE_CACHE_SIZE,
        max_buffered_exposures: int = DEFAULT_MAX_BUFFERED_EXPOSURES,
    ) -> None:
        self._flusher = BatchFlusher(
            self.flush,
            interval_s=exposure_flush_interval_s,
            name="rampart-exposure-flush",
            what="exposures",
        )
        super().__init__(
            refresh_s,
            _exposure_queue(
                track_exposures,
                exposure_batch_size,
                exposure_flush_interval_s,
                exposure_cache_size,
                max_buffered_exposures,
                self._flusher.wake,
            ),
        )
        self.retry = retry or RetryPolicy()
        self.exposure_batch_size = exposure_batch_size
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One batch in flight at a time: a refusal's resend or a retry never races a flush.
        self._send_lock = threading.Lock()

    def start(self) -> LocalEvaluator:
        """Fetch the config (retrying as ``retry`` says; raises if it cannot), then poll."""
        if self._thread is not None:
            return self
        retries = 0
        while True:
            try:
                self.refresh()
                break
            except RampartError as error:
                if retries >= self.retry.max_retries or not is_retryable(error):
                    raise
                self._stop.wait(self.retry.delay_s(retries))
                retries += 1
        self._thread = threading.Thread(
            target=self._poll_forever, name="rampart-config-poll", daemon=True
        )
        self._thread.start()
        if self._exposures is not None:
            self._flusher.start()
        return self

    def refresh(self) -> bool:
        """Poll /v1/config once now; True when the config changed. Raises on failure."""
        try:
            response = self._http.get("/v1/config", headers=self._conditional_headers())
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return self._install(response)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except RampartError as error:
                self._poll_failed(error)

    def flush(self) -> ExposureResult:
        """Send every queued exposure now; what the edge did with them.

        Raises the error of the first batch that failed (after retries); a batch that may
        succeed later is queued again, see the module docstring for the others.
        """
        exposures = self._exposures
        if exposures is None:
            return ExposureResult()
        with self._send_lock:
            if not exposures.sending:
                exposures.discard()
                return ExposureResult()
            total = ExposureResult()
            while batch := exposures.take(self.exposure_batch_size):
                total += self._send(exposures, batch)
            return total

    def _send(self, exposures: ExposureQueue, batch: list[Exposure]) -> ExposureResult:
        rejected = 0
        while True:
            try:
                payload = call_with_retries(
                    self._http, self.retry, "POST", EXPOSURES_PATH, exposures_body(batch)
                )
                return exposures.sent(payload, rejected)
            except RampartError as error:
                kept = exposures.without_refused(batch, error)
                if kept is None:
                    exposures.failed(batch, error)
                    raise
            rejected += len(batch) - len(kept)
            batch = kept
            if not batch:
                return ExposureResult(rejected=rejected)

    def close(self) -> None:
        """Stop polling, send the queued exposures (logging a failure), close HTTP."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._flusher.stop()
        exposures = self._exposures
        try:
            if exposures is not None:
                try:
                    self.flush()
                except RampartError as error:
                    self._unsent_at_close(exposures, error)
        finally:
            self._http.close()

    def __enter__(self) -> LocalEvaluator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncLocalEvaluator(Evaluator):
    """Local evaluation in an asyncio program; polls /v1/config from a background task.

    Use as ``async with AsyncLocalEvaluator(url, key) as evaluator: evaluator.decide(...)``.
    ``decide`` is a plain method: it does no I/O; with ``track_exposures`` a task of the
    loop that ran ``start()`` sends exposures (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        refresh_s: float = 5.0,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        track_exposures: bool = True,
        exposure_batch_size: int = DEFAULT_EXPOSURE_BATCH_SIZE,
        exposure_flush_interval_s: float = DEFAULT_EXPOSURE_FLUSH_INTERVAL_S,
        exposure_cache_size: int = DEFAULT_EXPOSURE_CACHE_SIZE,
        max_buffered_exposures: int = DEFAULT_MAX_BUFFERED_EXPOSURES,
    ) -> None:
        self._flusher = AsyncBatchFlusher(
            self.flush,
            interval_s=exposure_flush_interval_s,
            name="rampart-exposure-flush",
            what="exposures",
        )
        super().__init__(
            refresh_s,
            _exposure_queue(
                track_exposures,
                exposure_batch_size,
                exposure_flush_interval_s,
                exposure_cache_size,
                max_buffered_exposures,
                self._flusher.wake,
            ),
        )
        self.retry = retry or RetryPolicy()
        self.exposure_batch_size = exposure_batch_size
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    async def start(self) -> AsyncLocalEvaluator:
        """Fetch the config (retrying as ``retry`` says; raises if it cannot), then poll."""
        if self._task is not None:
            return self
        retries = 0
        while True:
            try:
                await self.refresh()
                break
            except RampartError as error:
                if retries >= self.retry.max_retries or not is_retryable(error):
                    raise
                await asyncio.sleep(self.retry.delay_s(retries))
                retries += 1
        self._task = asyncio.create_task(self._poll_forever(), name="rampart-config-poll")
        if self._exposures is not None:
            self._flusher.start()
        return self

    async def refresh(self) -> bool:
        """Poll /v1/config once now; True when the config changed. Raises on failure."""
        try:
            response = await self._http.get("/v1/config", headers=self._conditional_headers())
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return self._install(response)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except RampartError as error:
                self._poll_failed(error)

    async def flush(self) -> ExposureResult:
        """Send every queued exposure now; what the edge did with them (see
        ``LocalEvaluator.flush``)."""
        exposures = self._exposures
        if exposures is None:
            return ExposureResult()
        async with self._send_lock:
            if not exposures.sending:
                exposures.discard()
                return ExposureResult()
            total = ExposureResult()
            while batch := exposures.take(self.exposure_batch_size):
                total += await self._send(exposures, batch)
            return total

    async def _send(self, exposures: ExposureQueue, batch: list[Exposure]) -> ExposureResult:
        rejected = 0
        while True:
            try:
                payload = await acall_with_retries(
                    self._http, self.retry, "POST", EXPOSURES_PATH, exposures_body(batch)
                )
                return exposures.sent(payload, rejected)
            except asyncio.CancelledError:
                # aclose() cancelled the flusher mid-send; the edge stores an exposure once,
                # so sending the batch again is harmless.
                exposures.put_back(batch)
                raise
            except RampartError as error:
                kept = exposures.without_refused(batch, error)
                if kept is None:
                    exposures.failed(batch, error)
                    raise
            rejected += len(batch) - len(kept)
            batch = kept
            if not batch:
                return ExposureResult(rejected=rejected)

    async def aclose(self) -> None:
        """Stop polling, send the queued exposures (logging a failure), close HTTP."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flusher.stop()
        exposures = self._exposures
        try:
            if exposures is not None:
                try:
                    await self.flush()
                except RampartError as error:
                    self._unsent_at_close(exposures, error)
        finally:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncLocalEvaluator:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
