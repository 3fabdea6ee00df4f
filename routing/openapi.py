"""The edge's endpoints in OpenAPI 3, as data, added to the management API's schema.

The edge is plain ASGI (``routing.edge``), so drf-spectacular cannot see it. This module
describes it by hand and ``add_edge_operations``, a drf-spectacular post-processing hook
(``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``), merges the description into
``/api/schema/``: ``/v1/decide``, ``/v1/decide/batch``, ``/v1/config``, ``/v1/events``,
``/v1/labels``, ``/v1/exposures`` and ``/proxy/{experiment}/{path}``, with their request
bodies, every status they answer, the problem documents of their errors
(``routing.problems``) and the edge's two ways of presenting a key. Nothing here routes a
request.

The schemas are exactly as strict as the edge: a body the schema allows is one the edge
accepts (unless the experiment it names is unknown or the key lacks a scope), and one it
forbids is refused. ``tests/routing/test_edge_schema.py`` checks this with schemathesis
against a live edge. Timestamps are the one moving limit: the schema is built with the
latest time allowed when it is generated (now plus ``EDGE_MAX_CLOCK_SKEW_S``), which only
grows afterwards, and ISO 8601 strings are described up to the end of last year.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Final

from routing.edge_input import MAX_UNIT_LENGTH
from routing.problems import TITLES

# Kept in step with routing.edge, routing.ingest, routing.labels and routing.exposures_api (a
# test compares).
MAX_BATCH_UNITS: Final = 1000
MAX_EVENTS_PER_BATCH: Final = 10_000
MAX_EXPOSURES_PER_BATCH: Final = 10_000
MAX_KEY_LENGTH: Final = 64
MAX_EVENT_ID_LENGTH: Final = 128
MAX_NAME_LENGTH: Final = 128
MAX_LABELS_PER_BATCH: Final = 10_000
MAX_LABEL_REQUEST_ID_LENGTH: Final = 128
MAX_LABEL_LENGTH: Final = 200
MAX_EPOCH_SECONDS: Final = 253_402_300_800
# orjson reads integers in the 64-bit range as integers and larger ones as floats, which are
# not unit ids.
MIN_INTEGER_UNIT: Final = -(2**63)
MAX_INTEGER_UNIT: Final = 2**64 - 1
LARGEST_DOUBLE: Final = 1.7976931348623157e308

SECURITY: Final = [{"RampartEdgeBearer": []}, {"RampartEdgeKey": []}]
SECURITY_SCHEMES: Final = {
    "RampartEdgeBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "rk_<prefix>_<secret>",
        "description": "An API key with the scope the edge operation names (`decide` or "
        "`ingest`). Not checked when EDGE_REQUIRE_KEY is false.",
    },
    "RampartEdgeKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Rampart-Key",
        "description": "The same key in its own header; the proxy then forwards the "
        "caller's Authorization header to the model unchanged.",
    },
}

_NO_NUL: Final = "^[^\\u0000]*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(max_length: int, description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": max_length,
        "pattern": _NO_NUL,
        "description": description,
    }


UNIT_TEXT: Final = _text(MAX_UNIT_LENGTH, "1-200 characters, no NUL")
UNIT_ID: Final = {
    "description": "A unit id: 1-200 characters without NUL, or an integer (taken as its "
    "decimal string). Must be valid UTF-8: invalid bytes are refused, never replaced.",
    "oneOf": [
        UNIT_TEXT,
        {"type": "integer", "minimum": MIN_INTEGER_UNIT, "maximum": MAX_INTEGER_UNIT},
    ],
}
EXPERIMENT_KEY: Final = {"type": "string", "minLength": 1, "description": "An experiment key."}


def _years_before(year: int) -> str:
    """A regular expression for the years 1000 to ``year - 1``, four digits each."""
    alternatives = ["1[0-9]{3}"]
    for decade in range(2000, year - year % 10, 10):
        alternatives.append(f"{decade // 10}[0-9]")
    if year % 10:
        alternatives.append(f"{year // 10}[0-{year % 10 - 1}]")
    return "(" + "|".join(alternatives) + ")"


def timestamp_schema(now: float, skew_s: float) -> dict[str, Any]:
    """When an event or exposure happened: epoch seconds, or an ISO 8601 string with offset."""
    year = datetime.fromtimestamp(now, UTC).year
    iso = (
        f"^{_years_before(year)}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
        "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?"
        "(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
    )
    # A limit that moves with the clock: exact when generated, and only growing afterwards.
    # A skew reaching past the calendar leaves the calendar's own (fixed) limit.
    epoch: dict[str, Any] = {"type": "number", "minimum": 0}
    if now + skew_s >= MAX_EPOCH_SECONDS:
        epoch.update(maximum=MAX_EPOCH_SECONDS, exclusiveMaximum=True)
    else:
        epoch["maximum"] = float(int(now + skew_s))
    return {
        "description": "Optional; default: the time of receipt. At most EDGE_MAX_CLOCK_SKEW_S "
        "(default 300 s) after the time of receipt, so the epoch maximum below is the limit when "
        "this schema was generated (it grows with time). ISO 8601 strings need an offset; "
        "this schema describes them up to the end of last year (later past times are accepted "
        "too).",
        "oneOf": [
            epoch,
            {"type": "string", "pattern": iso},
        ],
        "nullable": True,
    }


def _schemas(now: float, skew_s: float) -> dict[str, Any]:
    timestamp = timestamp_schema(now, skew_s)
    error_entry = {
        "type": "object",
        "required": ["field", "code", "message"],
        "properties": {
            "field": {"type": "string", "nullable": True},
            "code": {"type": "string"},
            "message": {"type": "string"},
            "index": {"type": "integer", "minimum": 0},
        },
    }
    return {
        "EdgeProblem": {
            "type": "object",
            "description": "RFC 9457 problem details; `code` is one of docs/errors.md. Batch "
            "errors add `index`; 503 `experiment_not_on_edge` adds `retry_after_s`.",
            "required": ["type", "title", "status", "detail", "code", "field", "errors"],
            "properties": {
                "type": {"type": "string", "pattern": "^urn:rampart:problem:[a-z_]+$"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "code": {"type": "string", "enum": sorted(TITLES)},
                "field": {"type": "string", "nullable": True},
                "index": {"type": "integer", "minimum": 0},
                "errors": {"type": "array", "minItems": 1, "items": error_entry},
                "retry_after_s": {"type": "number"},
                "batch_size": {"type": "integer"},
            },
        },
        "EdgeDecision": {
            "type": "object",
            "required": ["experiment", "unit", "variant", "in_experiment", "reason", "upstream"],
            "additionalProperties": False,
            "properties": {
                "experiment": {"type": "string"},
                "unit": {"type": "string", "nullable": True},
                "variant": {"type": "string"},
                "in_experiment": {"type": "boolean"},
                "reason": {
                    "type": "string",
                    "enum": [
                        "assigned",
                        "override",
                        "not_in_coverage",
                        "not_in_namespace",
                        "not_running",
                        "rolled_back_to_control",
                        "completed",
                        "no_unit",
                        "invalid_config",
                    ],
                },
                "upstream": {"type": "string"},
            },
        },
        "EdgeDecideRequest": {
            "type": "object",
            "required": ["experiment", "unit"],
            "additionalProperties": False,
            "properties": {"experiment": EXPERIMENT_KEY, "unit": UNIT_ID},
        },
        "EdgeDecideBatchRequest": {
            "description": "Many units of one experiment, or one unit in every running "
            "experiment (or in the listed ones, whatever their status). Every unit and key is "
            "checked before any decision is recorded.",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["experiment", "units"],
                    "additionalProperties": False,
                    "properties": {
                        "experiment": EXPERIMENT_KEY,
                        "units": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_UNITS,
                            "items": UNIT_ID,
                        },
                    },
                },
                {
                    "type": "object",
                    "required": ["unit"],
                    "additionalProperties": False,
                    "properties": {
                        "unit": UNIT_ID,
                        "experiments": {"type": "array", "items": EXPERIMENT_KEY},
                    },
                },
            ],
        },
        "EdgeDecisions": {
            "type": "object",
            "required": ["decisions"],
            "properties": {"decisions": {"type": "array", "items": _ref("EdgeDecision")}},
        },
        "EdgeConfig": {
            "type": "object",
            "description": "The snapshot for SDK local evaluation (format 1; routing.edge).",
            "required": ["format", "version", "experiments"],
            "properties": {
                "format": {"type": "integer", "enum": [1]},
                "version": {"type": "integer"},
                "experiments": {"type": "array", "items": {"type": "object"}},
            },
        },
        "EdgeEvent": {
            "type": "object",
            "required": ["event_id", "unit_id", "name"],
            "additionalProperties": False,
            "properties": {
                "event_id": _text(MAX_EVENT_ID_LENGTH, "The idempotency key (1-128)."),
                "unit_id": UNIT_ID,
                "name": _text(MAX_NAME_LENGTH, "The event's name (1-128)."),
                "value": {
                    "type": "number",
                    "nullable": True,
                    "minimum": -LARGEST_DOUBLE,
                    "maximum": LARGEST_DOUBLE,
                    "description": "A finite number; default 1.",
                },
                "timestamp": timestamp,
            },
        },
        "EdgeEventsRequest": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["events"],
                    "additionalProperties": False,
                    "properties": {
                        "events": {
                            "type": "array",
                            "maxItems": MAX_EVENTS_PER_BATCH,
                            "items": _ref("EdgeEvent"),
                        }
                    },
                },
                {"type": "array", "maxItems": MAX_EVENTS_PER_BATCH, "items": _ref("EdgeEvent")},
            ]
        },
        "EdgeEventsAccepted": {
            "type": "object",
            "required": ["accepted", "duplicates"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "duplicates": {"type": "integer", "minimum": 0},
            },
        },
        "EdgeLabel": {
            "type": "object",
            "required": ["request_id", "label"],
            "additionalProperties": False,
            "properties": {
                "request_id": _text(
                    MAX_LABEL_REQUEST_ID_LENGTH, "The X-Rampart-Request-Id of the answer (1-128)."
                ),
                "label": {
                    "description": "The truth: a class (text of 1-200 characters, an integer"
                    " or a boolean) or a finite number.",
                    "oneOf": [
                        _text(MAX_LABEL_LENGTH, "A class name."),
                        {
                            "type": "number",
                            "minimum": -LARGEST_DOUBLE,
                            "maximum": LARGEST_DOUBLE,
                        },
                        {"type": "boolean"},
                    ],
                },
                "timestamp": timestamp,
            },
        },
        "EdgeLabelsRequest": {
            "type": "object",
            "required": ["labels"],
            "additionalProperties": False,
            "properties": {
                "labels": {
                    "type": "array",
                    "maxItems": MAX_LABELS_PER_BATCH,
                    "items": _ref("EdgeLabel"),
                }
            },
        },
        "EdgeLabelsAccepted": {
            "type": "object",
            "required": ["accepted", "duplicates", "unmatched"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "duplicates": {"type": "integer", "minimum": 0},
                "unmatched": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Stored labels whose request id has no recorded prediction"
                    " (yet): unknown, unsampled, or still buffered by the proxy.",
                },
            },
        },
        "EdgeExposure": {
            "type": "object",
            "required": ["experiment", "unit_id", "variant"],
            "additionalProperties": False,
            "properties": {
                "experiment": _text(MAX_KEY_LENGTH, "A running experiment's key."),
                "unit_id": UNIT_ID,
                "variant": _text(MAX_KEY_LENGTH, "The variant the unit was served."),
                "timestamp": timestamp,
            },
        },
        "EdgeExposuresRequest": {
            "type": "object",
            "required": ["exposures"],
            "additionalProperties": False,
            "properties": {
                "exposures": {
                    "type": "array",
                    "maxItems": MAX_EXPOSURES_PER_BATCH,
                    "items": _ref("EdgeExposure"),
                }
            },
        },
        "EdgeExposuresAccepted": {
            "type": "object",
            "required": ["accepted", "ignored"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "ignored": {"type": "integer", "minimum": 0},
            },
        },
    }


_PROBLEM_CONTENT: Final = {"application/problem+json": {"schema": _ref("EdgeProblem")}}
_RETRY_AFTER: Final = {
    "Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "Seconds."}
}
_MEANINGS: Final = {
    400: "validation_error, unknown_field, malformed_json or invalid_encoding, naming the field",
    401: "not_authenticated: no key, or an unknown or revoked one",
    403: "permission_denied: the key lacks the scope",
    404: "experiment_not_found (or not_found for a path)",
    409: "assignment_conflict: the batch is well formed but does not match this edge's "
    "assignments (an unknown or stopped experiment, a unit outside it or in another arm)",
    408: "request_timeout: the body did not arrive within EDGE_BODY_TIMEOUT_S after the "
    "headers (the connection is then closed)",
    413: "payload_too_large",
    502: "upstream_unavailable: control could not be reached (or its breaker is open)",
    503: "not_ready (no routing snapshot yet), experiment_not_on_edge (the key is not in this "
    "edge's snapshot and the config version cannot be confirmed), store_unavailable, or "
    "too_many_connections (EDGE_MAX_CONNECTIONS reached)",
    504: "upstream_timeout: no answer within PROXY_READ_TIMEOUT_S, or the whole request "
    "(the retry on control included) not within PROXY_DEADLINE_S",
}


def _problems(*statuses: int) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for status in statuses:
        answer: dict[str, Any] = {"description": _MEANINGS[status], "content": _PROBLEM_CONTENT}
        if status == 503:
            answer["headers"] = _RETRY_AFTER
        answers[str(status)] = answer
    return answers


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _operation(operation_id: str, summary: str, **parts: Any) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["edge"],
        "security": SECURITY,
        **parts,
    }


def _proxy_operation(method: str) -> dict[str, Any]:
    answers = {
        "default": {
            "description": "The model's own answer, passed through unchanged, with "
            "X-Rampart-Experiment and X-Rampart-Variant (and X-Rampart-Served-By after a "
            "fallback to control, X-Rampart-Cache on a cache hit).",
            "content": {"*/*": {"schema": {}}},
        },
        **_problems(400, 401, 403, 404, 408, 413, 502, 503, 504),
    }
    answers["400"]["description"] = (
        "invalid_encoding: the unit id (from the experiment's header, cookie, query parameter "
        "or JSON body field) is not UTF-8; nothing is forwarded"
    )
    operation = _operation(
        f"proxy_{method}",
        "Forward an inference request to the unit's model version",
        description="The unit id comes from the experiment's unit source (header "
        "X-Rampart-Unit by default). `path` may span several segments. Requests without a "
        "usable unit id go to control.",
        parameters=[
            {
                "name": "experiment",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[^/]+$"},
            },
            {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
        ],
        responses=answers,
    )
    if method in {"post", "put", "patch"}:
        operation["requestBody"] = {
            "required": False,
            "description": "Forwarded as it is (at most PROXY_MAX_BODY_BYTES).",
            "content": {"*/*": {"schema": {}}},
        }
    return operation


def edge_paths() -> dict[str, Any]:
    """The edge's operations as an OpenAPI ``paths`` object."""
    decide_query = [
        {"name": "experiment", "in": "query", "required": True, "schema": EXPERIMENT_KEY},
        {"name": "unit", "in": "query", "required": True, "schema": UNIT_TEXT},
    ]
    decided = _json("EdgeDecision", "The unit's variant (scope `decide`).")
    return {
        "/v1/decide": {
            "get": _operation(
                "edge_decide",
                "Decide one unit's variant",
                parameters=decide_query,
                responses={"200": decided, **_problems(400, 401, 403, 404, 503)},
            ),
            "post": _operation(
                "edge_decide_post",
                "Decide one unit's variant (JSON body)",
                requestBody=_body("EdgeDecideRequest"),
                responses={"200": decided, **_problems(400, 401, 403, 404, 408, 413, 503)},
            ),
        },
        "/v1/decide/batch": {
            "post": _operation(
                "edge_decide_batch",
                "Decide many units, or one unit in many experiments",
                requestBody=_body("EdgeDecideBatchRequest"),
                responses={
                    "200": _json("EdgeDecisions", "The decisions, in request order."),
                    **_problems(400, 401, 403, 404, 408, 413, 503),
                },
            )
        },
        "/v1/config": {
            "get": _operation(
                "edge_config",
                "The routing snapshot for SDK local evaluation",
                parameters=[
                    {
                        "name": "If-None-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
                responses={
                    "200": {
                        **_json("EdgeConfig", "The snapshot, with its ETag."),
                        "headers": {"ETag": {"schema": {"type": "string"}}},
                    },
                    "304": {"description": "Unchanged since the ETag given."},
                    **_problems(401, 403, 503),
                },
            )
        },
        "/v1/events": {
            "post": _operation(
                "edge_events",
                "Store business events, each event_id once (scope `ingest`)",
                requestBody=_body("EdgeEventsRequest"),
                responses={
                    "200": _json("EdgeEventsAccepted", "Stored (the batch committed)."),
                    **_problems(400, 401, 403, 408, 413, 503),
                },
            )
        },
        "/v1/labels": {
            "post": _operation(
                "edge_labels",
                "Store the true outcome of proxied requests, each request id once (scope `ingest`)",
                requestBody=_body("EdgeLabelsRequest"),
                responses={
                    "200": _json("EdgeLabelsAccepted", "Stored (the batch committed)."),
                    **_problems(400, 401, 403, 408, 413, 503),
                },
            )
        },
        "/v1/exposures": {
            "post": _operation(
                "edge_exposures",
                "Record exposures of units decided by an SDK (scope `decide`)",
                requestBody=_body("EdgeExposuresRequest"),
                responses={
                    "202": _json("EdgeExposuresAccepted", "Handed to the exposure recorder."),
                    **_problems(400, 401, 403, 408, 409, 413, 503),
                },
            )
        },
        "/proxy/{experiment}/{path}": {
            method: _proxy_operation(method) for method in ("get", "post", "put", "patch", "delete")
        },
    }


def edge_components(*, now: float | None = None, skew_s: float | None = None) -> dict[str, Any]:
    """The ``components`` the edge's operations refer to."""
    if skew_s is None:
        from django.conf import settings

        skew_s = float(settings.EDGE_MAX_CLOCK_SKEW_S)
    return {
        "schemas": _schemas(time.time() if now is None else now, skew_s),
        "securitySchemes": SECURITY_SCHEMES,
    }


def add_edge_operations(result: dict[str, Any], generator: Any, request: Any, public: bool) -> Any:
    """drf-spectacular post-processing hook: the edge's paths and components, merged in."""
    result.setdefault("paths", {}).update(edge_paths())
    components = result.setdefault("components", {})
    for section, entries in edge_components().items():
        components.setdefault(section, {}).update(entries)
    tags = result.setdefault("tags", [])
    if not any(tag.get("name") == "edge" for tag in tags):
        tags.append(
            {
                "name": "edge",
                "description": "The edge (plain ASGI, no Django per request): decisions, "
                "events, exposures, config and the routing proxy.",
            }
        )
    return result
