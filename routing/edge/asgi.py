"""The edge's ASGI plumbing: the types, reading a request, sending JSON and problem answers.

Shared by every part of the edge (``routing.edge.app`` and what it mounts). Answers are sent in
two messages with their length known, and errors as problem details
(``routing.edge.problems``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from routing.edge.problems import CONTENT_TYPE, EdgeError
from routing.route import KeyCheck

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES: Final = 1024 * 1024
# CORS for the endpoints a browser SDK calls (the GrowthBook payload, exposures): their
# credential is a header or the URL, never a cookie, so any origin may call them.
CORS_HEADERS: Final = ((b"access-control-allow-origin", b"*"),)
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]


def api_key_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The raw key from ``X-Rampart-Key`` or ``Authorization: Bearer``, else None.

    ``X-Rampart-Key`` wins so that the proxy can pass the caller's own Authorization
    header through to the model.
    """
    bearer = None
    for name, value in headers:
        if name == b"x-rampart-key":
            return value.decode("latin-1").strip()
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].decode("latin-1").strip()
    return bearer


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), else None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """True when an ``If-None-Match`` value names ``etag``.

    RFC 9110, section 13.1.2: ``*`` or a list of entity tags, compared weakly.
    """
    if if_none_match.strip() == b"*":
        return True
    tags = (tag.strip() for tag in if_none_match.split(b","))
    return any(tag.removeprefix(b"W/") == etag for tag in tags)


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete JSON response whose body is already serialised."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *_JSON_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a problem document (RFC 9457, ``routing.edge.problems``) with ``status``."""
    await send_problem(send, EdgeError(status, code, message, field, headers=tuple(headers)))


async def send_problem(send: Send, error: EdgeError) -> None:
    """Send ``error`` as ``application/problem+json``, with its headers."""
    body = error.body()
    headers = [
        (b"content-type", CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
        *error.headers,
    ]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="rampart"'))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def auth_error(check: KeyCheck) -> EdgeError:
    """The 401 ``not_authenticated`` or 403 ``permission_denied`` of a failed key check."""
    code = "not_authenticated" if check.status == 401 else "permission_denied"
    return EdgeError(check.status, code, check.error)


def not_ready_error(what: str = "the routing snapshot is not loaded yet") -> EdgeError:
    """503 ``not_ready`` (before the first snapshot, or a part not started), Retry-After 1."""
    return EdgeError(503, "not_ready", what, headers=((b"retry-after", b"1"),))


def method_not_allowed(*allowed: str) -> EdgeError:
    listed = ", ".join(allowed)
    return EdgeError(
        405,
        "method_not_allowed",
        f"use {' or '.join(allowed)}",
        headers=((b"allow", listed.encode()),),
    )


async def send_preflight(scope: Scope, send: Send, methods: bytes) -> None:
    """Answer a CORS preflight (``OPTIONS``): 204, any origin, the requested headers."""
    requested = header_value(scope["headers"], b"access-control-request-headers")
    headers = [
        *CORS_HEADERS,
        (b"access-control-allow-methods", methods),
        (b"access-control-max-age", b"86400"),
        (b"content-length", b"0"),
    ]
    if requested:
        headers.append((b"access-control-allow-headers", requested))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole request body; EdgeError 413 past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise EdgeError(413, "payload_too_large", f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
