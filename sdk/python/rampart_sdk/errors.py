"""Exceptions of the Rampart SDK: one class per kind of failure, carrying the server's error.

The edge answers errors as RFC 9457 problem details (``application/problem+json``)::

    {"type": "urn:rampart:problem:<code>", "title": ..., "status": 400, "detail": ...,
     "code": "<code>", "field": "<first offending field or null>", "errors": [...]}

with ``index`` added by batch endpoints (the position of the bad item). ``ApiError`` keeps
every part of it: ``code``, ``message`` (the detail), ``field``, ``index``, ``errors`` and
the whole document in ``payload``. The older ``{"error": {"code", "message", "field"}}``
body of edges before the problem format is read as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rampart_sdk._base_errors import InvalidEventError as InvalidEventError
from rampart_sdk._base_errors import RampartError as RampartError

if TYPE_CHECKING:
    from rampart_sdk.records import Event


class RampartConnectionError(RampartError):
    """The server could not be reached or did not answer in time (after the retries)."""


class ApiError(RampartError):
    """The server answered with an error status; the attributes hold its JSON error."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        index: int | None = None,
        payload: Mapping[str, Any] | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        detail = "" if field is None else f" [field {field!r}]"
        detail += "" if index is None else f" [item {index}]"
        super().__init__(f"{status} {code}: {message}{detail}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.index = index
        self.payload: Mapping[str, Any] = payload or {}
        # Every offending field (``field``, ``code``, ``message``, ``index`` in batches).
        self.errors: Sequence[Mapping[str, Any]] = errors
        # Seconds the server asked the client to wait (``Retry-After``), when it said.
        self.retry_after_s = retry_after_s
        # Set by track/flush when the error made the client drop a batch of events.
        self.events: Sequence[Event] = ()


class BadRequestError(ApiError):
    """400: a field is missing or wrong (``field``; ``index`` for an event of a batch)."""


class AuthenticationError(ApiError):
    """401: no API key, or an unknown or revoked one."""


class PermissionDeniedError(ApiError):
    """403: the API key lacks the scope this endpoint needs."""


class NotFoundError(ApiError):
    """404: unknown experiment (``field`` is ``experiment``) or endpoint."""


class ExperimentNotFoundError(NotFoundError):
    """404 ``experiment_not_found``: no experiment has this key (the edge checked)."""


class PayloadTooLargeError(ApiError):
    """413: too many events in one batch, or too large a body."""


class ServerError(ApiError):
    """5xx: the server failed or is not ready; the SDK retried before raising this."""


class ExperimentNotOnEdgeError(ServerError):
    """503 ``experiment_not_on_edge``: the experiment may exist but this edge cannot serve it.

    Its routing snapshot lacks the key and it could not confirm the config version (its
    database is unreachable). ``retry_after_s`` says when to ask again; unlike
    ``ExperimentNotFoundError``, this is not the caller's mistake.
    """


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
}


_BY_CODE: dict[str, type[ApiError]] = {
    "experiment_not_found": ExperimentNotFoundError,
    "experiment_not_on_edge": ExperimentNotOnEdgeError,
}


def api_error(
    status: int, payload: Any, text: str = "", *, retry_after_s: float | None = None
) -> ApiError:
    """The exception for an error answer; ``payload`` is the decoded body (None if not JSON).

    ``retry_after_s`` is the answer's ``Retry-After`` header in seconds, if any.
    """
    document = payload if isinstance(payload, dict) else {}
    legacy = document.get("error")
    errors: Sequence[Mapping[str, Any]] = ()
    if isinstance(document.get("code"), str) and "status" in document:
        code = str(document["code"])
        message = str(document.get("detail") or document.get("title") or "")
        field = document.get("field")
        index = document.get("index")
        listed = document.get("errors")
        if isinstance(listed, list):
            errors = [entry for entry in listed if isinstance(entry, dict)]
        if retry_after_s is None and isinstance(document.get("retry_after_s"), int | float):
            retry_after_s = float(document["retry_after_s"])
    elif isinstance(legacy, dict):
        code = str(legacy.get("code") or "error")
        message = str(legacy.get("message") or "")
        field = legacy.get("field")
        index = legacy.get("index")
    else:
        code, message, field, index = "http_error", text[:200] or f"HTTP {status}", None, None
    kind = _BY_CODE.get(code) or (
        ServerError if status >= 500 else _BY_STATUS.get(status, ApiError)
    )
    return kind(
        status,
        code,
        message,
        field=field if isinstance(field, str) else None,
        index=index if isinstance(index, int) else None,
        payload=document or None,
        errors=errors,
        retry_after_s=retry_after_s,
    )
