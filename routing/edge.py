"""The edge: a plain ASGI app that answers routing decisions from the in-process snapshot.

``build_edge`` returns the ASGI application that ``config.asgi`` serves. It owns the
lifespan (starts the snapshot holder, the exposure recorder, then each mounted part; stops
them in reverse), answers ``/v1/decide``, ``/v1/decide/batch`` and ``/v1/config`` itself,
passes paths under a mount prefix (``/proxy/``, ``/v1/events``...) to that part with the
scope unchanged, answers other ``/v1/`` paths with a JSON 404, and passes everything else
to ``fallback`` (Django). A request touches no database and no Django machinery: it reads
``context.snapshots.current`` and appends to ``context.exposures``.

Authentication: ``Authorization: Bearer rk_...`` or ``X-Rampart-Key: rk_...``, checked
against the snapshot's key hashes (scope ``decide``) unless ``EDGE_REQUIRE_KEY`` is false.
A key created or revoked through the API takes effect within one snapshot refresh.

Errors are JSON, ``{"error": {"code": ..., "message": ..., "field": ...}}`` (``field`` is
null unless one input field is at fault): 400 ``invalid`` (missing or bad field, bad
JSON), 401 ``unauthorized``, 403 ``forbidden``, 404 ``not_found`` (unknown experiment or
path), 405 ``method_not_allowed``, 413 ``too_large``, 503 ``not_ready`` (no snapshot yet).

Endpoints
---------
``GET /v1/decide?experiment=KEY&unit=ID`` and ``POST /v1/decide`` with
``{"experiment": KEY, "unit": ID}`` answer::

    {"experiment": "ranker-v2", "unit": "u-42", "variant": "v2", "in_experiment": true,
     "reason": "assigned", "upstream": "http://10.0.0.7:9002"}

``variant`` is the key served (control when the unit is not in the experiment) and
``upstream`` its URL. Reasons: ``assigned``, ``override``, ``not_in_coverage``,
``not_in_namespace``, ``not_running`` (draft or paused), ``rolled_back_to_control``,
``completed`` (the winner), ``invalid_config``; see ``routing.snapshot``. A decision with
``in_experiment`` true records the unit's first exposure (buffered, written in bulk).
A unit id is 1 to 200 characters; a number is taken as its decimal string.

``POST /v1/decide/batch`` takes either ``{"experiment": KEY, "units": [ID, ...]}`` (one
experiment, up to ``MAX_BATCH_UNITS`` units) or ``{"unit": ID}`` (every running
experiment) or ``{"unit": ID, "experiments": [KEY, ...]}`` (the listed experiments,
whatever their status), and answers ``{"decisions": [decision, ...]}`` in request order
(for ``{"unit": ID}``: ordered by experiment key).

``GET /v1/config`` returns the snapshot for SDK local evaluation, with an ``ETag``; a
request whose ``If-None-Match`` holds that ETag gets 304 and no body. It carries no
secrets: no API key hashes, no webhook URLs. Upstream URLs are included because every
decision response already names them. Format (``format`` 1)::

    {
      "format": 1,
      "version": 17,                  # global config version the snapshot was built from
      "experiments": [
        {
          "id": 3, "key": "ranker-v2", "kind": "canary" | "ab",
          "status": "draft" | "running" | "paused" | "completed" | "rolled_back",
          "seed": "ranker-v2",        # hashed with the unit id (never empty)
          "hash_version": 2,          # GrowthBook hash version, 1 or 2
          "unit_source": "header", "unit_attribute": "X-Rampart-Unit",
          "coverage": 1.0,            # already folded into "ranges"; canaries always 1.0
          "namespace": null | {"id": "search", "start": 0.0, "end": 0.5},
          "control": "v1",
          "canary_share": 0.05 | null,  # the current ramp step's share; null for A/B tests
          "ramp_position": 0 | null,
          "winner": null | "v2",
          "variants": [               # routed variants, control first
            {"key": "v1", "weight": 0.95, "is_control": true,
             "upstream": "http://...", "ranges": [[0.0, 0.95]]},
            {"key": "v2", "weight": 0.05, "is_control": false,
             "upstream": "http://...", "ranges": [[0.95, 1.0]]}
          ],
          "shadows": [{"key": "v3", "upstream": "http://..."}],   # mirrored, never served
          "overrides": {"qa-anna": "v2"},   # unit id -> variant key (shadow targets removed)
          "fixed": null | {"variant": "v1", "reason": "not_running"}
        }
      ]
    }

``weight`` is the variant's share after the ramp (for a canary: the current share split
over the canaries by their configured weights, control the rest). ``ranges`` are the
bucket intervals [start, end) that select the variant, with coverage applied; a canary
with three or more canaries can own several intervals of control, which GrowthBook's
weights cannot express, so evaluate from ``ranges``. To reproduce the edge's decision:
  1. ``fixed`` not null: serve ``fixed.variant`` with ``fixed.reason``, not in experiment.
  2. The unit id in ``overrides``: serve that variant, reason ``override``, not in
     experiment (allowlisted QA traffic is not counted).
  3. ``namespace`` not null: ``n = fnv1a32(unit + "__" + id) % 1000 / 1000`` (hash
     version 1); unless ``start <= n < end``, serve control, reason ``not_in_namespace``.
  4. ``b`` = GrowthBook's ``hash(seed, unit, hash_version)``: version 2 is
     ``fnv1a32(str(fnv1a32(seed + unit))) % 10000 / 10000``, version 1 is
     ``fnv1a32(unit + seed) % 1000 / 1000``; FNV-1a 32 over UTF-16 code units
     (``routing.hashing``).
  5. The first variant (in list order) with an interval ``start <= b < end`` is served,
     reason ``assigned``, in experiment. None: control, reason ``not_in_coverage``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import unquote_plus

import orjson
from django.conf import settings

from routing.logcontext import set_route
from routing.metrics import count_decision
from routing.recorder import ExposureRecorder
from routing.snapshot import (
    Decision,
    ExperimentRoute,
    KeyCheck,
    RoutingSnapshot,
    SnapshotHolder,
)

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_DECIDE: Final = "decide"
MAX_BODY_BYTES: Final = 1024 * 1024
MAX_BATCH_UNITS: Final = 1000
MAX_UNIT_LENGTH: Final = 200

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]


class SubApp(Protocol):
    """A part of the edge mounted under a path prefix (the proxy, the events API...)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


@dataclass
class EdgeContext:
    """What every part of the edge shares: the snapshot holder and the exposure recorder."""

    snapshots: SnapshotHolder
    exposures: ExposureRecorder
    require_key: bool = field(default_factory=lambda: bool(settings.EDGE_REQUIRE_KEY))

    @classmethod
    def from_settings(cls) -> EdgeContext:
        return cls(snapshots=SnapshotHolder(), exposures=ExposureRecorder())

    def check_key(self, headers: Iterable[tuple[bytes, bytes]], scope: str) -> KeyCheck | None:
        """None when the request may proceed, else the failed check to answer with."""
        if not self.require_key:
            return None
        check = self.snapshots.current.check_key(api_key_from_headers(headers), scope)
        return None if check.ok else check


class EdgeError(Exception):
    """A request the edge refuses; rendered as the JSON error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


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
    send: Send, status: int, code: str, message: str, field: str | None = None
) -> None:
    """Send ``{"error": {"code", "message", "field"}}`` with ``status``."""
    body = orjson.dumps({"error": {"code": code, "message": message, "field": field}})
    await send_json(send, status, body)


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
            raise EdgeError(413, "too_large", f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _decide_query(query_string: bytes) -> tuple[str | None, str | None]:
    """``experiment`` and ``unit`` from a query string (the first of each wins).

    Equivalent to ``urllib.parse.parse_qsl`` for these two names at a quarter of its cost,
    which matters at ~15 µs of work per decision: parameters without an escape are not
    unquoted at all.
    """
    experiment = unit = None
    for part in query_string.decode("utf-8", "replace").split("&"):
        name, _, value = part.partition("=")
        if name == "experiment" and experiment is None:
            experiment = _unquote(value)
        elif name == "unit" and unit is None:
            unit = _unquote(value)
    return experiment, unit


def _unquote(value: str) -> str:
    if "%" in value or "+" in value:
        return unquote_plus(value)
    return value


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EdgeError(400, "invalid", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EdgeError(400, "invalid", "the body must be a JSON object")
    return data


def _experiment_key(value: Any, name: str = "experiment") -> str:
    if value is None or value == "":
        raise EdgeError(400, "invalid", f"{name} is required", name)
    if not isinstance(value, str):
        raise EdgeError(400, "invalid", f"{name} must be a string", name)
    return value


def _unit_id(value: Any, name: str = "unit") -> str:
    if value is None or value == "":
        raise EdgeError(400, "invalid", f"{name} is required", name)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EdgeError(400, "invalid", f"{name} must be a string", name)
    unit = value if isinstance(value, str) else str(value)
    if len(unit) > MAX_UNIT_LENGTH:
        raise EdgeError(400, "invalid", f"{name} is longer than {MAX_UNIT_LENGTH} characters", name)
    if "\x00" in unit:
        # PostgreSQL text cannot hold NUL: the exposure could not be recorded.
        raise EdgeError(400, "invalid", f"{name} must not contain NUL characters", name)
    return unit


class Edge:
    """The ASGI application ``build_edge`` returns."""

    def __init__(
        self,
        *,
        context: EdgeContext,
        mounts: Mapping[str, SubApp],
        fallback: ASGIApp | None,
    ) -> None:
        self.context = context
        # Longest prefix first, so "/v1/events/batch" can be mounted next to "/v1/events".
        self.mounts = MappingProxyType(
            dict(sorted(mounts.items(), key=lambda item: len(item[0]), reverse=True))
        )
        # Mounts by the first path segment of their prefix ("/v1/events" under "/v1"), still
        # longest first, so a request compares its path with the few prefixes that can match.
        # A prefix of "/" (empty once stripped) matches every path and comes last everywhere.
        stripped = [(prefix.rstrip("/"), app) for prefix, app in self.mounts.items()]
        self._catch_all = [(prefix, app) for prefix, app in stripped if not prefix]
        self._mounts_by_segment: dict[str, list[tuple[str, SubApp]]] = {}
        for prefix, app in stripped:
            if prefix:
                self._mounts_by_segment.setdefault(_first_segment(prefix), []).append((prefix, app))
        for candidates in self._mounts_by_segment.values():
            candidates.extend(self._catch_all)
        self.fallback = fallback
        self._started: list[Callable[[], Awaitable[None]]] = []
        self._routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            "/v1/decide": self._decide,
            "/v1/decide/batch": self._decide_batch,
            "/v1/config": self._config,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            handler = self._routes.get(path)
            if handler is not None:
                try:
                    await handler(scope, receive, send)
                except EdgeError as error:
                    await send_error(send, error.status, error.code, error.message, error.field)
                return
            end = path.find("/", 1)  # _first_segment(path), inlined on the hot path
            candidates = self._mounts_by_segment.get(
                path if end < 0 else path[:end], self._catch_all
            )
            for prefix, app in candidates:
                if path.startswith(prefix) and (
                    len(path) == len(prefix) or path[len(prefix)] == "/"
                ):
                    await app(scope, receive, send)
                    return
            if path.startswith("/v1/") or self.fallback is None:
                await send_error(send, 404, "not_found", f"no such endpoint: {path}")
                return
            await self.fallback(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif self.fallback is not None:
            await self.fallback(scope, receive, send)

    # --- lifespan -------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the snapshot holder, the recorder, then every mounted part."""
        steps: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
            (self.context.snapshots.start, self.context.snapshots.stop),
            (self.context.exposures.start, self.context.exposures.stop),
            *((app.startup, app.shutdown) for app in self.mounts.values()),
        ]
        for start, stop in steps:
            try:
                await start()
            except BaseException:
                await self.shutdown()
                raise
            self._started.append(stop)
        # Everything loaded so far (Django, the apps, the first snapshot) lives as long as
        # the process. Moving it out of the collector's reach keeps full collections, which
        # otherwise traverse every one of those objects, from pausing requests for 50-150 ms.
        gc.freeze()
        # A young collection every 700 allocations cost about 8 µs per proxied request; the
        # hot path allocates little that lives, so collecting every 20,000 loses nothing.
        gc.set_threshold(20_000, 50, 100)

    async def shutdown(self) -> None:
        """Stop what ``startup`` started, in reverse order; report the first failure."""
        first_error: BaseException | None = None
        while self._started:
            stop = self._started.pop()
            try:
                await stop()
            except Exception as exc:
                logger.exception("edge shutdown step failed")
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("edge start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- endpoints ------------------------------------------------------------------------

    def _guard(self, scope: Scope) -> RoutingSnapshot:
        """The snapshot to answer from, once the caller's key passed; EdgeError otherwise."""
        context = self.context
        snapshot = context.snapshots.current
        if not snapshot.loaded:
            raise EdgeError(503, "not_ready", "the routing snapshot is not loaded yet")
        if context.require_key:
            check = snapshot.check_key(api_key_from_headers(scope["headers"]), SCOPE_DECIDE)
            if not check.ok:
                code = "unauthorized" if check.status == 401 else "forbidden"
                raise EdgeError(check.status, code, check.error)
        return snapshot

    @staticmethod
    def _route(snapshot: RoutingSnapshot, experiment_key: str) -> ExperimentRoute:
        route = snapshot.route(experiment_key)
        if route is None:
            raise EdgeError(
                404, "not_found", f"unknown experiment {experiment_key!r}", "experiment"
            )
        return route

    def _serve(self, route: ExperimentRoute, unit: str) -> Decision:
        decision = route.decide(unit)
        set_route(decision.experiment, decision.variant)
        count_decision(decision.experiment, decision.variant, decision.reason)
        if decision.in_experiment:
            self.context.exposures.record(
                experiment_id=route.experiment_id, unit_id=unit, variant_key=decision.variant
            )
        return decision

    async def _decide(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "GET":
            snapshot = self._guard(scope)
            experiment, unit = _decide_query(scope["query_string"])
        elif method == "POST":
            snapshot = self._guard(scope)
            data = _parse_json_object(await read_body(receive))
            experiment = data.get("experiment")
            unit = data.get("unit")
        else:
            raise EdgeError(405, "method_not_allowed", "use GET or POST")
        # The common case (a known experiment, a short string unit) skips the validators,
        # which only exist to name what is wrong.
        route = snapshot.route(experiment) if type(experiment) is str else None
        if (
            route is None
            or type(unit) is not str
            or not 0 < len(unit) <= MAX_UNIT_LENGTH
            or "\x00" in unit
        ):
            route = self._route(snapshot, _experiment_key(experiment))
            unit = _unit_id(unit)
        decision = self._serve(route, unit)
        # orjson serialises the slotted dataclass natively, in field order.
        await send_json(send, 200, orjson.dumps(decision))

    async def _decide_batch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            raise EdgeError(405, "method_not_allowed", "use POST")
        snapshot = self._guard(scope)
        data = _parse_json_object(await read_body(receive))
        decisions: list[Decision]
        if "units" in data:
            route = self._route(snapshot, _experiment_key(data.get("experiment")))
            units = data["units"]
            if not isinstance(units, list) or not units:
                raise EdgeError(400, "invalid", "units must be a non-empty list", "units")
            if len(units) > MAX_BATCH_UNITS:
                raise EdgeError(
                    400, "invalid", f"at most {MAX_BATCH_UNITS} units per request", "units"
                )
            decisions = [
                self._serve(route, _unit_id(unit, f"units[{index}]"))
                for index, unit in enumerate(units)
            ]
        elif "unit" in data:
            unit = _unit_id(data["unit"])
            keys = data.get("experiments")
            if keys is None:
                routes = sorted(
                    (r for r in snapshot.routes() if r.is_running),
                    key=lambda r: r.key,
                )
            else:
                if not isinstance(keys, list):
                    raise EdgeError(
                        400, "invalid", "experiments must be a list of keys", "experiments"
                    )
                routes = [
                    self._route(snapshot, _experiment_key(key, f"experiments[{index}]"))
                    for index, key in enumerate(keys)
                ]
            decisions = [self._serve(route, unit) for route in routes]
        else:
            raise EdgeError(400, "invalid", "give units (with experiment) or unit", "units")
        await send_json(send, 200, orjson.dumps({"decisions": decisions}))

    async def _config(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            raise EdgeError(405, "method_not_allowed", "use GET")
        body, etag = self._guard(scope).config_document()
        etag_bytes = etag.encode()
        headers = [(b"etag", etag_bytes), (b"cache-control", b"no-cache")]
        wanted = header_value(scope["headers"], b"if-none-match")
        if wanted is not None and _etag_matches(wanted, etag_bytes):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send_json(send, 200, body, headers)


def _first_segment(path: str) -> str:
    """``"/v1"`` for ``"/v1/events"``; the whole path when it has one segment."""
    end = path.find("/", 1)
    return path if end < 0 else path[:end]


def _etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    # RFC 9110, section 13.1.2: "*" or a list of entity tags, compared weakly.
    if if_none_match.strip() == b"*":
        return True
    tags = (tag.strip() for tag in if_none_match.split(b","))
    return any(tag.removeprefix(b"W/") == etag for tag in tags)


def build_edge(
    *,
    mounts: Mapping[str, Callable[[EdgeContext], SubApp]] | None = None,
    fallback: ASGIApp | None = None,
    context: EdgeContext | None = None,
) -> Edge:
    """The edge ASGI app; see the module docstring for what it serves.

    ``mounts`` maps a path prefix to a factory that receives the shared context and returns
    the part to mount; ``context`` defaults to one built from settings.
    """
    context = context or EdgeContext.from_settings()
    built = {prefix: factory(context) for prefix, factory in (mounts or {}).items()}
    return Edge(context=context, mounts=built, fallback=fallback)
