"""HTTP helpers shared by the edge's batch APIs (events, exposures): bodies, keys, items.

A batch API validates its whole batch before it writes anything, and names the item and
the field at fault. The field rules here raise ``FieldError`` (no position); the batch loop
knows the position and turns it into its ``InvalidItem`` subclass, so one rule serves every
API and costs nothing (a ``try`` block is free until it raises).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import orjson

from routing.edge import (
    MAX_UNIT_LENGTH,
    EdgeContext,
    EdgeError,
    Receive,
    Scope,
    header_value,
    read_body,
)

# Epoch seconds must name a time datetime can hold (before the year 10000); epoch
# milliseconds, the usual mistake, fall far beyond it and are refused.
MAX_EPOCH_SECONDS: Final = 253_402_300_800


class FieldError(Exception):
    """One field of one item breaks a rule; ``field`` is None when the item itself does."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class InvalidItem(Exception):
    """One item of a batch breaks a rule; the whole batch is refused.

    Subclasses name the error ``code`` of their API (``invalid_event``...).
    """

    code: ClassVar[str] = "invalid_item"

    def __init__(self, index: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.field = field
        self.message = message

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "index": self.index,
            "field": self.field,
            "message": self.message,
        }

    def as_body(self) -> bytes:
        """``{"error": {"code", "index", "field", "message"}}``."""
        return orjson.dumps({"error": self.as_json()})


# --- request ------------------------------------------------------------------------------


def check_scope(context: EdgeContext, scope: Scope, required: str) -> None:
    """Raise the edge's 401/403 (or 503 before the first snapshot) unless the key may call.

    Does nothing when ``EDGE_REQUIRE_KEY`` is false.
    """
    if not context.require_key:
        return
    if not context.snapshots.current.loaded:
        raise EdgeError(503, "not_ready", "the routing snapshot is not loaded yet")
    failed = context.check_key(scope["headers"], required)
    if failed is not None:
        code = "unauthorized" if failed.status == 401 else "forbidden"
        raise EdgeError(failed.status, code, failed.error)


async def read_limited_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body; 413 at once when Content-Length announces more than ``limit``."""
    declared = header_value(scope["headers"], b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise EdgeError(413, "too_large", f"the request body exceeds {limit} bytes")
    return await read_body(receive, limit)


def parse_batch(body: bytes, *, name: str, max_items: int, allow_list: bool) -> list[Any]:
    """The items of ``{name: [...]}`` (or of a bare JSON list when ``allow_list``).

    Raises EdgeError: 400 ``invalid`` for bad JSON or shape, 413 ``too_large`` past
    ``max_items``.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EdgeError(400, "invalid", f"the body is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {name})
        if unknown:
            raise EdgeError(400, "invalid", f"unknown field {unknown[0]!r}", unknown[0])
        if name not in data:
            raise EdgeError(400, "invalid", f"{name} is required", name)
        items = data[name]
    elif allow_list:
        items = data
    else:
        items = None
    if not isinstance(items, list):
        shape = f'{{"{name}": [...]}}' + (f" or a JSON list of {name}" if allow_list else "")
        raise EdgeError(400, "invalid", f"the body must be {shape}", name)
    if len(items) > max_items:
        raise EdgeError(
            413, "too_large", f"at most {max_items} {name} per batch, got {len(items)}", name
        )
    return items


# --- field rules --------------------------------------------------------------------------


def text_field(field: str, value: Any, max_length: int) -> str:
    """A string of 1 to ``max_length`` characters without NUL."""
    if type(value) is str and 0 < len(value) <= max_length and "\x00" not in value:
        return value
    if value is None or value == "":
        raise FieldError(field, f"{field} is required")
    if not isinstance(value, str):
        raise FieldError(field, f"{field} must be a string")
    if "\x00" in value:
        raise FieldError(field, f"{field} must not contain NUL characters")
    raise FieldError(field, f"{field} is longer than {max_length} characters")


def unit_id_field(value: Any, field: str = "unit_id") -> str:
    """A unit id: 1 to 200 characters; an integer is taken as its decimal string.

    Integers are accepted as /v1/decide accepts them, so a unit id sent as a number matches
    the exposure recorded for it there.
    """
    if type(value) is int:
        value = str(value)
    return text_field(field, value, MAX_UNIT_LENGTH)


class TimestampParser:
    """Turns an ISO 8601 string (with an offset) or epoch seconds into an aware UTC datetime.

    Items of one batch often share a timestamp string, so parsed strings are remembered
    for the batch: make one parser per batch.
    """

    def __init__(self, field: str = "timestamp") -> None:
        self.field = field
        self.parsed: dict[str, datetime] = {}

    def __call__(self, raw: Any) -> datetime:
        kind = type(raw)
        if kind is str:
            cached = self.parsed.get(raw)
            if cached is None:
                cached = self._parse_iso(raw)
                self.parsed[raw] = cached
            return cached
        if kind is int or kind is float:
            if not (math.isfinite(raw) and 0 <= raw < MAX_EPOCH_SECONDS):
                raise FieldError(
                    self.field,
                    f"{self.field} in epoch seconds must lie between 0 and 253402300800 "
                    "(seconds, not milliseconds)",
                )
            return datetime.fromtimestamp(raw, UTC)
        raise FieldError(self.field, f"{self.field} must be an ISO 8601 string or epoch seconds")

    def _parse_iso(self, raw: str) -> datetime:
        field = self.field
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise FieldError(field, f"{field} {raw[:40]!r} is not an ISO 8601 date-time") from None
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise FieldError(field, f"{field} needs a UTC offset, e.g. 2024-05-01T12:00:00Z")
        if parsed.tzinfo is UTC:
            return parsed
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise FieldError(field, f"{field} is out of range") from None
