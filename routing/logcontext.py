"""Per-request logging context: request id, experiment and variant, carried in a contextvar.

The edge binds a fresh context to every HTTP request (``RequestIdMiddleware``, which
``config.asgi`` wraps around the whole app); the parts that decide a variant (the decision
API and the proxy) call ``set_route(experiment, variant)`` once they know it.
``config.logging.JsonFormatter`` adds whatever is bound to every record logged while the
request is handled, so one ``grep`` of a request id finds all of its lines.

Request ids: a request that arrives with ``X-Request-ID`` (from the client or the load
balancer) keeps it, and the response echoes it, so a trace can cross services. Otherwise an
id is made when the request logs its first line, so the hot path pays nothing for ids that
no log line uses (such a request gets no ``X-Request-ID`` header).

uvicorn runs each request in its own asyncio task, and a task starts from a copy of the
context, so values bound during one request never leak into another. Celery tasks and
threads may use ``log_context(...)`` to bind fields for a block.

Cost on the hot path: a scan of the request headers, one small object and one contextvar
set (under a microsecond); ``set_route`` assigns two attributes of that object.
"""

from __future__ import annotations

import itertools
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


class RequestContext:
    """What the logs should say about the request being handled."""

    __slots__ = ("experiment", "request_id", "variant")

    def __init__(
        self,
        request_id: str | None = None,
        experiment: str | None = None,
        variant: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.experiment = experiment
        self.variant = variant


_context: ContextVar[RequestContext | None] = ContextVar("rampart_log_context", default=None)


class _RequestIds:
    """Ids unique across processes: 8 random hex digits per process, then a counter."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(4).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter):x}"


_ids = _RequestIds()
# A forked child (a Celery prefork worker) must not repeat its parent's ids.
os.register_at_fork(after_in_child=_ids.reset)


def new_request_id() -> str:
    """A new request id such as ``3fa2b1c0-1a2b``."""
    return _ids.next()


def _acceptable(value: bytes) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and all(33 <= byte < 127 for byte in value)


def bind_request(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Bind a fresh context for one HTTP request; the request id it arrived with, if any.

    The client's (or the load balancer's) ``X-Request-ID`` is kept when it is printable
    ASCII without spaces and at most 128 characters; otherwise ``request_id()`` makes one
    when it is first needed.
    """
    request_id = None
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _acceptable(value):
                request_id = value.decode("ascii")
            break
    _context.set(RequestContext(request_id))
    return request_id


def request_id() -> str | None:
    """The current request's id (made now if the request brought none); None outside one."""
    context = _context.get()
    if context is None:
        return None
    if context.request_id is None:
        context.request_id = _ids.next()
    return context.request_id


def set_route(experiment: str | None, variant: str | None = None) -> None:
    """Record which experiment (and variant) the current request is about."""
    context = _context.get()
    if context is None:
        _context.set(RequestContext(None, experiment, variant))
    else:
        context.experiment = experiment
        context.variant = variant


def current() -> dict[str, str]:
    """The bound fields, without the unset ones (what the JSON formatter adds)."""
    context = _context.get()
    if context is None:
        return {}
    if context.request_id is None:
        context.request_id = _ids.next()
    fields = {"request_id": context.request_id}
    if context.experiment is not None:
        fields["experiment"] = context.experiment
    if context.variant is not None:
        fields["variant"] = context.variant
    return fields


@contextmanager
def log_context(
    *,
    request_id: str | None = None,
    experiment: str | None = None,
    variant: str | None = None,
) -> Iterator[None]:
    """Bind fields for the duration of a block (a Celery task, a thread's job).

    Fields not given keep the values of the enclosing context.
    """
    outer = _context.get() or RequestContext()
    token = _context.set(
        RequestContext(
            request_id if request_id is not None else outer.request_id,
            experiment if experiment is not None else outer.experiment,
            variant if variant is not None else outer.variant,
        )
    )
    try:
        yield
    finally:
        _context.reset(token)


class RequestIdMiddleware:
    """ASGI wrapper: a fresh logging context per HTTP request; echoes a given X-Request-ID."""

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
        given = bind_request(scope["headers"])
        if given is None:
            await self.app(scope, receive, send)
            return
        header = (REQUEST_ID_HEADER, given.encode("ascii"))

        async def send_with_request_id(message: _Message) -> None:
            if message["type"] == "http.response.start":
                # A new list: the app's may be a constant shared by every response.
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_request_id)
