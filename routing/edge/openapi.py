"""The edge's endpoints in OpenAPI 3, as data, added to the management API's schema.

The edge is plain ASGI (``routing.edge.app``), so drf-spectacular cannot see it. This module
describes it by hand and ``add_edge_operations``, a drf-spectacular post-processing hook
(``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``), merges the description into
``/api/schema/``: ``/v1/decide``, ``/v1/decide/batch``, ``/v1/config``, ``/v1/events``,
``/v1/labels``, ``/v1/exposures``, ``/api/features/{client_key}`` and
``/proxy/{experiment}/{path}``, with their request bodies, every status they answer, the
problem documents of their errors (``routing.edge.problems``) and the edge's ways of
presenting a key. Nothing here routes a request.

The schemas (``routing.edge.openapi_schemas``) are exactly as strict as the edge: a body the
schema allows is one the edge accepts (unless the experiment it names is unknown or the key
lacks a scope), and one it forbids is refused. ``tests/routing/test_edge_schema.py`` checks
this with schemathesis against a live edge. Timestamps are the one moving limit: the schema
is built with the latest time allowed when it is generated (now plus
``EDGE_MAX_CLOCK_SKEW_S``), which only grows afterwards, and ISO 8601 strings are described
up to the end of last year.
"""

from __future__ import annotations

import time
from typing import Any, Final

from routing.edge.openapi_schemas import EXPERIMENT_KEY, UNIT_TEXT, component_schemas, schema_ref

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


_PROBLEM_CONTENT: Final = {"application/problem+json": {"schema": schema_ref("EdgeProblem")}}
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
    return {
        "description": description,
        "content": {"application/json": {"schema": schema_ref(schema)}},
    }


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema_ref(schema)}}}


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


def _features_operation() -> dict[str, Any]:
    """``GET /api/features/{client_key}`` as ``routing.edge.features_api`` answers it."""
    cors = {"Access-Control-Allow-Origin": {"schema": {"type": "string", "enum": ["*"]}}}
    etag = {"required": True, "schema": {"type": "string"}}
    answers = {
        "200": {
            **_json("GrowthBookPayload", "The payload of the current routing snapshot."),
            "headers": {
                "ETag": {
                    **etag,
                    "description": "Depends only on the payload's content, so replicas "
                    "answer 304 for each other's ETags.",
                },
                "Cache-Control": {"required": True, "schema": {"type": "string"}},
                **cors,
            },
        },
        "304": {
            "description": "Unchanged since the ETag in If-None-Match; no body.",
            "headers": {"ETag": etag, **cors},
        },
        **_problems(401, 403, 404, 503),
    }
    answers["401"]["description"] = "not_authenticated: an unknown or revoked client key"
    answers["403"]["description"] = "permission_denied: the key lacks the `sdk` scope"
    answers["404"]["description"] = (
        "not_found: the client key holds a '/' (a deeper path), so it names no key"
    )
    answers["503"]["description"] = "not_ready: no routing snapshot yet"
    return _operation(
        "edge_features",
        "The GrowthBook SDK payload: every experiment as a feature (client key scope `sdk`)",
        description="What GrowthBook's SDKs fetch from `{apiHost}/api/features/{clientKey}`: "
        "point an SDK at Rampart with a key holding the `sdk` scope as its client key. "
        "Answered from the edge's snapshot, never from the database. HEAD answers the same "
        "headers without a body, OPTIONS a CORS preflight; every answer carries "
        "`Access-Control-Allow-Origin: *`. The key is not checked when EDGE_REQUIRE_KEY is "
        "false.",
        security=[],
        parameters=[
            {
                "name": "client_key",
                "in": "path",
                "required": True,
                "description": "An API key with the `sdk` scope (safe to embed in a front end).",
                "schema": {"type": "string", "minLength": 1},
            },
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
            },
        ],
        responses=answers,
    )


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
        "/api/features/{client_key}": {"get": _features_operation()},
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
        "schemas": component_schemas(time.time() if now is None else now, skew_s),
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
                "events, exposures, config, the GrowthBook SDK payload and the routing proxy.",
            }
        )
    return result
