"""What the sync and async SDK clients share: retry policy, answers, and the event buffer."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpx

from rampart_sdk.errors import ApiError, RampartConnectionError, RampartError, api_error
from rampart_sdk.records import Decision, Event, Label, LabelResult, TrackResult

logger = logging.getLogger("rampart_sdk")

USER_AGENT: Final = "rampart-python-sdk/1"
# The edge answers at most this many units per /v1/decide/batch request.
MAX_UNITS_PER_REQUEST: Final = 1000
# The labels API's limit per batch (routing.edge.labels.MAX_LABELS_PER_BATCH).
MAX_LABELS_PER_BATCH: Final = 10_000
# At most one "buffer full" warning per this many seconds; ``dropped`` counts every event.
_DROP_LOG_INTERVAL_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of 5xx answers and connection failures, with capped exponential backoff.

    Every request the SDK makes is safe to repeat: decisions are deterministic (an exposure
    is recorded once), config reads change nothing, and events carry ids the server stores
    once. The delay before retry ``n`` (0-based) is ``min(cap, base * 2**n)`` times a random
    factor in [0.5, 1], so clients that failed together do not retry together.
    """

    max_retries: int = 3
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 2.0

    def delay_s(self, retry: int) -> float:
        delay: float = min(self.backoff_cap_s, self.backoff_base_s * 2.0**retry)
        return delay * random.uniform(0.5, 1.0)

    def delay_after(self, retry: int, error: RampartError) -> float | None:
        """Seconds to wait before retry ``retry`` after ``error``; None: do not retry.

        A server's ``Retry-After`` is honoured (an edge that lacks an experiment asks for
        one snapshot refresh) unless it is longer than ``backoff_cap_s``: the error is then
        raised at once, carrying ``retry_after_s``, for the caller to decide.
        """
        if retry >= self.max_retries:
            return None
        asked = error.retry_after_s if isinstance(error, ApiError) else None
        if asked is None:
            return self.delay_s(retry)
        return asked if asked <= self.backoff_cap_s else None


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}


def error_for(response: httpx.Response) -> ApiError:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    return api_error(
        response.status_code,
        payload,
        response.text,
        retry_after_s=retry_after(response.headers.get("retry-after")),
    )


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delay-seconds form; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def connection_error(exc: httpx.TransportError) -> RampartConnectionError:
    return RampartConnectionError(f"{type(exc).__name__}: {exc}")


def json_body(response: httpx.Response) -> Any:
    """The decoded body of a 2xx answer; raises the typed error of any other answer."""
    if response.status_code >= 400:
        raise error_for(response)
    return response.json()


def json_request_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def decisions_from(payload: Any) -> list[Decision]:
    return [Decision.from_json(item) for item in payload["decisions"]]


def events_body(events: Sequence[Event]) -> bytes:
    return json_request_body({"events": [event.as_json() for event in events]})


def track_result(payload: Any) -> TrackResult:
    return TrackResult(accepted=int(payload["accepted"]), duplicates=int(payload["duplicates"]))


def labels_body(labels: Sequence[Label]) -> bytes:
    return json_request_body({"labels": [label.as_json() for label in labels]})


def label_result(payload: Any) -> LabelResult:
    return LabelResult(
        accepted=int(payload["accepted"]),
        duplicates=int(payload["duplicates"]),
        unmatched=int(payload["unmatched"]),
    )


def make_label(
    request_id: str, label: str | int | float | bool, timestamp: datetime | float | None
) -> Label:
    """A Label from ``track_label``'s arguments: epoch seconds become an aware UTC datetime."""
    if timestamp is None:
        return Label(request_id, label)
    if not isinstance(timestamp, datetime):
        timestamp = datetime.fromtimestamp(timestamp, UTC)
    return Label(request_id, label, timestamp)


def label_chunks(labels: Iterable[Label]) -> list[list[Label]]:
    """Labels in batches the labels API takes (at most MAX_LABELS_PER_BATCH each)."""
    items = list(labels)
    return [
        items[start : start + MAX_LABELS_PER_BATCH]
        for start in range(0, len(items), MAX_LABELS_PER_BATCH)
    ]


def unit_chunks(units: Iterable[str | int]) -> list[list[str | int]]:
    """Units in request-sized chunks, in order."""
    chunk: list[str | int] = []
    chunks = [chunk]
    for unit in units:
        if len(chunk) == MAX_UNITS_PER_REQUEST:
            chunk = []
            chunks.append(chunk)
        chunk.append(unit)
    return chunks if chunk else []


def is_retryable(error: RampartError) -> bool:
    """Connection failures and 5xx answers are retried; other errors are final."""
    return isinstance(error, RampartConnectionError) or (
        isinstance(error, ApiError) and error.status >= 500
    )


class EventBuffer:
    """Events waiting to be sent, oldest first; thread-safe and bounded.

    A batch that failed with a retryable error goes back to the front, so events keep
    their order and, with their ids unchanged, are stored once however often they are
    sent. Past ``max_events`` new events are dropped, counted and logged: a caller's
    request must not fail, or grow memory without bound, because the events API is down.
    """

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self.dropped = 0
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()
        self._last_drop_log = 0.0

    def __len__(self) -> int:
        return len(self._events)

    def add(self, events: Iterable[Event]) -> int:
        """Buffer ``events``; returns how many are waiting now."""
        with self._lock:
            for event in events:
                if len(self._events) >= self.max_events:
                    self._drop_locked(1)
                else:
                    self._events.append(event)
            return len(self._events)

    def take(self, count: int) -> list[Event]:
        """Remove and return up to ``count`` of the oldest events."""
        with self._lock:
            taken = min(count, len(self._events))
            return [self._events.popleft() for _ in range(taken)]

    def put_back(self, events: Sequence[Event]) -> None:
        """Return a batch that failed to the front (dropping the newest past the bound)."""
        with self._lock:
            self._events.extendleft(reversed(events))
            excess = len(self._events) - self.max_events
            for _ in range(max(excess, 0)):
                self._events.pop()
            if excess > 0:
                self._drop_locked(excess)

    def _drop_locked(self, count: int) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            logger.warning(
                "rampart: event buffer full (%d events); %d dropped so far",
                self.max_events,
                self.dropped,
            )
