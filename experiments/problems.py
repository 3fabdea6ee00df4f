"""RFC 9457 problem details: Rampart's error codes, their titles and the body every error has.

Pure (standard library only), so the management API, the edge and the SDK share one table.
The format is documented in docs/errors.md: `type` is `urn:rampart:problem:<code>`, `code` is
stable snake_case, `field` is the first offending field and `errors` lists all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:rampart:problem:"

# code -> (HTTP status, title). The title is fixed per code (RFC 9457 section 3.1.3); the
# occurrence-specific explanation goes into `detail`.
PROBLEMS: dict[str, tuple[int, str]] = {
    "validation_error": (400, "The request has invalid fields"),
    "unknown_field": (400, "The request has fields this endpoint does not know"),
    "malformed_json": (400, "The request body is not valid JSON"),
    "invalid_encoding": (400, "The request is not valid UTF-8"),
    "bad_request": (400, "Bad request"),
    "not_authenticated": (401, "Authentication is required"),
    "permission_denied": (403, "Permission denied"),
    "not_found": (404, "Not found"),
    "experiment_not_found": (404, "No such experiment"),
    "method_not_allowed": (405, "Method not allowed"),
    "not_acceptable": (406, "No acceptable representation"),
    "conflict": (409, "Conflict"),
    "invalid_transition": (409, "The lifecycle action is not allowed in this state"),
    "not_editable": (409, "The fields cannot change in this state"),
    "in_use": (409, "The object is in use"),
    "confirmation_required": (409, "The action needs an explicit confirmation"),
    "assignment_conflict": (409, "The exposure disagrees with the edge's assignment"),
    "request_timeout": (408, "The request did not arrive in time"),
    "payload_too_large": (413, "The request body is too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "throttled": (429, "Too many requests"),
    "server_error": (500, "Internal server error"),
    "upstream_unavailable": (502, "The model version is unavailable"),
    "not_ready": (503, "The edge is not ready"),
    "experiment_not_on_edge": (503, "The experiment is not on this edge yet"),
    "store_unavailable": (503, "The event store is unavailable"),
    "too_many_connections": (503, "The edge holds too many connections"),
    "upstream_timeout": (504, "The model version did not answer in time"),
}


@dataclass(frozen=True)
class FieldError:
    """One offending field (`field` is None for an error of the request as a whole)."""

    field: str | None
    code: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "code": self.code, "message": self.message}


def problem_title(code: str) -> str:
    return PROBLEMS.get(code, (0, code.replace("_", " ").capitalize()))[1]


def problem_body(
    *,
    code: str,
    detail: str,
    status: int | None = None,
    errors: Sequence[FieldError] = (),
    **extensions: Any,
) -> dict[str, Any]:
    """The problem document of one error; `extensions` become extra top-level members."""
    if status is None:
        status = PROBLEMS[code][0]
    items = list(errors) or [FieldError(field=None, code=code, message=detail)]
    return {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": problem_title(code),
        "status": status,
        "detail": detail,
        "code": code,
        "field": items[0].field,
        "errors": [item.as_dict() for item in items],
        **extensions,
    }


def validation_detail(errors: Sequence[FieldError]) -> str:
    """One sentence naming every offending field, for `detail`."""
    parts = [f"{e.field}: {e.message}" if e.field else e.message for e in errors]
    return "; ".join(parts) if parts else "The request is invalid."
