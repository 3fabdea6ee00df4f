"""The events API: ``POST /v1/events`` stores business events in batches, each event once.

Mounted on the edge at ``/v1/events`` (``build_edge(mounts={"/v1/events": EventsApp})``).
An application sends the events that business metrics count (a purchase, a click, revenue);
analysis joins them to exposures by unit id.

Request
-------
``POST /v1/events`` with an API key holding the ``ingest`` scope (``Authorization: Bearer
rk_...`` or ``X-Rampart-Key``; not checked when ``EDGE_REQUIRE_KEY`` is false) and the body
``{"events": [event, ...]}`` or a bare JSON list of events. Each event::

    {"event_id": "9f1c...",             # string, 1-128 characters; the idempotency key
     "unit_id": "u-42",                 # string (or integer), 1-200 characters
     "name": "purchase",                # string, 1-128 characters
     "value": 19.99,                    # optional finite number, default 1
     "timestamp": "2024-05-01T12:00:00Z"}  # optional: ISO 8601 with an offset, or epoch
                                           # seconds; default: the time of receipt

Strings may not contain NUL characters, and no other fields are accepted (a misspelt
``vaule`` would otherwise silently become the default value 1).

Answer
------
``200 {"accepted": n, "duplicates": m}``: n events were stored; m were ignored because their
``event_id`` was already stored, by an earlier batch or earlier in this one (the first one
wins). Sending a batch again is therefore safe: the retry answers with every event counted
as a duplicate. The answer comes after the batch's transaction has committed.

Errors are problem details (``application/problem+json``, as everywhere on the edge; codes
in docs/errors.md). A batch is validated whole before anything is written, and any bad
event refuses the whole batch, listing every bad event by position::

    400 {"type": "urn:rampart:problem:validation_error", "title": "Invalid input",
         "status": 400, "code": "validation_error", "index": 3, "field": "value",
         "detail": "event 3: value must be a finite number",
         "errors": [{"index": 3, "field": "value", "code": "validation_error",
                     "message": "value must be a finite number"}, ...]}

``index`` and ``field`` name the first bad event (``field`` is null when the event itself
is not an object); the top-level ``code`` is the first error's: ``validation_error``,
``unknown_field`` or ``invalid_encoding`` (a string that is not UTF-8). A ``timestamp``
more than ``EDGE_MAX_CLOCK_SKEW_S`` (default 300 s) after the time of receipt is refused:
``9999-12-31T23:59:59Z`` is a bug, not a clock. Other errors: 400 ``malformed_json``,
``unknown_field`` or ``validation_error`` (the body's shape, or more than
``MAX_EVENTS_PER_BATCH`` events), 401/403 (key), 404 (other paths), 405 (not POST), 413
``payload_too_large`` (a body over ``MAX_EVENTS_BODY_BYTES``), 503 ``not_ready`` (no
routing snapshot to check keys against yet) and 503 ``store_unavailable`` (the database
failed; nothing was written, retry the batch; ``Retry-After: 1``).

Storage
-------
Parsing, validation and the write run in a writer thread, so the event loop keeps serving
decisions. Each writer thread owns one database connection and writes a batch in one
transaction (``events_insert``). PostgreSQL: COPY into a per-connection temporary staging
table, then ``INSERT ... SELECT ... ON CONFLICT (event_id) DO NOTHING``; SQLite:
``executemany`` of ``INSERT ... ON CONFLICT (event_id) DO NOTHING``. Either way the number of
rows inserted is exact, and duplicates = batch size - inserted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from django.conf import settings
from django.db import DatabaseError, OperationalError, connection

from routing.db import close_thread_connections, run_with_db
from routing.edge import ingest_metrics
from routing.edge.asgi import (
    Receive,
    Scope,
    Send,
    method_not_allowed,
    not_ready_error,
    send_error,
    send_json,
    send_problem,
)
from routing.edge.batch import (
    TimestampParser,
    batch_refusal,
    check_scope,
    latest_timestamp,
    parse_batch,
    read_limited_body,
    text_field,
    unit_id_field,
    unknown_fields,
)
from routing.edge.context import SCOPE_INGEST, EdgeContext
from routing.edge.problems import EdgeError, FieldError
from routing.observe.backoff import FailureLog
from routing.observe.event_store import EventRow, events_insert

logger = logging.getLogger(__name__)

MOUNT_PATH: Final = "/v1/events"
MAX_EVENTS_PER_BATCH: Final = 10_000
# 10,000 events of the longest allowed strings take about 5 MB of JSON.
MAX_EVENTS_BODY_BYTES: Final = 8 * 1024 * 1024
MAX_EVENT_ID_LENGTH: Final = 128
MAX_NAME_LENGTH: Final = 128
# Writer threads (one connection each). SQLite takes one writer at a time, so more threads
# would only wait for its lock; PostgreSQL writes batches in parallel.
WRITERS_SQLITE: Final = 1
WRITERS_POSTGRESQL: Final = 4
# A deadlock or serialization failure aborts the transaction; it is retried this often.
WRITE_ATTEMPTS: Final = 3

EVENT_FIELDS: Final = frozenset({"event_id", "unit_id", "name", "value", "timestamp"})
_RETRYABLE_SQLSTATES: Final = frozenset({"40P01", "40001"})  # deadlock, serialization


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """A validated batch: the rows to write, first occurrence of each event_id only."""

    rows: list[EventRow]
    size: int

    @property
    def repeated(self) -> int:
        """Events dropped because their event_id appeared earlier in the same batch."""
        return self.size - len(self.rows)


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int


# --- validation ---------------------------------------------------------------------------


def parse_events(
    body: bytes, *, now: datetime, max_events: int = MAX_EVENTS_PER_BATCH
) -> ParsedBatch:
    """Parse and validate a request body; nothing is written.

    Raises EdgeError: the shape's errors (``parse_batch``), or a 400 that lists every
    invalid event by ``index`` and field (``batch_refusal``). ``now`` (aware, UTC) is the
    timestamp of events that carry none; timestamps more than ``EDGE_MAX_CLOCK_SKEW_S``
    after it are refused.
    """
    events = parse_batch(body, name="events", max_items=max_events, allow_list=True)
    rows: list[EventRow] = []
    seen: set[str] = set()
    errors: list[dict[str, Any]] = []
    parse_time = TimestampParser(latest=latest_timestamp(now))
    for index, item in enumerate(events):
        try:
            if type(item) is not dict:
                raise FieldError(None, "each event must be a JSON object")
            if len(item) > 3 and not EVENT_FIELDS.issuperset(item):
                raise unknown_fields(item, EVENT_FIELDS)
            event_id = text_field("event_id", item.get("event_id"), MAX_EVENT_ID_LENGTH)
            unit_id = unit_id_field(item.get("unit_id"))
            name = text_field("name", item.get("name"), MAX_NAME_LENGTH)
            value = _value(item.get("value"))
            raw_time = item.get("timestamp")
            timestamp = now if raw_time is None else parse_time(raw_time)
        except FieldError as error:
            errors.append(error.entry(index))
            continue
        if event_id in seen:
            continue
        seen.add(event_id)
        rows.append((event_id, unit_id, name, value, timestamp))
    if errors:
        raise batch_refusal(errors, "event")
    return ParsedBatch(rows=rows, size=len(events))


def _value(value: Any) -> float:
    if value is None:
        return 1.0
    kind = type(value)
    if kind is float:
        # orjson refuses NaN and infinities, but a caller of parse_events may not use it.
        if math.isfinite(value):
            return float(value)
        raise FieldError("value", "value must be a finite number")
    if kind is int:
        return float(value)
    raise FieldError("value", "value must be a number")


# --- storage ------------------------------------------------------------------------------


def _retryable(error: DatabaseError) -> bool:
    return getattr(error.__cause__, "sqlstate", None) in _RETRYABLE_SQLSTATES


def ingest_batch(body: bytes, *, max_events: int = MAX_EVENTS_PER_BATCH) -> IngestResult:
    """Validate ``body`` and write its events; the synchronous core of ``EventsApp``."""
    now = datetime.now(UTC)
    batch = parse_events(body, now=now, max_events=max_events)
    inserted = 0
    if batch.rows:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                inserted = run_with_db(lambda: events_insert(rows=batch.rows, received_at=now))
                break
            except OperationalError as error:
                if attempt == WRITE_ATTEMPTS or not _retryable(error):
                    raise
                logger.warning("event batch aborted (%s); retrying", error)
    return IngestResult(accepted=inserted, duplicates=batch.size - inserted)


# --- the ASGI part ------------------------------------------------------------------------


class EventsApp:
    """The ``/v1/events`` part of the edge (``routing.edge.context.SubApp``)."""

    def __init__(
        self,
        context: EdgeContext,
        *,
        max_events: int = MAX_EVENTS_PER_BATCH,
        max_body_bytes: int = MAX_EVENTS_BODY_BYTES,
        writers: int | None = None,
        failure_log_s: float | None = None,
    ) -> None:
        self.context = context
        # While the database is down every batch fails: one log line per interval, not a
        # traceback per batch.
        self._failures = FailureLog(
            logger,
            "writing event batches",
            interval_s=float(
                settings.RECORDER_FAILURE_LOG_S if failure_log_s is None else failure_log_s
            ),
        )
        self.max_events = max_events
        self.max_body_bytes = max_body_bytes
        self.writers = writers
        self._executors: list[ThreadPoolExecutor] = []
        self._idle: asyncio.Queue[ThreadPoolExecutor] | None = None

    async def startup(self) -> None:
        """Start the writer threads (one database connection each)."""
        if self._idle is not None:
            return
        count = self.writers
        if count is None:
            count = WRITERS_POSTGRESQL if connection.vendor == "postgresql" else WRITERS_SQLITE
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rampart-events-{number}")
            for number in range(count)
        ]
        self._idle = asyncio.Queue()
        for executor in self._executors:
            self._idle.put_nowait(executor)

    async def shutdown(self) -> None:
        """Wait for batches in flight, then close each writer's connection and thread."""
        idle, self._idle = self._idle, None
        if idle is None:
            return
        loop = asyncio.get_running_loop()
        for _ in self._executors:
            executor = await idle.get()
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)
        self._executors = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            result = await self._handle(scope, receive)
        except EdgeError as error:
            ingest_metrics.REQUESTS_REJECTED.labels(error.code).inc()
            await send_problem(send, error)
            return
        except Exception:
            logger.exception("an event batch failed")
            ingest_metrics.REQUESTS_REJECTED.labels("server_error").inc()
            await send_error(send, 500, "server_error", "the events API failed; retry the batch")
            return
        await send_json(
            send,
            200,
            orjson.dumps({"accepted": result.accepted, "duplicates": result.duplicates}),
        )

    async def _handle(self, scope: Scope, receive: Receive) -> IngestResult:
        if scope["path"].rstrip("/") != MOUNT_PATH:
            raise EdgeError(404, "not_found", f"no such endpoint: {scope['path']}")
        if scope["method"] != "POST":
            raise method_not_allowed("POST")
        check_scope(self.context, scope, SCOPE_INGEST)
        body = await read_limited_body(scope, receive, self.max_body_bytes)
        idle = self._idle
        if idle is None:
            raise not_ready_error("the events API has not started")
        started = time.perf_counter()
        executor = await idle.get()
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(executor, self._ingest, body)
        except DatabaseError as error:
            ingest_metrics.WRITE_ERRORS.inc()
            self._failures.failed(error, "batches are answered 503 store_unavailable")
            raise EdgeError(
                503,
                "store_unavailable",
                "the event store is unavailable; nothing was written, retry the batch",
                headers=((b"retry-after", b"1"),),
            ) from None
        finally:
            idle.put_nowait(executor)
        if self._failures.failing:
            self._failures.succeeded()
        ingest_metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return result

    def _ingest(self, body: bytes) -> IngestResult:
        try:
            result = ingest_batch(body, max_events=self.max_events)
        except EdgeError as error:
            if error.index is not None:
                # Count the events of the refused batch; a second parse only on this path.
                ingest_metrics.EVENTS_REJECTED.inc(_count_events(body))
            raise
        ingest_metrics.EVENTS_ACCEPTED.inc(result.accepted)
        ingest_metrics.EVENTS_DUPLICATE.inc(result.duplicates)
        ingest_metrics.BATCH_EVENTS.observe(result.accepted + result.duplicates)
        return result


def _count_events(body: bytes) -> int:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0  # refused for its encoding: the events cannot be counted cheaply
    events = data.get("events") if isinstance(data, dict) else data
    return len(events) if isinstance(events, list) else 0
