"""Per-request logging context: request id, experiment and variant, carried in contextvars.

The edge binds a request id to every HTTP request (``RequestIdMiddleware``, which
``config.asgi`` wraps around the whole app, calls ``bind_request`` and echoes the id in an
``X-Request-ID`` response header); the parts that decide a variant (the
decision API, the proxy, the events API) call ``set_route(experiment, variant)`` once they
know it. ``config.logging.JsonFormatter`` adds whatever is bound to every record logged
while the request is handled, so one ``grep`` of a request id finds all of its lines.

uvicorn runs each request in its own asyncio task, and a task starts from a copy of the
context, so values bound during one request never leak into another. Celery tasks and
threads may use ``log_context(...)`` to bind fields for a block.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

_Message = MutableMapping[str, Any]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[_Message]], _Send], Awaitable[None]
]

REQUEST_ID_HEADER: Final = b"x-request-id"
# A client-supplied request id longer than this is replaced, so it cannot flood the logs.
MAX_REQUEST_ID_LENGTH: Final = 128

request_id_var: ContextVar[str | None] = ContextVar("rampart_request_id", default=None)
experiment_var: ContextVar[str | None] = ContextVar("rampart_experiment", default=None)
variant_var: ContextVar[str | None] = ContextVar("rampart_variant", default=None)


def new_request_id() -> str:
    """A random 16-hex-digit id (64 bits: unique enough for a log search, cheap to make)."""
    return os.urandom(8).hex()


def _acceptable(value: bytes) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and all(33 <= byte < 127 for byte in value)


def bind_request(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Bind the request id of one HTTP request and return it.

    The client's (or the load balancer's) ``X-Request-ID`` is kept when it is printable
    ASCII without spaces and at most 128 characters, so a trace can cross services;
    otherwise a new id is made. Experiment and variant are cleared.
    """
    request_id = None
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _acceptable(value):
                request_id = value.decode("ascii")
            break
    if request_id is None:
        request_id = new_request_id()
    request_id_var.set(request_id)
    experiment_var.set(None)
    variant_var.set(None)
    return request_id


def set_route(experiment: str | None, variant: str | None = None) -> None:
    """Record which experiment (and variant) the current request is about."""
    experiment_var.set(experiment)
    variant_var.set(variant)


def current() -> dict[str, str]:
    """The bound fields, without the unset ones (what the JSON formatter adds)."""
    fields: dict[str, str] = {}
    request_id = request_id_var.get()
    if request_id is not None:
        fields["request_id"] = request_id
    experiment = experiment_var.get()
    if experiment is not None:
        fields["experiment"] = experiment
    variant = variant_var.get()
    if variant is not None:
        fields["variant"] = variant
    return fields


@contextmanager
def log_context(
    *,
    request_id: str | None = None,
    experiment: str | None = None,
    variant: str | None = None,
) -> Iterator[None]:
    """Bind the given fields for the duration of a block (a Celery task, a thread's job)."""
    tokens = [
        (var, var.set(value))
        for var, value in (
            (request_id_var, request_id),
            (experiment_var, experiment),
            (variant_var, variant),
        )
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class RequestIdMiddleware:
    """ASGI wrapper: binds a request id to every HTTP request and returns it as X-Request-ID."""

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[_Message]],
        send: _Send,
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = bind_request(scope["headers"]).encode("ascii")

        async def send_with_request_id(message: _Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_request_id)
