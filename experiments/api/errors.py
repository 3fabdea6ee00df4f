"""One exception handler for /api: every error becomes an RFC 9457 problem (problem+json).

DRF's own exceptions, the domain errors of `experiments.errors` and unhandled exceptions are all
mapped here; Django's 400/403/404/500 handlers use the same format for paths under /api/.
drf-standardized-errors was considered: its body is not RFC 9457 (no `title`/`status`, `type`
is a category, `application/json`), so adapting it would replace most of it; this module is
the small part that Rampart needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse
from django.views import csrf, defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions
from rest_framework.settings import api_settings
from rest_framework.views import set_rollback

from experiments.errors import InUse, InvalidInput, InvalidTransition, NotEditable, NotFound
from experiments.problems import (
    PROBLEM_CONTENT_TYPE,
    FieldError,
    problem_body,
    validation_detail,
)
from experiments.strict import UNKNOWN_FIELD

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"

# DRF exception class -> problem code; the status comes from the exception itself.
_DRF_CODES: tuple[tuple[type[exceptions.APIException], str], ...] = (
    (exceptions.ParseError, "malformed_json"),
    (exceptions.NotAuthenticated, "not_authenticated"),
    (exceptions.AuthenticationFailed, "not_authenticated"),
    (exceptions.PermissionDenied, "permission_denied"),
    (exceptions.NotFound, "not_found"),
    (exceptions.MethodNotAllowed, "method_not_allowed"),
    (exceptions.NotAcceptable, "not_acceptable"),
    (exceptions.UnsupportedMediaType, "unsupported_media_type"),
    (exceptions.Throttled, "throttled"),
)


def problem_response(
    body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
) -> HttpResponse:
    """A problem document as a plain Django response, whatever renderer content negotiation chose.

    DRF would render a `Response` with the negotiated renderer (HTML for a browser), so the
    problem is serialised here and the renderer is bypassed.
    """
    response = HttpResponse(
        json.dumps(body, ensure_ascii=False).encode(),
        status=int(body["status"]),
        content_type=PROBLEM_CONTENT_TYPE,
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _join(prefix: str, key: object) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def flatten_validation(detail: Any, prefix: str = "") -> list[FieldError]:
    """DRF's nested error structure as a flat list with paths like `ramp_steps[1].canary_share`.

    Serializer errors are dicts, a list serializer's are lists with one entry per item (empty
    for valid items), ListField's are dicts keyed by int index, DictField's by the dict's key.
    """
    if isinstance(detail, Mapping):
        found: list[FieldError] = []
        for key, value in detail.items():
            if key == api_settings.NON_FIELD_ERRORS_KEY:
                found.extend(flatten_validation(value, prefix))
            else:
                found.extend(flatten_validation(value, _join(prefix, key)))
        return found
    if isinstance(detail, list):
        if all(isinstance(item, (Mapping, list)) for item in detail) and detail:
            found = []
            for index, item in enumerate(detail):
                if item:
                    found.extend(flatten_validation(item, _join(prefix, index)))
            return found
        return [
            FieldError(
                field=prefix or None,
                code=str(getattr(item, "code", None) or "invalid"),
                message=str(item),
            )
            for item in detail
        ]
    return [
        FieldError(
            field=prefix or None,
            code=str(getattr(detail, "code", None) or "invalid"),
            message=str(detail),
        )
    ]


def validation_problem(errors: list[FieldError]) -> dict[str, Any]:
    """400 naming every field; `unknown_field` when unknown fields are all that is wrong."""
    only_unknown = bool(errors) and all(e.code == UNKNOWN_FIELD for e in errors)
    code = UNKNOWN_FIELD if only_unknown else "validation_error"
    return problem_body(code=code, detail=validation_detail(errors), errors=errors)


def _domain_problem(exc: Exception) -> dict[str, Any] | None:
    if isinstance(exc, InvalidInput):
        return validation_problem(
            [
                FieldError(field=field or None, code="invalid", message=message)
                for field, messages in exc.errors.items()
                for message in messages
            ]
        )
    if isinstance(exc, NotFound):
        code = "experiment_not_found" if exc.entity == "experiment" else "not_found"
        return problem_body(code=code, detail=f"No {exc.entity} with the key {exc.key!r}.")
    if isinstance(exc, InvalidTransition):
        return problem_body(
            code="invalid_transition",
            detail=f"Cannot {exc.action}: the experiment is {exc.current}.",
            current=exc.current,
            requested=exc.requested,
        )
    if isinstance(exc, InUse):
        return problem_body(
            code="in_use",
            detail=f"The {exc.entity} {exc.key!r} is used by {exc.used_by}; it cannot be deleted.",
        )
    if isinstance(exc, NotEditable):
        message = f"Cannot change while the experiment is {exc.status}."
        return problem_body(
            code="not_editable",
            detail=f"Fields {', '.join(exc.fields)} cannot change while {exc.status}.",
            errors=[FieldError(field=f, code="not_editable", message=message) for f in exc.fields],
            experiment_status=exc.status,
        )
    return None


def _django_problem(exc: Exception) -> dict[str, Any] | None:
    """Django's refusals of a request it cannot safely read (raised while DRF parses it)."""
    if isinstance(exc, RequestDataTooBig):
        return problem_body(
            code="payload_too_large",
            detail="The request body is larger than the server accepts "
            "(DATA_UPLOAD_MAX_MEMORY_SIZE).",
        )
    if isinstance(exc, SuspiciousOperation):
        return problem_body(code="bad_request", detail="The request was refused as malformed.")
    return None


def _drf_problem(exc: exceptions.APIException) -> tuple[dict[str, Any], dict[str, str]]:
    headers: dict[str, str] = {}
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    if isinstance(exc, exceptions.ValidationError):
        return validation_problem(flatten_validation(exc.detail)), headers
    extensions: dict[str, Any] = {}
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        headers["Retry-After"] = str(int(exc.wait))
        extensions["retry_after_s"] = int(exc.wait)
    code = next((c for cls, c in _DRF_CODES if isinstance(exc, cls)), None)
    if isinstance(exc, exceptions.ParseError) and isinstance(exc.__context__, UnicodeDecodeError):
        code = "invalid_encoding"  # the JSON parser met bytes that are not UTF-8
    if code is None:
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else "bad_request"
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    body = problem_body(code=code, detail=str(detail), status=exc.status_code, **extensions)
    return body, headers


def exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    """DRF's EXCEPTION_HANDLER: a problem response for every exception, never a traceback."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    headers: dict[str, str] = {}
    body = _domain_problem(exc) or _django_problem(exc)
    if body is None and isinstance(exc, exceptions.APIException):
        body, headers = _drf_problem(exc)
    if body is None:
        request = context.get("request")
        logger.error(
            "Unhandled exception in %s %s",
            getattr(request, "method", "?"),
            getattr(request, "path", "?"),
            exc_info=exc,
        )
        body = problem_body(code="server_error", detail="An unexpected error occurred.")
    set_rollback()
    return problem_response(body, headers=headers)


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's handler400 (e.g. a malformed Host or a suspicious operation)."""
    if _is_api(request):
        return problem_response(problem_body(code="bad_request", detail="Bad request."))
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return problem_response(
            problem_body(code="permission_denied", detail="You may not do this.")
        )
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return api_not_found(request)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return problem_response(
            problem_body(code="server_error", detail="An unexpected error occurred.")
        )
    return defaults.server_error(request)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a session-authenticated write under /api/ without a valid token."""
    if _is_api(request):
        return problem_response(
            problem_body(code="permission_denied", detail=f"CSRF check failed: {reason}")
        )
    return csrf.csrf_failure(request, reason)


@csrf_exempt  # a 404 for every method, never a CSRF 403 (nothing is written here)
def api_not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Every path under /api/ that no route matches, for every method (also in debug mode)."""
    return problem_response(
        problem_body(code="not_found", detail=f"No API endpoint at {request.path}.")
    )
