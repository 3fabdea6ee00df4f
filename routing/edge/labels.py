"""The labels API: ``POST /v1/labels`` stores the true outcome of proxied requests, once each.

Mounted on the edge at ``/v1/labels``. The proxy gives every answer of an experiment with
quality tracking on an ``X-Rampart-Request-Id`` (``routing.proxy.predictions``); the
application sends the truth for that request later (a click, a chargeback, a human label),
and the quality guardrails compare it with the prediction the proxy recorded.

Request
-------
``POST /v1/labels`` with an API key holding the ``ingest`` scope (as for ``/v1/events``) and
the body ``{"labels": [label, ...]}``. Each label::

    {"request_id": "5f0c1a2b3c4d-1f",    # string, 1-128 characters, from X-Rampart-Request-Id
     "label": "cat",                     # a string (at most 200 characters), a finite number
                                         # or a boolean: the true class, or the true number
     "timestamp": "2024-05-01T12:00:00Z"}  # optional: when the truth became known (ISO 8601
                                           # with an offset, or epoch seconds); default: now

No other fields are accepted. A batch is validated whole before anything is written; a bad
label refuses the batch with a 400 problem naming each bad label by ``index`` and ``field``,
exactly like the events API (``routing.edge.ingest``).

Answer
------
``200 {"accepted": n, "duplicates": m, "unmatched": k}``: n labels were stored; m were
ignored because their request id already had a label (the first one wins, so sending a batch
again is safe); k of the n stored labels name a request id with no recorded prediction yet:
an unknown request, one that was not sampled, or one whose prediction is still in the proxy's
buffer (up to ``RECORDER_FLUSH_S``). Those are not errors: they are counted
(``rampart_labels_unmatched_total``) and kept, and join their prediction if it arrives.
Errors: as the events API (400, 401/403, 404, 405, 413, 503 ``not_ready`` and
``store_unavailable`` with ``Retry-After: 1``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from django.conf import settings
from django.db import DatabaseError, connection, transaction

from routing.db import close_thread_connections, run_with_db
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
    unknown_fields,
)
from routing.edge.context import SCOPE_INGEST, EdgeContext
from routing.edge.problems import EdgeError, FieldError
from routing.models import Label, Prediction
from routing.observe import quality_metrics
from routing.observe.backoff import FailureLog

logger = logging.getLogger(__name__)

MOUNT_PATH: Final = "/v1/labels"
MAX_LABELS_PER_BATCH: Final = 10_000
MAX_LABELS_BODY_BYTES: Final = 4 * 1024 * 1024
MAX_REQUEST_ID_LENGTH: Final = 128
MAX_LABEL_LENGTH: Final = 200
LABEL_FIELDS: Final = frozenset({"request_id", "label", "timestamp"})
# Rows per INSERT ... RETURNING and per IN (...) lookup: far below every database's limit
# on bound parameters.
_CHUNK: Final = 500

# (request_id, label as JSON text, labelled_at as epoch seconds)
LabelRow = tuple[str, str, float]


@dataclass(frozen=True, slots=True)
class LabelResult:
    accepted: int
    duplicates: int
    unmatched: int


def parse_labels(
    body: bytes, *, now: datetime, max_labels: int = MAX_LABELS_PER_BATCH
) -> tuple[list[LabelRow], int]:
    """The batch's rows (first label of each request id) and its size; nothing is written.

    Raises EdgeError: the shape's errors, or a 400 listing every invalid label.
    """
    items = parse_batch(body, name="labels", max_items=max_labels, allow_list=False)
    rows: list[LabelRow] = []
    seen: set[str] = set()
    errors: list[dict[str, Any]] = []
    parse_time = TimestampParser(latest=latest_timestamp(now))
    default_time = now.timestamp()
    for index, item in enumerate(items):
        try:
            if type(item) is not dict:
                raise FieldError(None, "each label must be a JSON object")
            if not LABEL_FIELDS.issuperset(item):
                raise unknown_fields(item, LABEL_FIELDS)
            request_id = text_field("request_id", item.get("request_id"), MAX_REQUEST_ID_LENGTH)
            value = _label_text(item.get("label", None), "label" in item)
            raw_time = item.get("timestamp")
            moment = default_time if raw_time is None else parse_time(raw_time).timestamp()
        except FieldError as error:
            errors.append(error.entry(index))
            continue
        if request_id in seen:
            continue
        seen.add(request_id)
        rows.append((request_id, value, moment))
    if errors:
        raise batch_refusal(errors, "label")
    return rows, len(items)


def _label_text(value: Any, present: bool) -> str:
    """The label as JSON text: a class (string, integer, boolean) or a finite number."""
    kind = type(value)
    if kind is str:
        if not value or len(value) > MAX_LABEL_LENGTH or "\x00" in value:
            raise FieldError(
                "label", f"a text label has 1 to {MAX_LABEL_LENGTH} characters and no NUL"
            )
    elif kind is float:
        if not math.isfinite(value):
            raise FieldError("label", "label must be a finite number")
    elif kind is not int and kind is not bool:
        what = "is required" if not present else "must be a string, a number or a boolean"
        raise FieldError("label", f"label {what}")
    return orjson.dumps(value).decode()


def labels_insert(*, rows: Sequence[LabelRow], received_at: float) -> tuple[int, int]:
    """Insert labels whose request id has none yet; (inserted, inserted without a prediction).

    One transaction. ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` names the rows really
    inserted (PostgreSQL, and SQLite since 3.35), so the count is exact under races.
    """
    if not rows:
        return 0, 0
    label_table = connection.ops.quote_name(Label._meta.db_table)
    prediction_table = connection.ops.quote_name(Prediction._meta.db_table)
    # Request id order: two batches racing on the same ids take the unique index's locks in
    # the same order on PostgreSQL, so they cannot deadlock each other.
    ordered = sorted(rows)
    inserted: list[str] = []
    matched = 0
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, len(ordered), _CHUNK):
            chunk = ordered[start : start + _CHUNK]
            params: list[object] = []
            for request_id, value, labelled_at in chunk:
                params.extend((request_id, value, labelled_at, received_at))
            values = ", ".join(["(%s, %s, %s, %s)"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {label_table} (request_id, value, labelled_at, received_at) "
                f"VALUES {values} ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                params,
            )
            inserted.extend(row[0] for row in cursor.fetchall())
        for start in range(0, len(inserted), _CHUNK):
            chunk_ids = inserted[start : start + _CHUNK]
            marks = ", ".join(["%s"] * len(chunk_ids))
            cursor.execute(
                f"SELECT COUNT(DISTINCT request_id) FROM {prediction_table} "
                f"WHERE request_id IN ({marks})",
                chunk_ids,
            )
            matched += int(cursor.fetchone()[0])
    return len(inserted), len(inserted) - matched


def ingest_labels(body: bytes, *, max_labels: int = MAX_LABELS_PER_BATCH) -> LabelResult:
    """Validate ``body`` and write its labels; the synchronous core of ``LabelsApp``."""
    now = datetime.now(UTC)
    rows, size = parse_labels(body, now=now, max_labels=max_labels)
    received_at = time.time()
    inserted, unmatched = run_with_db(lambda: labels_insert(rows=rows, received_at=received_at))
    return LabelResult(accepted=inserted, duplicates=size - inserted, unmatched=unmatched)


class LabelsApp:
    """The ``/v1/labels`` part of the edge (``routing.edge.app.SubApp``): one writer thread."""

    def __init__(
        self,
        context: EdgeContext,
        *,
        max_labels: int = MAX_LABELS_PER_BATCH,
        max_body_bytes: int = MAX_LABELS_BODY_BYTES,
    ) -> None:
        self.context = context
        self.max_labels = max_labels
        self.max_body_bytes = max_body_bytes
        self._failures = FailureLog(
            logger, "writing label batches", interval_s=float(settings.RECORDER_FAILURE_LOG_S)
        )
        self._executor: ThreadPoolExecutor | None = None

    async def startup(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-labels")

    async def shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            result = await self._handle(scope, receive)
        except EdgeError as error:
            quality_metrics.LABEL_REQUESTS_REJECTED.labels(error.code).inc()
            await send_problem(send, error)
            return
        except Exception:
            logger.exception("a label batch failed")
            quality_metrics.LABEL_REQUESTS_REJECTED.labels("server_error").inc()
            await send_error(send, 500, "server_error", "the labels API failed; retry the batch")
            return
        await send_json(
            send,
            200,
            orjson.dumps(
                {
                    "accepted": result.accepted,
                    "duplicates": result.duplicates,
                    "unmatched": result.unmatched,
                }
            ),
        )

    async def _handle(self, scope: Scope, receive: Receive) -> LabelResult:
        if scope["path"].rstrip("/") != MOUNT_PATH:
            raise EdgeError(404, "not_found", f"no such endpoint: {scope['path']}")
        if scope["method"] != "POST":
            raise method_not_allowed("POST")
        check_scope(self.context, scope, SCOPE_INGEST)
        body = await read_limited_body(scope, receive, self.max_body_bytes)
        executor = self._executor
        if executor is None:
            raise not_ready_error("the labels API has not started")
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, self._ingest, body)
        except DatabaseError as error:
            self._failures.failed(error, "batches are answered 503 store_unavailable")
            raise EdgeError(
                503,
                "store_unavailable",
                "the label store is unavailable; nothing was written, retry the batch",
                headers=((b"retry-after", b"1"),),
            ) from None
        if self._failures.failing:
            self._failures.succeeded()
        return result

    def _ingest(self, body: bytes) -> LabelResult:
        result = ingest_labels(body, max_labels=self.max_labels)
        quality_metrics.LABELS_ACCEPTED.inc(result.accepted)
        quality_metrics.LABELS_DUPLICATE.inc(result.duplicates)
        quality_metrics.LABELS_UNMATCHED.inc(result.unmatched)
        return result
