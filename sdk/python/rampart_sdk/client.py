"""HTTP clients of the Rampart edge: decisions and batched business events, sync and async.

``Client`` (threads) and ``AsyncClient`` (asyncio) share one design:
  * ``decide``, ``decide_many`` (one experiment, many units; POST /v1/decide/batch in
    chunks of 1,000) and ``decide_all`` (one unit, many experiments) ask the edge, which
    also records the exposures that analysis counts;
  * ``track`` buffers an event and returns its id at once; a background flusher sends
    the buffer to POST /v1/events every ``flush_interval_s`` seconds, and as soon as
    ``batch_size`` events are waiting; ``flush()`` sends everything now and returns the
    server's counts; leaving the ``with`` block (``close()``) flushes too;
  * 5xx answers and connection failures are retried with backoff (``RetryPolicy``); every
    event keeps the id it was given (a UUID 4 unless the caller passed one), so a batch
    sent twice is stored once;
  * error answers raise ``rampart_sdk.errors`` exceptions that carry the server's JSON;
  * ``track_label`` and ``track_labels`` send the true outcome of proxied requests (named by
    the ``X-Rampart-Request-Id`` the proxy put on their answers) to POST /v1/labels at once,
    with the same retries: labels usually come later, from a job or a webhook, not on a
    request's path, and each request id keeps its first label, so a retry is harmless.

A batch that fails with a retryable error goes back to the buffer and is sent again at the
next flush. A batch the server refuses (4xx) is dropped, and the raised ApiError holds it
in ``events``; events are validated by ``Event`` before they are buffered, so that happens
only on a server-side misconfiguration such as a missing ``ingest`` scope.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import httpx

from rampart_sdk._transport import (
    EventBuffer,
    RetryPolicy,
    auth_headers,
    decisions_from,
    events_body,
    is_retryable,
    json_request_body,
    label_chunks,
    label_result,
    labels_body,
    make_label,
    track_result,
    unit_chunks,
)
from rampart_sdk.errors import ApiError, RampartError
from rampart_sdk.local import AsyncLocalEvaluator, LocalEvaluator
from rampart_sdk.records import Decision, Event, Label, LabelResult, TrackResult, new_event_id
from rampart_sdk.sending import (
    AsyncBatchFlusher,
    BatchFlusher,
    acall_with_retries,
    call_with_retries,
)

DEFAULT_BATCH_SIZE: Final = 500
DEFAULT_FLUSH_INTERVAL_S: Final = 1.0
DEFAULT_MAX_BUFFERED_EVENTS: Final = 100_000
# The events API's limit per batch (routing.edge.ingest.MAX_EVENTS_PER_BATCH).
MAX_EVENTS_PER_BATCH: Final = 10_000


def make_event(
    unit_id: str | int,
    name: str,
    value: float,
    timestamp: datetime | float | None,
    event_id: str | None,
) -> Event:
    """An Event from ``track``'s arguments: epoch seconds become an aware UTC datetime."""
    if timestamp is None:
        moment = datetime.now(UTC)
    elif isinstance(timestamp, datetime):
        moment = timestamp
    else:
        moment = datetime.fromtimestamp(timestamp, UTC)
    return Event(
        unit_id=unit_id,  # type: ignore[arg-type]  # Event keeps integers as strings
        name=name,
        value=value,
        timestamp=moment,
        event_id=new_event_id() if event_id is None else event_id,
    )


def _check_buffering(batch_size: int, flush_interval_s: float, max_buffered_events: int) -> None:
    if not 1 <= batch_size <= MAX_EVENTS_PER_BATCH:
        raise ValueError(f"batch_size must lie in [1, {MAX_EVENTS_PER_BATCH}]")
    if flush_interval_s <= 0:
        raise ValueError("flush_interval_s must be positive")
    if max_buffered_events < batch_size:
        raise ValueError("max_buffered_events must be at least batch_size")


class Client:
    """A thread-safe client of the Rampart edge (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        _check_buffering(batch_size, flush_interval_s, max_buffered_events)
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._buffer = EventBuffer(max_buffered_events)
        # One batch in flight at a time keeps events in order and a retry from racing a flush.
        self._send_lock = threading.Lock()
        self._flusher = BatchFlusher(
            self.flush, interval_s=flush_interval_s, name="rampart-event-flush", what="events"
        )
        self._closed = False

    # --- decisions -----------------------------------------------------------------------

    def decide(self, experiment: str, unit: str | int) -> Decision:
        """The variant ``unit`` gets in ``experiment`` (the edge records the exposure)."""
        payload = self._call("POST", "/v1/decide", {"experiment": experiment, "unit": unit})
        return Decision.from_json(payload)

    def decide_many(self, experiment: str, units: Iterable[str | int]) -> list[Decision]:
        """Decisions for many units of one experiment, in order (1,000 per request)."""
        decisions: list[Decision] = []
        for chunk in unit_chunks(units):
            payload = self._call(
                "POST", "/v1/decide/batch", {"experiment": experiment, "units": chunk}
            )
            decisions.extend(decisions_from(payload))
        return decisions

    def decide_all(
        self, unit: str | int, experiments: Sequence[str] | None = None
    ) -> dict[str, Decision]:
        """Decisions for one unit: in ``experiments``, or in every running experiment."""
        body: dict[str, Any] = {"unit": unit}
        if experiments is not None:
            body["experiments"] = list(experiments)
        payload = self._call("POST", "/v1/decide/batch", body)
        return {decision.experiment: decision for decision in decisions_from(payload)}

    def local_evaluator(self, *, refresh_s: float = 5.0) -> LocalEvaluator:
        """A LocalEvaluator on the same edge and key (start it, or use it in a with block)."""
        return LocalEvaluator(
            self.base_url,
            self._api_key,
            refresh_s=refresh_s,
            timeout_s=self._timeout_s,
            retry=self.retry,
        )

    # --- events --------------------------------------------------------------------------

    def track(
        self,
        unit_id: str | int,
        name: str,
        value: float = 1.0,
        *,
        timestamp: datetime | float | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event (timestamp: now unless given); returns its event id.

        Raises InvalidEventError at once for an event the events API would refuse.
        """
        event = make_event(unit_id, name, value, timestamp, event_id)
        self.track_many([event])
        return event.event_id

    def track_many(self, events: Iterable[Event]) -> None:
        """Buffer events built by the caller (``rampart_sdk.Event``)."""
        if self._closed:
            raise RampartError("the client is closed")
        waiting = self._buffer.add(events)
        self._flusher.start()
        if waiting >= self.batch_size:
            self._flusher.wake()

    @property
    def buffered(self) -> int:
        """Events waiting to be sent."""
        return len(self._buffer)

    @property
    def dropped(self) -> int:
        """Events dropped because the buffer was full."""
        return self._buffer.dropped

    def flush(self) -> TrackResult:
        """Send every buffered event now; the server's counts for the batches sent.

        Raises the error of the first batch that failed (after retries); see the module
        docstring for what happens to its events.
        """
        with self._send_lock:
            total = TrackResult()
            while batch := self._buffer.take(self.batch_size):
                total += self._send_batch(batch)
            return total

    def _send_batch(self, batch: list[Event]) -> TrackResult:
        try:
            return track_result(
                call_with_retries(self._http, self.retry, "POST", "/v1/events", events_body(batch))
            )
        except RampartError as error:
            if is_retryable(error):
                self._buffer.put_back(batch)
            elif isinstance(error, ApiError):
                error.events = batch
            raise

    # --- labels --------------------------------------------------------------------------

    def track_label(
        self,
        request_id: str,
        label: str | int | float | bool,
        *,
        timestamp: datetime | float | None = None,
    ) -> LabelResult:
        """Send the true outcome of one proxied request now; the server's counts.

        Raises InvalidEventError at once for a label the labels API would refuse.
        """
        return self.track_labels([make_label(request_id, label, timestamp)])

    def track_labels(self, labels: Iterable[Label]) -> LabelResult:
        """Send labels built by the caller (``rampart_sdk.Label``) now, in batches."""
        if self._closed:
            raise RampartError("the client is closed")
        total = LabelResult()
        for batch in label_chunks(labels):
            total += label_result(
                call_with_retries(self._http, self.retry, "POST", "/v1/labels", labels_body(batch))
            )
        return total

    # --- plumbing ------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any]) -> Any:
        return call_with_retries(self._http, self.retry, method, path, json_request_body(body))

    def close(self) -> None:
        """Stop the flusher, send what is buffered (raising if that fails), close HTTP."""
        if self._closed:
            return
        self._closed = True
        self._flusher.stop()
        try:
            self.flush()
        finally:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio client of the Rampart edge (see the module docstring).

    ``track`` is a plain method (it only buffers) and must be called from the event loop's
    thread; the flusher task starts with the first ``track`` inside a running loop.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        _check_buffering(batch_size, flush_interval_s, max_buffered_events)
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._buffer = EventBuffer(max_buffered_events)
        self._send_lock = asyncio.Lock()
        self._flusher = AsyncBatchFlusher(
            self.flush, interval_s=flush_interval_s, name="rampart-event-flush", what="events"
        )
        self._closed = False

    # --- decisions -----------------------------------------------------------------------

    async def decide(self, experiment: str, unit: str | int) -> Decision:
        """The variant ``unit`` gets in ``experiment`` (the edge records the exposure)."""
        payload = await self._call("POST", "/v1/decide", {"experiment": experiment, "unit": unit})
        return Decision.from_json(payload)

    async def decide_many(self, experiment: str, units: Iterable[str | int]) -> list[Decision]:
        """Decisions for many units of one experiment, in order (1,000 per request)."""
        decisions: list[Decision] = []
        for chunk in unit_chunks(units):
            payload = await self._call(
                "POST", "/v1/decide/batch", {"experiment": experiment, "units": chunk}
            )
            decisions.extend(decisions_from(payload))
        return decisions

    async def decide_all(
        self, unit: str | int, experiments: Sequence[str] | None = None
    ) -> dict[str, Decision]:
        """Decisions for one unit: in ``experiments``, or in every running experiment."""
        body: dict[str, Any] = {"unit": unit}
        if experiments is not None:
            body["experiments"] = list(experiments)
        payload = await self._call("POST", "/v1/decide/batch", body)
        return {decision.experiment: decision for decision in decisions_from(payload)}

    def local_evaluator(self, *, refresh_s: float = 5.0) -> AsyncLocalEvaluator:
        """An AsyncLocalEvaluator on the same edge and key (``async with`` it)."""
        return AsyncLocalEvaluator(
            self.base_url,
            self._api_key,
            refresh_s=refresh_s,
            timeout_s=self._timeout_s,
            retry=self.retry,
        )

    # --- events --------------------------------------------------------------------------

    def track(
        self,
        unit_id: str | int,
        name: str,
        value: float = 1.0,
        *,
        timestamp: datetime | float | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event (timestamp: now unless given); returns its event id."""
        event = make_event(unit_id, name, value, timestamp, event_id)
        self.track_many([event])
        return event.event_id

    def track_many(self, events: Iterable[Event]) -> None:
        """Buffer events built by the caller (``rampart_sdk.Event``)."""
        if self._closed:
            raise RampartError("the client is closed")
        waiting = self._buffer.add(events)
        self._flusher.start()
        if waiting >= self.batch_size:
            self._flusher.wake()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def dropped(self) -> int:
        return self._buffer.dropped

    async def flush(self) -> TrackResult:
        """Send every buffered event now; the server's counts for the batches sent."""
        async with self._send_lock:
            total = TrackResult()
            while batch := self._buffer.take(self.batch_size):
                total += await self._send_batch(batch)
            return total

    async def _send_batch(self, batch: list[Event]) -> TrackResult:
        try:
            return track_result(
                await acall_with_retries(
                    self._http, self.retry, "POST", "/v1/events", events_body(batch)
                )
            )
        except asyncio.CancelledError:
            # aclose() cancelled the flusher mid-send; the server may or may not have the
            # batch, and the ids make sending it again harmless.
            self._buffer.put_back(batch)
            raise
        except RampartError as error:
            if is_retryable(error):
                self._buffer.put_back(batch)
            elif isinstance(error, ApiError):
                error.events = batch
            raise

    # --- labels --------------------------------------------------------------------------

    async def track_label(
        self,
        request_id: str,
        label: str | int | float | bool,
        *,
        timestamp: datetime | float | None = None,
    ) -> LabelResult:
        """Send the true outcome of one proxied request now; the server's counts."""
        return await self.track_labels([make_label(request_id, label, timestamp)])

    async def track_labels(self, labels: Iterable[Label]) -> LabelResult:
        """Send labels built by the caller (``rampart_sdk.Label``) now, in batches."""
        if self._closed:
            raise RampartError("the client is closed")
        total = LabelResult()
        for batch in label_chunks(labels):
            total += label_result(
                await acall_with_retries(
                    self._http, self.retry, "POST", "/v1/labels", labels_body(batch)
                )
            )
        return total

    # --- plumbing ------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> Any:
        return await acall_with_retries(
            self._http, self.retry, method, path, json_request_body(body)
        )

    async def aclose(self) -> None:
        """Stop the flusher, send what is buffered (raising if that fails), close HTTP."""
        if self._closed:
            return
        self._closed = True
        await self._flusher.stop()
        try:
            await self.flush()
        finally:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
