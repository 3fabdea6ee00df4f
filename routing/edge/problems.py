"""RFC 9457 problem details for every error the edge itself answers (``application/problem+json``).

One body shape for the edge, the proxy's own errors and the management API (README,
"Errors")::

    {"type": "urn:rampart:problem:<code>", "title": "<fixed per code>", "status": 400,
     "detail": "<this occurrence, naming the field>", "code": "<code>",
     "field": "<first offending field or null>",
     "errors": [{"field": ..., "code": ..., "message": ...}, ...]}

Batch endpoints add ``index`` (top level and in each ``errors`` entry). Only error answers
are built here, so nothing in this module runs on the success path. Pure: no framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from experiments.problems import PROBLEM_TYPE_PREFIX, PROBLEMS

TYPE_PREFIX: Final = PROBLEM_TYPE_PREFIX
CONTENT_TYPE: Final = b"application/problem+json"

# Every code the edge answers. Titles (and statuses) come from the one table all of Rampart
# shares (experiments.problems); docs/errors.md lists them; routing/edge/openapi.py describes them;
# a test checks the three agree.
EDGE_CODES: Final = (
    "validation_error",
    "unknown_field",
    "malformed_json",
    "invalid_encoding",
    "not_authenticated",
    "permission_denied",
    "not_found",
    "experiment_not_found",
    "method_not_allowed",
    "assignment_conflict",
    "request_timeout",
    "payload_too_large",
    "server_error",
    "not_ready",
    "experiment_not_on_edge",
    "store_unavailable",
    "too_many_connections",
    "upstream_unavailable",
    "upstream_timeout",
)
TITLES: Final[Mapping[str, str]] = {code: PROBLEMS[code][1] for code in EDGE_CODES}


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    index: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The problem document; ``errors`` defaults to one entry for ``field`` and ``detail``.

    When ``errors`` is given, ``field`` (and ``index``) default to its first entry's.
    """
    if errors:
        first = errors[0]
        if field is None:
            field = first.get("field")
        if index is None and "index" in first:
            index = first["index"]
        entries = [dict(entry) for entry in errors]
    else:
        entry: dict[str, Any] = {"field": field, "code": code, "message": detail}
        if index is not None:
            entry["index"] = index
        entries = [entry]
    document: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": TITLES.get(code, code.replace("_", " ").capitalize()),
        "status": status,
        "detail": detail,
        "code": code,
        "field": field,
        "errors": entries,
    }
    if index is not None:
        document["index"] = index
    if extra:
        document.update(extra)
    return document


def problem_body(status: int, code: str, detail: str, **kwargs: Any) -> bytes:
    """``problem(...)`` serialised."""
    return orjson.dumps(problem(status, code, detail, **kwargs))


class EdgeError(Exception):
    """A request the edge refuses; rendered as a problem document (``asgi.send_error``).

    ``errors`` lists every offending field when there are several (each a mapping with
    ``field``, ``code``, ``message`` and, in batches, ``index``); ``headers`` are added to
    the answer (``Retry-After``, ``Allow``); ``extra`` members to the document.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        *,
        errors: Sequence[Mapping[str, Any]] | None = None,
        index: int | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.errors = errors
        self.index = index
        self.headers = headers
        self.extra = extra

    def body(self) -> bytes:
        return problem_body(
            self.status,
            self.code,
            self.message,
            field=self.field,
            errors=self.errors,
            index=self.index,
            extra=self.extra,
        )


class FieldError(Exception):
    """One field breaks a rule; ``field`` is None when the item itself does.

    ``code`` is the problem code the refusal carries: ``validation_error``,
    ``unknown_field`` or ``invalid_encoding``.
    """

    def __init__(self, field: str | None, message: str, code: str = "validation_error") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code

    def entry(self, index: int | None = None) -> dict[str, Any]:
        """This error as an ``errors`` entry of a problem document."""
        entry: dict[str, Any] = {"field": self.field, "code": self.code, "message": self.message}
        if index is not None:
            entry["index"] = index
        return entry
