"""What the proxy forwards of a request, what it passes on of an answer, and the unit id.

Request headers are forwarded byte for byte except the hop-by-hop ones (RFC 9110 section
7.6.1), those named in ``Connection``, and a few the proxy handles itself; each header costs
one dict lookup (``REQUEST_HEADER_ACTIONS``), as this runs for every header of every request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import unquote_plus

import orjson

from routing.edge.asgi import Scope
from routing.edge.inputs import encoding_error
from routing.edge.problems import EdgeError

# RFC 9110 section 7.6.1: connection-specific fields a proxy must not forward.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers that are not forwarded as they came: Host and Content-Length are set for
# the upstream (routing.proxy.upstream), the Rampart key is ours, X-Forwarded-For is rebuilt,
# and Expect was already answered (the body is read before forwarding).
REQUEST_DROP: Final = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"x-rampart-key",
    b"x-forwarded-for",
    b"expect",
}
# Response headers not passed on: hop-by-hop ones, and Date and Server, which the edge's own
# server (uvicorn) sets; passing the model's as well would send each twice. nginx's
# proxy_pass drops the same two by default.
RESPONSE_DROP: Final = HOP_BY_HOP | {b"date", b"server"}
SHADOW_HEADER: Final = b"X-Rampart-Shadow: 1\r\n"

# What the proxy does with a request header, by name; a name not listed is forwarded as it is.
# One dict lookup per header (the request loop runs for every header of every request).
ACTION_DROP: Final = 0
ACTION_KEY: Final = 1
ACTION_LENGTH: Final = 2
ACTION_FORWARDED_FOR: Final = 3
ACTION_CONNECTION: Final = 4
ACTION_AUTHORIZATION: Final = 5
ACTION_COOKIE: Final = 6
ACTION_UNIT: Final = 7
REQUEST_HEADER_ACTIONS: Final[dict[bytes, int]] = {
    **dict.fromkeys(REQUEST_DROP, ACTION_DROP),
    b"x-rampart-key": ACTION_KEY,
    b"content-length": ACTION_LENGTH,
    b"x-forwarded-for": ACTION_FORWARDED_FOR,
    b"connection": ACTION_CONNECTION,
    b"authorization": ACTION_AUTHORIZATION,
    b"cookie": ACTION_COOKIE,
}
CACHE_HIT_HEADER: Final = (b"x-rampart-cache", b"hit")


def passed_on(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream's response headers without those the proxy must not pass on."""
    return [header for header in headers if header[0].lower() not in RESPONSE_DROP]


def header_text(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The last value of a (lower-case) header as UTF-8 text, or None.

    EdgeError 400 ``invalid_encoding`` when it is not UTF-8 (see ``unit_encoding_error``).
    """
    found = None
    for header, value in headers:
        if header == name:
            found = value
    if found is None:
        return None
    try:
        return found.decode()
    except UnicodeDecodeError:
        raise unit_encoding_error("header", name.decode("latin-1")) from None


def unit_encoding_error(source: str, name: str) -> EdgeError:
    """The proxy's 400 for a unit id that is not UTF-8.

    Such a unit cannot be determined: replacing the bytes would merge distinct raw ids into
    one unit, and serving control silently would hide a client bug that sends every one of
    its users to control. So the proxy answers itself, and nothing reaches the model.
    """
    return encoding_error(name, f"the unit id in {source}")


def content_encoding(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-encoding":
            return value.strip().lower()
    return b""


def unit_from_request(
    source: str, name: str, scope: Scope, body: bytes, cookie: bytes | None
) -> str | None:
    """The unit id from a cookie, a JSON body field or a query parameter (header: inline).

    EdgeError 400 ``invalid_encoding`` when the unit id is not UTF-8 (``unit_encoding_error``);
    invalid bytes elsewhere in the request are the model's business.
    """
    if source == "query":
        query: bytes = scope["query_string"]
        if not query:
            return None
        for part in query.split(b"&"):
            key, _, value = part.partition(b"=")
            if unquote_plus(key.decode("latin-1")) != name:
                continue
            try:
                decoded = unquote_plus(value.decode(), errors="strict")
            except UnicodeDecodeError:
                raise unit_encoding_error("query parameter", name) from None
            if decoded:  # a blank value is skipped, as parse_qsl does
                return decoded
        return None
    if source == "cookie":
        if cookie is None:
            return None
        for pair in cookie.split(b";"):
            key, _, value = pair.strip().partition(b"=")
            if key.decode("latin-1") == name:
                try:
                    return value.strip().strip(b'"').decode() or None
                except UnicodeDecodeError:
                    raise unit_encoding_error("cookie", name) from None
        return None
    if source == "json_field":
        if not body:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = _lenient_json(body)
        if not isinstance(data, dict):
            return None
        field_value: Any = data.get(name)
        if isinstance(field_value, str):
            try:
                field_value.encode()
            except UnicodeEncodeError:
                raise unit_encoding_error("body field", name) from None
            return field_value
        if isinstance(field_value, int) and not isinstance(field_value, bool):
            return str(field_value)
        return None
    return None


def _lenient_json(body: bytes) -> Any:
    """A JSON body orjson refused for its encoding, decoded with the invalid bytes kept.

    Invalid UTF-8 elsewhere in the body does not hide a valid unit field; an invalid one is
    then found and refused. None when the body is not JSON at all.
    """
    try:
        return json.loads(body.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
