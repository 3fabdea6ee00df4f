"""One exception handler that maps domain errors to HTTP responses with a JSON body."""

from __future__ import annotations

from typing import Any

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from experiments.errors import InvalidInput, InvalidTransition, NotEditable, NotFound


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, InvalidInput):
        return Response(exc.errors, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, NotFound):
        return Response({"detail": str(exc)}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, InvalidTransition):
        return Response(
            {
                "detail": str(exc),
                "code": "invalid_transition",
                "current": exc.current,
                "requested": exc.requested,
            },
            status=status.HTTP_409_CONFLICT,
        )
    if isinstance(exc, NotEditable):
        return Response(
            {
                "detail": str(exc),
                "code": "not_editable",
                "status": exc.status,
                "fields": exc.fields,
            },
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)
