"""OpenAPI description of the management API: API-key auth, problem responses, strict bodies."""

from typing import Any

import uritemplate
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from rest_framework import serializers

from experiments.problems import PROBLEM_CONTENT_TYPE


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "experiments.api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "rk_<prefix>_<secret>",
            "description": "An API key from `manage.py createapikey` or the settings page; "
            "reads need the `read` scope, writes `manage`.",
        }


class ProblemFieldErrorSerializer(serializers.Serializer):  # type: ignore[type-arg]
    field = serializers.CharField(
        allow_null=True, help_text="Dotted/indexed path, e.g. `ramp_steps[1].canary_share`."
    )
    code = serializers.CharField()
    message = serializers.CharField()


class ProblemSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """RFC 9457 problem details with Rampart's members (docs/errors.md)."""

    type = serializers.CharField(help_text="`urn:rampart:problem:` followed by `code`.")
    title = serializers.CharField(help_text="Fixed per code.")
    status = serializers.IntegerField()
    detail = serializers.CharField(help_text="This occurrence, naming the field(s).")
    code = serializers.CharField(help_text="Stable snake_case code (docs/errors.md).")
    field = serializers.CharField(allow_null=True, help_text="`errors[0].field`.")
    errors = ProblemFieldErrorSerializer(many=True)


# Which errors an operation can answer, besides its own success responses.
_ERROR_DESCRIPTIONS = {
    "400": "Invalid input (validation_error, unknown_field, malformed_json).",
    "401": "No valid API key or session (not_authenticated).",
    "403": "The key lacks the scope, or the session the permission (permission_denied).",
    "404": "No such object or page (not_found, experiment_not_found).",
    "409": "Not allowed in the experiment's current state (invalid_transition, not_editable).",
    "413": "The body is larger than the server accepts (payload_too_large).",
    "415": "The body is not JSON (unsupported_media_type).",
}
_WRITE_METHODS = ("POST", "PUT", "PATCH")


class ProblemAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus the problem responses every operation can give.

    A view lists the actions that can conflict with an experiment's state in
    `conflict_actions`; everything else is derived from the operation itself.
    """

    def _error_codes(self) -> list[str]:
        codes = ["401", "403"]
        has_query = any(p.get("in") == "query" for p in self._get_parameters())
        if self.method in _WRITE_METHODS or has_query:
            codes.append("400")
        paginated = self._is_list_view() and self._get_paginator() is not None
        if uritemplate.variables(self.path) or paginated:  # no such object, or page
            codes.append("404")
        if getattr(self.view, "action", None) in getattr(self.view, "conflict_actions", ()):
            codes.append("409")
        if self.method in _WRITE_METHODS and self.get_request_serializer() is not None:
            codes += ["413", "415"]
        return sorted(codes)

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        component = self.resolve_serializer(ProblemSerializer, "response")
        for code in self._error_codes():
            responses.setdefault(
                code,
                {
                    "description": _ERROR_DESCRIPTIONS[code],
                    "content": {PROBLEM_CONTENT_TYPE: {"schema": component.ref}},
                },
            )
        return responses


def refuse_unknown_request_fields(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """POSTPROCESSING hook: request bodies declare `additionalProperties: false`, and their
    free-text strings a pattern without NUL.

    Every request serializer refuses unknown fields (experiments.strict) and NUL characters,
    and the schema says so, so generated clients and fuzzers know that either is an error.
    """
    for name, schema in result.get("components", {}).get("schemas", {}).items():
        if name.endswith("Request") and schema.get("type") == "object" and "properties" in schema:
            schema["additionalProperties"] = False
            for field in schema["properties"].values():
                _refuse_nul(field)
                if isinstance(field.get("additionalProperties"), dict):
                    _refuse_nul(field["additionalProperties"])  # the values of a map
    return result


# DRF's CharField refuses NUL (PostgreSQL cannot store it); the schema says so.
NO_NUL_PATTERN = r"^[^\x00]*$"


def _refuse_nul(field: dict[str, Any]) -> None:
    if field.get("type") == "string" and not ({"enum", "pattern", "format"} & set(field)):
        field["pattern"] = NO_NUL_PATTERN


def _path_parameters(path: str) -> list[str]:
    return sorted(uritemplate.variables(path))


def link_created_objects(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """POSTPROCESSING hook: OpenAPI links from each create to the operations on what it made.

    `POST /api/v1/experiments/` answers 201 with the experiment; its `key` is the `{key}` of
    `/api/v1/experiments/{key}/...`. Clients and stateful fuzzers (schemathesis) follow them.
    A path parameter is filled from the body field of the same name, or `id` for `*_id`.
    """
    paths: dict[str, Any] = result.get("paths", {})
    for collection, operations in paths.items():
        create = operations.get("post")
        if create is None or _path_parameters(collection) or "201" not in create["responses"]:
            continue
        links: dict[str, Any] = {}
        for path, targets in paths.items():
            parameters = _path_parameters(path)
            if not path.startswith(collection) or len(parameters) != 1:
                continue
            (name,) = parameters
            field = "id" if name.endswith("_id") else name
            for method, operation in targets.items():
                if method not in ("get", "post", "put", "patch", "delete"):
                    continue
                operation_id = operation["operationId"]
                links[operation_id] = {
                    "operationId": operation_id,
                    "parameters": {name: f"$response.body#/{field}"},
                }
        if links:
            create["responses"]["201"]["links"] = links
    return result
