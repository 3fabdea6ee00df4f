"""The GrowthBook SDK endpoint: ``GET /api/features/{client_key}``, answered from the snapshot.

Mounted on the edge at ``/api/features`` (``config.asgi``), next to ``/v1/decide``: a request
reads ``context.snapshots.current`` and answers the payload ``routing.edge.features`` built once
per snapshot, so it costs no database query and no Django. GrowthBook's SDKs fetch
``{apiHost}/api/features/{clientKey}`` (``@growthbook/growthbook``'s feature repository;
the Python ``growthbook`` package's ``_get_features_url``), so an SDK pointed at a Rampart
server with ``apiHost`` = its base URL and ``clientKey`` = a Rampart key works unchanged.

Client keys are Rampart API keys with the ``sdk`` scope, in the path (SDKs send no other
credential). An ``sdk`` key may read this payload and post exposures (``/v1/exposures``) and
nothing else: the payload holds no upstream URLs and no secrets, and exposures are only
taken when the edge's own assignment agrees, so the key is safe to embed in a front end.
Not checked when ``EDGE_REQUIRE_KEY`` is false.

Answers:
  * 200 with the payload, ``ETag`` and ``Cache-Control: no-cache``; a request whose
    ``If-None-Match`` holds the ETag gets 304 without a body (the Python SDK sends it; a
    browser's HTTP cache does for the JavaScript SDK). The ETag depends only on the
    payload's content (not on ``dateUpdated``), so replicas answer 304 for each other's
    ETags.
  * ``Access-Control-Allow-Origin: *`` on every answer and an answer to CORS preflight
    (``OPTIONS``), so browsers may fetch it from any origin: the credential is in the URL,
    never in a cookie.
  * Problem details: 401 ``not_authenticated`` (unknown or revoked key), 403
    ``permission_denied`` (no ``sdk`` scope), 404 ``not_found`` (no key in the path, or a
    deeper path), 405 ``method_not_allowed``, 503 ``not_ready`` (no snapshot yet).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Final

import orjson

from routing.edge.asgi import (
    CORS_HEADERS,
    Receive,
    Scope,
    Send,
    auth_error,
    etag_matches,
    header_value,
    method_not_allowed,
    not_ready_error,
    send_error,
    send_json,
    send_preflight,
    send_problem,
)
from routing.edge.context import SCOPE_SDK, EdgeContext
from routing.edge.features import features_payload
from routing.edge.problems import EdgeError
from routing.snapshot import RoutingSnapshot

logger = logging.getLogger(__name__)

MOUNT_PATH: Final = "/api/features"


class FeaturesApp:
    """``GET /api/features/{client_key}``: the GrowthBook payload of the current snapshot."""

    def __init__(self, context: EdgeContext) -> None:
        self.context = context
        self._built_for: RoutingSnapshot | None = None
        self._body = b""
        self._etag = b""

    async def startup(self) -> None:
        """Nothing to start: the payload is built on the first request after a new snapshot."""

    async def shutdown(self) -> None:
        """Nothing to stop."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._handle(scope, send)
        except EdgeError as error:
            error.headers = (*error.headers, *CORS_HEADERS)
            await send_problem(send, error)
        except Exception:
            logger.exception("the GrowthBook features endpoint failed")
            await send_error(
                send, 500, "server_error", "the edge failed to answer", headers=CORS_HEADERS
            )

    async def _handle(self, scope: Scope, send: Send) -> None:
        client_key = scope["path"][len(MOUNT_PATH) :].strip("/")
        if not client_key or "/" in client_key:
            raise EdgeError(
                404,
                "not_found",
                f"no such endpoint: {scope['path']} (use {MOUNT_PATH}/<client key>)",
            )
        method = scope["method"]
        if method == "OPTIONS":
            await send_preflight(scope, send, b"GET, HEAD, OPTIONS")
            return
        if method not in ("GET", "HEAD"):
            raise method_not_allowed("GET", "HEAD", "OPTIONS")
        snapshot = self.context.snapshots.current
        if not snapshot.loaded:
            raise not_ready_error()
        if self.context.require_key:
            check = snapshot.check_key(client_key, SCOPE_SDK)
            if not check.ok:
                raise auth_error(check)
        body, etag = self._payload(snapshot)
        headers = [(b"etag", etag), (b"cache-control", b"no-cache"), *CORS_HEADERS]
        wanted = header_value(scope["headers"], b"if-none-match")
        if wanted is not None and etag_matches(wanted, etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if method == "HEAD":
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send_json(send, 200, body, headers)

    def _payload(self, snapshot: RoutingSnapshot) -> tuple[bytes, bytes]:
        """The body and ETag for ``snapshot``, built once per snapshot."""
        if self._built_for is not snapshot:
            payload = features_payload(snapshot)
            content = orjson.dumps(
                {key: value for key, value in payload.items() if key != "dateUpdated"},
                option=orjson.OPT_SORT_KEYS,
            )
            self._body = orjson.dumps(payload)
            self._etag = f'"gb-{hashlib.sha256(content).hexdigest()[:24]}"'.encode()
            self._built_for = snapshot
        return self._body, self._etag
