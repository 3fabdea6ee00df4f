"""Exceptions of the Rampart SDK: one class per kind of failure, carrying the server's error.

The edge answers errors as ``{"error": {"code", "message", "field"}}`` (the events API adds
``index``, the position of the bad event in its batch). ``ApiError`` keeps every part of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routing.sdk.records import Event


class RampartError(Exception):
    """Base class of every error the SDK raises."""


class RampartConnectionError(RampartError):
    """The server could not be reached or did not answer in time (after the retries)."""


class InvalidEventError(RampartError, ValueError):
    """An event that the events API would refuse, caught before it is buffered."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
    ) -> None:
        detail = "" if field is None else f" [field {field!r}]"
        detail += "" if index is None else f" [event {index}]"
        super().__init__(f"{status} {code}: {message}{detail}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.index = index
        self.payload: Mapping[str, Any] = payload or {}
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


class PayloadTooLargeError(ApiError):
    """413: too many events in one batch, or too large a body."""


class ServerError(ApiError):
    """5xx: the server failed or is not ready; the SDK retried before raising this."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
}


def api_error(status: int, payload: Any, text: str = "") -> ApiError:
    """The exception for an error answer; ``payload`` is the decoded body (None if not JSON)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "error")
        message = str(error.get("message") or "")
        field = error.get("field")
        index = error.get("index")
    else:
        code, message, field, index = "http_error", text[:200] or f"HTTP {status}", None, None
    kind = ServerError if status >= 500 else _BY_STATUS.get(status, ApiError)
    return kind(
        status,
        code,
        message,
        field=field if isinstance(field, str) else None,
        index=index if isinstance(index, int) else None,
        payload=payload if isinstance(payload, dict) else None,
    )
