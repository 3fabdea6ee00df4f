"""The edge: a plain ASGI app that answers routing decisions from the in-process snapshot.

``build_edge`` returns the ASGI application that ``config.asgi`` serves. It owns the
lifespan (starts the snapshot holder, the exposure recorder, then each mounted part; stops
them in reverse), answers ``/v1/decide``, ``/v1/decide/batch`` and ``/v1/config`` itself,
passes paths under a mount prefix (``/proxy/``, ``/v1/events``...) to that part with the
scope unchanged, answers other ``/v1/`` paths with a JSON 404, and passes everything else
to ``fallback`` (Django). A request for an experiment the snapshot holds touches no
database and no Django machinery: it reads ``context.snapshots.current`` and appends to
``context.exposures`` (an unknown key costs at most a shared version check, see
``resolve_route``).

Authentication: ``Authorization: Bearer rk_...`` or ``X-Rampart-Key: rk_...``, checked
against the snapshot's key hashes (scope ``decide``) unless ``EDGE_REQUIRE_KEY`` is false.
A key created or revoked through the API takes effect within one snapshot refresh.

Errors are RFC 9457 problem details (``application/problem+json``, ``routing.edge.problems``;
docs/errors.md lists every code): 400 ``validation_error`` (missing or bad field),
``unknown_field``, ``malformed_json``, ``invalid_encoding`` (an id that is not UTF-8), 401
``not_authenticated``, 403 ``permission_denied``, 404 ``experiment_not_found`` or
``not_found`` (path), 405 ``method_not_allowed`` (with ``Allow``), 413
``payload_too_large``, 500 ``server_error``, 503 ``not_ready`` (no snapshot yet) and 503
``experiment_not_on_edge`` (with ``Retry-After``; see ``resolve_route``).

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
     (``rampart_sdk.hashing``).
  5. The first variant (in list order) with an interval ``start <= b < end`` is served,
     reason ``assigned``, in experiment. None: control, reason ``not_in_coverage``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

import orjson

from routing.edge.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    api_key_from_headers,
    auth_error,
    etag_matches,
    header_value,
    method_not_allowed,
    not_ready_error,
    read_body,
    send_error,
    send_json,
    send_problem,
)
from routing.edge.context import SCOPE_DECIDE, EdgeContext, SubApp, resolve_route
from routing.edge.inputs import (
    MAX_UNIT_LENGTH,
    batch_units,
    decide_query,
    experiment_key,
    parse_json_object,
    refuse_unknown_fields,
    unit_id,
)
from routing.edge.problems import EdgeError
from routing.logcontext import set_route
from routing.observe.metrics import count_decision
from routing.route import Decision, ExperimentRoute
from routing.snapshot import RoutingSnapshot

logger = logging.getLogger(__name__)

DECIDE_FIELDS: Final = frozenset({"experiment", "unit"})
BATCH_FIELDS: Final = frozenset({"experiment", "units", "unit", "experiments"})


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
                    await send_problem(send, error)
                except Exception:
                    # These handlers send their answer last, so nothing has been sent yet.
                    logger.exception("edge request %s failed", path)
                    await send_error(send, 500, "server_error", "the edge failed to answer")
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
            raise not_ready_error()
        if context.require_key:
            check = snapshot.check_key(api_key_from_headers(scope["headers"]), SCOPE_DECIDE)
            if not check.ok:
                raise auth_error(check)
        return snapshot

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
            experiment, unit = decide_query(scope["query_string"])
        elif method == "POST":
            snapshot = self._guard(scope)
            data = parse_json_object(await read_body(receive))
            refuse_unknown_fields(data, DECIDE_FIELDS)
            experiment = data.get("experiment")
            unit = data.get("unit")
        else:
            raise method_not_allowed("GET", "POST")
        # The common case (a known experiment, a short string unit) skips the validators,
        # which only exist to name what is wrong.
        route = snapshot.route(experiment) if type(experiment) is str else None
        if (
            route is None
            or type(unit) is not str
            or not 0 < len(unit) <= MAX_UNIT_LENGTH
            or "\x00" in unit
        ):
            key = experiment_key(experiment)
            unit = unit_id(unit)
            route = route or await resolve_route(self.context, key)
        decision = self._serve(route, unit)
        # orjson serialises the slotted dataclass natively, in field order.
        await send_json(send, 200, orjson.dumps(decision))

    async def _decide_batch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every unit and key is checked before the first decision is served (and recorded)."""
        if scope["method"] != "POST":
            raise method_not_allowed("POST")
        snapshot = self._guard(scope)
        data = parse_json_object(await read_body(receive))
        refuse_unknown_fields(data, BATCH_FIELDS)
        routes: list[ExperimentRoute]
        if "units" in data:
            if "unit" in data or "experiments" in data:
                raise EdgeError(
                    400,
                    "validation_error",
                    "give units with experiment, or unit (with experiments), not both",
                    "units",
                )
            units = batch_units(data["units"])
            key = experiment_key(data.get("experiment"))
            route = snapshot.route(key) or await resolve_route(self.context, key)
            decisions = [self._serve(route, unit) for unit in units]
        elif "unit" in data:
            if "experiment" in data:
                raise EdgeError(
                    400,
                    "validation_error",
                    "experiment goes with units; with unit, list experiments",
                    "experiment",
                )
            unit = unit_id(data["unit"])
            if "experiments" not in data:
                routes = sorted(
                    (r for r in snapshot.routes() if r.is_running),
                    key=lambda r: r.key,
                )
            else:
                routes = await self._batch_routes(snapshot, data["experiments"])
            decisions = [self._serve(route, unit) for route in routes]
        else:
            raise EdgeError(
                400, "validation_error", "give units (with experiment) or unit", "units"
            )
        await send_json(send, 200, orjson.dumps({"decisions": decisions}))

    async def _batch_routes(self, snapshot: RoutingSnapshot, keys: Any) -> list[ExperimentRoute]:
        if not isinstance(keys, list):
            raise EdgeError(
                400, "validation_error", "experiments must be a list of keys", "experiments"
            )
        errors: list[dict[str, Any]] = []
        for index, key in enumerate(keys):
            name = f"experiments[{index}]"
            if not isinstance(key, str) or not key:
                errors.append(
                    {
                        "field": name,
                        "code": "validation_error",
                        "message": f"{name} must be a non-empty string",
                        "index": index,
                    }
                )
        if errors:
            first = errors[0]
            raise EdgeError(
                400,
                "validation_error",
                first["message"],
                first["field"],
                errors=errors,
                index=first["index"],
            )
        routes = []
        since = time.monotonic()  # one version check serves every unknown key of the request
        for index, key in enumerate(keys):
            route = snapshot.route(key)
            if route is None:
                try:
                    route = await resolve_route(self.context, key, since=since)
                except EdgeError as error:
                    error.field = f"experiments[{index}]"
                    error.index = index
                    raise
            routes.append(route)
        return routes

    async def _config(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            raise method_not_allowed("GET")
        body, etag = self._guard(scope).config_document()
        etag_bytes = etag.encode()
        headers = [(b"etag", etag_bytes), (b"cache-control", b"no-cache")]
        wanted = header_value(scope["headers"], b"if-none-match")
        if wanted is not None and etag_matches(wanted, etag_bytes):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send_json(send, 200, body, headers)


def _first_segment(path: str) -> str:
    """``"/v1"`` for ``"/v1/events"``; the whole path when it has one segment."""
    end = path.find("/", 1)
    return path if end < 0 else path[:end]


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
