"""HTTP helpers shared by the edge's batch APIs (events, exposures): bodies, keys, items.

A batch API validates its whole batch before it writes anything, and names the item and
the field at fault. The field rules here raise ``FieldError`` (no position); the batch loop
knows the position and adds it (``FieldError.entry(index)``, ``batch_refusal``), so one
rule serves every API and costs nothing (a ``try`` block is free until it raises).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from django.conf import settings

from routing.edge.asgi import Receive, Scope, auth_error, header_value, not_ready_error, read_body
from routing.edge.context import EdgeContext
from routing.edge.inputs import MAX_UNIT_LENGTH, check_unit_id, loads_json
from routing.edge.problems import EdgeError, FieldError

# Epoch seconds must name a time datetime can hold (before the year 10000); epoch
# milliseconds, the usual mistake, fall far beyond it and are refused.
MAX_EPOCH_SECONDS: Final = 253_402_300_800
# The code of an item that is well formed but disagrees with the edge's routing snapshot.
ASSIGNMENT_CONFLICT: Final = "assignment_conflict"


def batch_refusal(errors: list[dict[str, Any]], what: str) -> EdgeError:
    """The 400 that refuses a whole batch: the first error's code, every error listed.

    Each entry names its item (``index``) and the field within it (``field``; null when the
    item itself is wrong), as ``FieldError.entry`` builds them; ``what`` names an item
    ("event") in the detail.
    """
    first = errors[0]
    detail = f"{what} {first['index']}: {first['message']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more errors)"
    # Well-formed items that only disagree with the edge's state are a conflict (409); one
    # malformed item makes the batch a bad request (400), listing the conflicts as well.
    malformed = [entry for entry in errors if entry["code"] != ASSIGNMENT_CONFLICT]
    status = 400 if malformed else 409
    lead = malformed[0] if malformed else first
    return EdgeError(
        status, lead["code"], detail, first["field"], errors=errors, index=first["index"]
    )


# --- request ------------------------------------------------------------------------------


def check_scope(context: EdgeContext, scope: Scope, required: str, *alternatives: str) -> None:
    """Raise the edge's 401/403 (or 503 before the first snapshot) unless the key may call.

    The key needs ``required`` or one of ``alternatives``; the 403 names ``required``. Does
    nothing when ``EDGE_REQUIRE_KEY`` is false.
    """
    if not context.require_key:
        return
    if not context.snapshots.current.loaded:
        raise not_ready_error()
    failed = context.check_key(scope["headers"], required)
    if failed is None:
        return
    if failed.status == 403:
        for alternative in alternatives:
            if context.check_key(scope["headers"], alternative) is None:
                return
    raise auth_error(failed)


async def read_limited_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body; 413 at once when Content-Length announces more than ``limit``."""
    declared = header_value(scope["headers"], b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise EdgeError(413, "payload_too_large", f"the request body exceeds {limit} bytes")
    return await read_body(receive, limit)


def parse_batch(body: bytes, *, name: str, max_items: int, allow_list: bool) -> list[Any]:
    """The items of ``{name: [...]}`` (or of a bare JSON list when ``allow_list``).

    Raises EdgeError: 400 ``malformed_json``, ``invalid_encoding`` (naming the item and
    field), ``unknown_field`` or ``validation_error`` for the shape or past ``max_items``.
    """
    data = loads_json(body, batch_key=name)
    if isinstance(data, dict):
        unknown = sorted(set(data) - {name})
        if unknown:
            raise EdgeError(400, "unknown_field", f"unknown field {unknown[0]!r}", unknown[0])
        if name not in data:
            raise EdgeError(400, "validation_error", f"{name} is required", name)
        items = data[name]
    elif allow_list:
        items = data
    else:
        items = None
    if not isinstance(items, list):
        shape = f'{{"{name}": [...]}}' + (f" or a JSON list of {name}" if allow_list else "")
        raise EdgeError(400, "validation_error", f"the body must be {shape}", name)
    if len(items) > max_items:
        # A rule about the content, like every other limit of an item: 400, where 413 is kept
        # for bodies too large in bytes.
        raise EdgeError(
            400,
            "validation_error",
            f"at most {max_items} {name} per batch, got {len(items)}",
            name,
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
    if type(value) is str and 0 < len(value) <= MAX_UNIT_LENGTH and "\x00" not in value:
        return value
    return check_unit_id(value, field)


def unknown_fields(item: dict[str, Any], allowed: frozenset[str]) -> FieldError:
    """The refusal of an item with fields not in ``allowed`` (the first one named)."""
    field = sorted(set(item) - allowed)[0]
    return FieldError(field, f"unknown field {field!r}", "unknown_field")


def latest_timestamp(now: datetime) -> datetime:
    """The latest timestamp an event or exposure may carry: ``EDGE_MAX_CLOCK_SKEW_S`` ahead."""
    try:
        return now + timedelta(seconds=float(settings.EDGE_MAX_CLOCK_SKEW_S))
    except OverflowError:  # a skew past the year 9999 leaves only the calendar's limit
        return datetime.max.replace(tzinfo=UTC)


class TimestampParser:
    """Turns an ISO 8601 string (with an offset) or epoch seconds into an aware UTC datetime.

    Items of one batch often share a timestamp string, so parsed strings are remembered
    for the batch: make one parser per batch. With ``latest``, a later time is refused
    (FieldError): a client clock can run a little ahead, a year 9999 cannot.
    """

    def __init__(self, field: str = "timestamp", *, latest: datetime | None = None) -> None:
        self.field = field
        self.latest = latest
        self.parsed: dict[str, datetime] = {}

    def __call__(self, raw: Any) -> datetime:
        parsed = self._parse(raw)
        latest = self.latest
        if latest is not None and parsed > latest:
            raise FieldError(
                self.field,
                f"{self.field} {parsed.isoformat()} lies in the future, beyond the allowed "
                f"clock skew of {settings.EDGE_MAX_CLOCK_SKEW_S:g} s (EDGE_MAX_CLOCK_SKEW_S)",
            )
        return parsed

    def _parse(self, raw: Any) -> datetime:
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
