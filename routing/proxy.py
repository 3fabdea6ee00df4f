"""The routing proxy: forwards an inference request to the variant its unit is assigned.

Mounted on the edge at ``/proxy/`` (``build_edge(mounts={"/proxy/": ProxyApp})``), it serves
``/proxy/{experiment}/{path}``: identifies the unit, assigns it with the snapshot's
``ExperimentRoute.decide()``, records the exposure, forwards the method, path, query, headers
and body to the chosen variant's upstream, and streams the answer back with
``X-Rampart-Experiment`` and ``X-Rampart-Variant`` headers. Everything happens in one hop, so
exposures are exact and latency is measured the same way for every arm.

Request handling, in order
    1. API key (``X-Rampart-Key: rk_...``, or ``Authorization: Bearer rk_...``, which is then
       not forwarded) with the ``decide`` scope, unless EDGE_REQUIRE_KEY is false: 401/403.
    2. Unknown experiment: 404. Body over PROXY_MAX_BODY_BYTES: 413.
    3. Unit id from the experiment's ``unit_source``/``unit_attribute``: a header (default
       ``X-Rampart-Unit``), a cookie, a top-level field of a JSON body, or a query parameter.
       A request without one is served control (reason ``no_unit``) and counted for control;
       it is not an error.
    4. Prediction cache (experiments with ``cache_ttl_s`` > 0): a hit is answered at once with
       ``X-Rampart-Cache: hit``, counted in ``cache_hits`` and kept out of latency statistics.
    5. Shadow variants get a mirrored copy in the background (see below).
    6. The request goes to the assigned arm's upstream over the pooled connections of one
       aiohttp session (``routing.upstream``: one write, aiohttp's C parser for the answer).

Failures and fallback
    An attempt fails on a 5xx answer, a timeout (PROXY_CONNECT_TIMEOUT_S to connect;
    PROXY_READ_TIMEOUT_S for the whole answer when it is read whole, between chunks when it is
    streamed) or a connection failure. When a non-control arm fails
    and the experiment has ``fallback_to_control``, the request is sent once to control, so the
    user still gets an answer; the failure counts against the arm (``error_count``, with its
    latency) and the fallback is counted (``fallback_count``). The response then carries
    ``X-Rampart-Served-By: <control key>``; ``X-Rampart-Variant`` stays the assigned arm, which
    is what exposures and ``/v1/decide`` say. Control's answer to a fallback is not added to
    control's statistics: those describe control's own units, and mixing in the other arm's
    traffic would make the two samples overlap.

    Every upstream has a circuit breaker (``routing.breaker``): PROXY_BREAKER_FAILURES
    consecutive failures open it, and one probe goes through every PROXY_BREAKER_COOLDOWN_S.
    While a non-control arm's breaker is open, its requests go straight to control and count
    as errors and fallbacks of that arm, with no latency (no call was made). The choice is
    deliberate: the arm is unhealthy, and counting those requests as errors is what lets the
    guardrail see it and roll the canary back, where skipping them would hide the outage from
    the analysis. Without ``fallback_to_control`` a failed arm's answer is passed on: its own
    5xx, or a JSON 502 (connection failure, open breaker) or 504 (timeout).

    When control itself cannot answer, the client gets a clean JSON error: 502
    ``upstream_unavailable`` (connection failure or open breaker) or 504 ``upstream_timeout``.
    A 5xx from control is the model's own answer and is passed through unchanged.

Shadows
    A variant with ``is_shadow`` receives a copy of every request forwarded to an upstream
    (cache hits are not), with ``X-Rampart-Shadow: 1``, from a background task: the user never
    waits for it or sees its answer. At most PROXY_SHADOW_CONCURRENCY copies are in flight per
    process; past that, and while the shadow's breaker is open, copies are dropped and counted
    (``rampart_proxy_shadow_dropped_total``). The shadow's latency and errors go to
    ``is_shadow`` observation rows. When control answered the same request (itself or as a
    fallback) with a complete body, the pair is compared: with ``shadow_compare_field`` set
    and both bodies JSON objects, the field's values are compared (and for numbers the
    absolute difference is summed); otherwise the bodies are compared byte for byte.

Measurement
    Latency is the time from sending the request upstream to receiving the last byte of the
    answer, in ms, for every attempt (failed ones included); see ``routing.observations`` for
    exactly what each statistic counts.

Limits and resources
    One ``aiohttp.ClientSession`` per process, created at start-up, with a TCP connector
    limited to PROXY_POOL_LIMIT connections (PROXY_POOL_LIMIT_PER_HOST per upstream) that are
    kept alive between requests; requests use its connections directly (``routing.upstream``
    says why and how). A client that disconnects cancels the upstream call: the
    connection is closed, never returned to the pool half-read. The proxy listens for
    disconnects only once a request has waited DISCONNECT_WATCH_AFTER_S (up to twice that) for
    its upstream, which spares fast answers a listener task: a client that leaves earlier is
    noticed then, or not at all if its answer arrives first (the request then counts as an
    ordinary one and the answer goes nowhere). Answers with a Content-Length up to 1 MiB are
    read whole and sent in one message (the common case for inference); others are streamed
    chunk by chunk. Hop-by-hop headers are removed both ways (and the model's Date and
    Server, which the edge sets), and ``X-Forwarded-For`` gets the client's address appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard
from urllib.parse import parse_qsl

import aiohttp
import orjson
from django.conf import settings

from routing import proxy_metrics
from routing.breaker import CircuitBreaker
from routing.edge import EdgeContext, Message, Receive, Scope, Send, send_error
from routing.logcontext import set_route
from routing.observations import ObservationAggregator
from routing.snapshot import Decision, ExperimentRoute, RoutingSnapshot
from routing.upstream import Upstream, UpstreamAnswer, UpstreamClient

logger = logging.getLogger(__name__)

SCOPE_DECIDE: Final = "decide"
MOUNT_PREFIX: Final = "/proxy/"
# Answers up to this size (with a Content-Length) are read whole and sent in one message.
BUFFER_LIMIT_BYTES: Final = 1024 * 1024
# Units longer than this are treated as missing, as the decision API rejects them.
MAX_UNIT_LENGTH: Final = 200
# Units whose decision a plan remembers (see _Plan.decided); past this many it starts over.
# About 100 bytes per unit.
MAX_REMEMBERED_UNITS: Final = 100_000
# A request starts listening for its client's disconnect after waiting this long (up to
# twice as long) for its upstream; see _WatchSweep.
DISCONNECT_WATCH_AFTER_S: Final = 0.05

# RFC 9110 section 7.6.1: connection-specific fields a proxy must not forward.
_HOP_BY_HOP: Final = frozenset(
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
# the upstream (routing.upstream), the Rampart key is ours, X-Forwarded-For is rebuilt, and Expect
# was already answered (the body is read before forwarding).
_REQUEST_DROP: Final = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"x-rampart-key",
    b"x-forwarded-for",
    b"expect",
}
# Response headers not passed on: hop-by-hop ones, and Date and Server, which the edge's own
# server (uvicorn) sets; passing the model's as well would send each twice. nginx's
# proxy_pass drops the same two by default.
_RESPONSE_DROP: Final = _HOP_BY_HOP | {b"date", b"server"}
_SHADOW_HEADER: Final = b"X-Rampart-Shadow: 1\r\n"

# What the proxy does with a request header, by name; a name not listed is forwarded as it is.
# One dict lookup per header (the request loop runs for every header of every request).
_DROP: Final = 0
_KEY: Final = 1
_LENGTH: Final = 2
_FORWARDED_FOR: Final = 3
_CONNECTION: Final = 4
_AUTHORIZATION: Final = 5
_COOKIE: Final = 6
_UNIT: Final = 7
_REQUEST_HEADER_ACTIONS: Final[dict[bytes, int]] = {
    **dict.fromkeys(_REQUEST_DROP, _DROP),
    b"x-rampart-key": _KEY,
    b"content-length": _LENGTH,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"connection": _CONNECTION,
    b"authorization": _AUTHORIZATION,
    b"cookie": _COOKIE,
}
_CACHE_HIT_HEADER: Final = (b"x-rampart-cache", b"hit")

_TIMEOUT: Final = "timeout"
_CONNECT: Final = "connect"
_STATUS_5XX: Final = "status_5xx"


@dataclass(slots=True, eq=False)
class _Arm:
    """One variant of one experiment, with everything a request needs precomputed."""

    key: str
    upstream: Upstream
    is_control: bool
    breaker: CircuitBreaker
    metrics: proxy_metrics.ArmMetrics
    response_headers: tuple[tuple[bytes, bytes], ...]

    @property
    def base_url(self) -> str:
        return self.upstream.base_url


# What a decision means to the proxy: the arm that serves the unit, whether the unit is in the
# experiment (its exposure is recorded) and the decision's reason.
_Outcome = tuple[_Arm, bool, str]


@dataclass(slots=True)
class _Plan:
    """An experiment prepared for proxying; rebuilt when the snapshot changes."""

    route: ExperimentRoute
    experiment_id: int
    key: str
    unit_source: str
    unit_attribute: str
    unit_header: bytes
    # _REQUEST_HEADER_ACTIONS, plus _UNIT for the unit header when the unit comes from one
    # (unless that header has an action of its own; then the unit is looked up separately).
    header_actions: dict[bytes, int]
    arms: dict[str, _Arm]
    control: _Arm
    shadows: tuple[_Arm, ...]
    fallback_to_control: bool
    compare_field: str
    cache: PredictionCache | None
    fallback_header: tuple[bytes, bytes]
    # Decisions already made for this route, by unit: an index into ``outcomes``. The route
    # is immutable and decide() pure, so a remembered decision is exact; the plan, and with
    # it this memory, is rebuilt with every new snapshot. decide() (hashing the unit) is the
    # largest single part of the proxy's own work per request, about a quarter of it on the
    # benchmark, and a unit usually sends more than one request. A dict of strings and ints
    # is invisible to the cyclic garbage collector.
    decided: dict[str, int] = field(default_factory=dict)
    outcomes: list[_Outcome] = field(default_factory=list)

    def decide(self, unit: str | None) -> _Outcome:
        """``route.decide(unit)`` as (arm served, in experiment, reason), remembered per unit."""
        if unit is None:
            return self.outcomes[self._index(self.route.decide(None))]
        index = self.decided.get(unit)
        if index is None:
            index = self._index(self.route.decide(unit))
            if len(self.decided) >= MAX_REMEMBERED_UNITS:
                self.decided.clear()
            self.decided[unit] = index
        return self.outcomes[index]

    def _index(self, decision: Decision) -> int:
        outcome = (self.arms[decision.variant], decision.in_experiment, decision.reason)
        try:
            return self.outcomes.index(outcome)
        except ValueError:
            self.outcomes.append(outcome)
            return len(self.outcomes) - 1


@dataclass(slots=True)
class _Attempt:
    """The outcome of one upstream call.

    ``body`` is set when the answer was read whole; ``answer`` when it is still to be
    streamed. ``failure`` is None, ``_STATUS_5XX``, ``_TIMEOUT`` or ``_CONNECT``.
    """

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes | None
    answer: UpstreamAnswer | None
    started: float
    latency_ms: float | None
    failure: str | None


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    expires_at: float
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class PredictionCache:
    """A bounded TTL cache of upstream answers, least recently used evicted first."""

    __slots__ = ("_entries", "max_entries", "ttl_s")

    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[tuple[str, str, str, bytes], CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str, str, bytes], now: float) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(
        self,
        key: tuple[str, str, str, bytes],
        *,
        now: float,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        entries = self._entries
        entries[key] = CachedAnswer(now + self.ttl_s, status, tuple(headers), body)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)


class _DisconnectWatch:
    """Cancels the request's task when the client disconnects during the upstream call.

    The client's disconnect arrives through ``receive()``, so noticing it takes a listener
    task. ``_WatchSweep`` starts that listener (``listen``) only for requests still waiting
    after ``DISCONNECT_WATCH_AFTER_S``; see there why.

    It also remembers the attempt in flight whose observation is still due (``arm_key``,
    ``started``), so that a request abandoned by its client is still counted for its arm.
    """

    __slots__ = ("arm_key", "disconnected", "listener", "receive", "started", "task")

    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None) -> None:
        self.receive: Receive | None = receive
        self.task = task
        self.listener: asyncio.Future[Message] | None = None
        self.disconnected = False
        self.arm_key: str | None = None
        self.started = 0.0

    def listen(self) -> None:
        """Start listening for the client's disconnect, unless the request has finished."""
        if self.receive is None or self.listener is not None:
            return
        self.listener = asyncio.ensure_future(self.receive())
        self.listener.add_done_callback(self._on_message)

    def _on_message(self, listener: asyncio.Future[Message]) -> None:
        if listener.cancelled() or listener.exception() is not None:
            return
        if listener.result().get("type") == "http.disconnect" and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    def stop(self) -> None:
        """Stop watching; call before the last message of the response (see ``__call__``)."""
        # The sweep may hold this watch for another period: let the request's objects go now.
        # A watch without ``receive`` has finished.
        self.receive = None
        self.task = None
        if self.listener is not None:
            self.listener.cancel()

    def begin(self, arm_key: str) -> None:
        """An attempt whose observation belongs to ``arm_key`` starts now."""
        self.arm_key = arm_key
        self.started = time.perf_counter()


class _WatchSweep:
    """Starts the disconnect listeners of requests that have waited a whole period.

    A listener task per request costs about as much CPU as the rest of Rampart's own work on
    a fast answer, and most answers arrive within milliseconds, long before a client gives
    up. So a request only joins a list here (one append), and a timer running while requests
    are in flight starts, every ``period_s``, the listeners of the requests that joined during
    the period before the last one and are still unanswered: a request starts listening after
    waiting between one and two periods. A client that leaves earlier is noticed then, and its
    upstream call cancelled at that point; later departures are noticed at once.
    """

    __slots__ = ("_handle", "_older", "_young", "period_s")

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._young: list[_DisconnectWatch] = []
        self._older: list[_DisconnectWatch] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, watch: _DisconnectWatch) -> None:
        self._young.append(watch)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def _tick(self) -> None:
        for watch in self._older:
            if watch.receive is not None:
                watch.listen()
        self._older, self._young = self._young, []
        self._handle = None
        if self._older:
            self._handle = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._young.clear()
        self._older.clear()


class ProxyApp:
    """The ``/proxy/`` part of the edge (``routing.edge.SubApp``)."""

    def __init__(self, context: EdgeContext) -> None:
        self.context = context
        self.max_body_bytes = int(settings.PROXY_MAX_BODY_BYTES)
        self.connect_timeout_s = float(settings.PROXY_CONNECT_TIMEOUT_S)
        self.read_timeout_s = float(settings.PROXY_READ_TIMEOUT_S)
        self.pool_limit = int(settings.PROXY_POOL_LIMIT)
        self.pool_limit_per_host = int(settings.PROXY_POOL_LIMIT_PER_HOST)
        self.breaker_failures = int(settings.PROXY_BREAKER_FAILURES)
        self.breaker_cooldown_s = float(settings.PROXY_BREAKER_COOLDOWN_S)
        self.shadow_concurrency = int(settings.PROXY_SHADOW_CONCURRENCY)
        self.observations = ObservationAggregator(
            bucket_s=int(settings.OBSERVATION_BUCKET_S),
            flush_interval_s=float(settings.RECORDER_FLUSH_S),
            max_cells=int(settings.RECORDER_MAX_BUFFER),
            batch_rows=int(settings.RECORDER_BATCH_ROWS),
        )
        self.session: aiohttp.ClientSession | None = None
        self.connector: aiohttp.TCPConnector | None = None
        self.client: UpstreamClient | None = None
        self._upstreams: dict[str, Upstream] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self._caches: dict[int, PredictionCache] = {}
        self._plans: dict[str, _Plan] = {}
        self._plans_snapshot: RoutingSnapshot | None = None
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._watches = _WatchSweep(DISCONNECT_WATCH_AFTER_S)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        """Create the pooled upstream client, start the observation flusher and the publisher."""
        loop = self._loop = asyncio.get_running_loop()
        self.connector = aiohttp.TCPConnector(
            limit=self.pool_limit,
            limit_per_host=self.pool_limit_per_host,
            ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(
            connector=self.connector,
            # Bytes pass through untouched: the client asked for any compression it gets.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.client = UpstreamClient(
            self.session,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
        )
        await self.observations.start()
        self._publisher = loop.create_task(self._publish_metrics(), name="rampart-proxy-metrics")

    async def shutdown(self) -> None:
        """Finish mirrored requests, close the client, write the remaining observations."""
        self._watches.close()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        for task in list(self._shadow_tasks):
            task.cancel()
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        proxy_metrics.publish_pending()
        await self.observations.stop()

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(proxy_metrics.PUBLISH_INTERVAL_S)
            proxy_metrics.publish_pending()

    @property
    def shadows_in_flight(self) -> int:
        return len(self._shadow_tasks)

    # ----------------------------------------------------------------- plans

    def _plan(self, snapshot: RoutingSnapshot, experiment_key: str) -> _Plan | None:
        if snapshot is not self._plans_snapshot:
            self._plans = {}
            self._plans_snapshot = snapshot
        plan = self._plans.get(experiment_key)
        if plan is None:
            route = snapshot.route(experiment_key)
            if route is None:
                return None
            plan = self._plans[experiment_key] = self._build_plan(route)
        return plan

    def _breaker(self, upstream: str) -> CircuitBreaker:
        breaker = self.breakers.get(upstream)
        if breaker is None:
            breaker = self.breakers[upstream] = CircuitBreaker(
                upstream,
                failure_threshold=self.breaker_failures,
                cooldown_s=self.breaker_cooldown_s,
                on_change=proxy_metrics.set_breaker_state,
            )
            proxy_metrics.set_breaker_state(upstream, breaker.state)
        return breaker

    def _upstream(self, base_url: str) -> Upstream:
        upstream = self._upstreams.get(base_url)
        if upstream is None:
            upstream = self._upstreams[base_url] = Upstream(base_url)
        return upstream

    def _build_plan(self, route: ExperimentRoute) -> _Plan:
        view = route.view
        key_bytes = view.key.encode()
        arms: dict[str, _Arm] = {}
        for variant in view.variants:
            base_url = variant.upstream_url.rstrip("/")
            arms[variant.key] = _Arm(
                key=variant.key,
                upstream=self._upstream(base_url),
                is_control=variant.is_control,
                breaker=self._breaker(base_url),
                metrics=proxy_metrics.arm_metrics(view.key, variant.key),
                response_headers=(
                    (b"x-rampart-experiment", key_bytes),
                    (b"x-rampart-variant", variant.key.encode()),
                ),
            )
        cache = None
        if view.cache_ttl_s > 0:
            cache = self._caches.get(view.id)
            if (
                cache is None
                or cache.ttl_s != view.cache_ttl_s
                or cache.max_entries != max(1, view.cache_max_entries)
            ):
                cache = PredictionCache(ttl_s=view.cache_ttl_s, max_entries=view.cache_max_entries)
            self._caches[view.id] = cache
        else:
            self._caches.pop(view.id, None)
        control = arms[route.control.key]
        unit_header = view.unit_attribute.lower().encode("latin-1")
        header_actions = _REQUEST_HEADER_ACTIONS
        if view.unit_source == "header" and unit_header not in _REQUEST_HEADER_ACTIONS:
            header_actions = {**_REQUEST_HEADER_ACTIONS, unit_header: _UNIT}
        return _Plan(
            route=route,
            experiment_id=view.id,
            key=view.key,
            unit_source=view.unit_source,
            unit_attribute=view.unit_attribute,
            unit_header=unit_header,
            header_actions=header_actions,
            arms=arms,
            control=control,
            shadows=tuple(arms[shadow.key] for shadow in route.shadows),
            fallback_to_control=view.fallback_to_control,
            compare_field=view.shadow_compare_field,
            cache=cache,
            fallback_header=(b"x-rampart-served-by", control.key.encode()),
        )

    # ----------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        experiment_key, _, _ = path[len(MOUNT_PREFIX) :].partition("/")
        snapshot = self.context.snapshots.current
        plan = self._plan(snapshot, experiment_key) if experiment_key else None

        # One pass over the headers: what to forward, the key, the unit, the body size.
        actions = plan.header_actions if plan is not None else _REQUEST_HEADER_ACTIONS
        headers = scope["headers"]
        forwarded: list[bytes] = []
        header_key: str | None = None
        bearer_key: str | None = None
        unit: str | None = None
        cookie: bytes | None = None
        content_length = -1
        forwarded_for = ""
        connection_tokens: frozenset[bytes] = frozenset()
        for name, value in headers:
            action = actions.get(name)
            if action is None:
                # Forwarded byte for byte: the server's parser has already refused CR and LF.
                forwarded.append(b"%s: %s\r\n" % (name, value))
            elif action == _UNIT:
                unit = value.decode("utf-8", "replace")
                forwarded.append(b"%s: %s\r\n" % (name, value))
            elif action == _KEY:
                header_key = value.decode("latin-1").strip()
            elif action == _LENGTH:
                content_length = int(value) if value.isdigit() else -1
            elif action == _FORWARDED_FOR:
                forwarded_for = value.decode("utf-8", "replace")
            elif action == _CONNECTION:
                connection_tokens = frozenset(token.strip().lower() for token in value.split(b","))
            elif action == _AUTHORIZATION:
                if value[:10].lower() == b"bearer rk_":
                    # A Rampart key is ours; any other Authorization header is the model's.
                    bearer_key = value[7:].decode("latin-1").strip()
                else:
                    forwarded.append(b"%s: %s\r\n" % (name, value))
            elif action == _COOKIE:
                cookie = value
                forwarded.append(b"%s: %s\r\n" % (name, value))
        if plan is not None and plan.unit_source == "header" and actions is _REQUEST_HEADER_ACTIONS:
            # The unit header is one the proxy also reads for itself (say, Cookie).
            unit = _header_text(headers, plan.unit_header)
        if connection_tokens:
            forwarded = [
                line for line in forwarded if line.partition(b":")[0] not in connection_tokens
            ]
        client = scope.get("client")
        if client:
            forwarded_for = f"{forwarded_for}, {client[0]}" if forwarded_for else str(client[0])
        if forwarded_for:
            forwarded.append(b"X-Forwarded-For: %s\r\n" % forwarded_for.encode("utf-8", "replace"))

        if not snapshot.loaded:
            await send_error(send, 503, "not_ready", "the routing snapshot is not loaded yet")
            return
        if self.context.require_key:
            check = snapshot.check_key(header_key or bearer_key, SCOPE_DECIDE)
            if not check.ok:
                proxy_metrics.REJECTED.labels("auth").inc()
                code = "unauthorized" if check.status == 401 else "forbidden"
                await send_error(send, check.status, code, check.error)
                return
        if plan is None:
            proxy_metrics.REJECTED.labels("unknown_experiment").inc()
            await send_error(
                send, 404, "not_found", f"unknown experiment {experiment_key!r}", "experiment"
            )
            return
        if content_length > self.max_body_bytes:
            await self._too_large(send)
            return

        # The request body, whole: it may be sent twice (fallback, shadow) and may hold the unit.
        body = b""
        chunks: list[bytes] | None = None
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                proxy_metrics.CLIENT_DISCONNECTS.inc()
                return
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._too_large(send)
                    return
                if not body:
                    body = chunk
                else:
                    if chunks is None:
                        chunks = [body]
                    chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if chunks is not None:
            body = b"".join(chunks)

        if plan.unit_source != "header":
            unit = _unit_from_request(plan, scope, body, cookie)
        if unit is not None and (not unit or len(unit) > MAX_UNIT_LENGTH or "\x00" in unit):
            # What /v1/decide refuses (a NUL cannot be stored) counts as no unit: control.
            unit = None
        index = plan.decided.get(unit) if unit is not None else None
        if index is not None:
            # A unit the plan remembers has had its exposure recorded already (if it counts).
            arm, in_experiment, reason = plan.outcomes[index]
        else:
            arm, in_experiment, reason = plan.decide(unit)
            if (
                in_experiment
                and unit is not None
                and not self.context.exposures.record(
                    experiment_id=plan.experiment_id, unit_id=unit, variant_key=arm.key
                )
            ):
                # The recorder's buffer was full: try again with the unit's next request.
                plan.decided.pop(unit, None)
        set_route(plan.route.key, arm.key)
        arm.metrics.count_decision(reason)

        method: str = scope["method"]
        # The rest of the path after /proxy/{experiment}, still percent-encoded as received.
        raw_path: bytes | None = scope.get("raw_path")
        full_path = raw_path.decode("latin-1") if raw_path else path
        slash = full_path.find("/", len(MOUNT_PREFIX))
        target = full_path[slash:] if slash >= 0 else ""
        query: bytes = scope["query_string"]
        if query:
            target = f"{target}?{query.decode('latin-1')}"

        cache = plan.cache
        cache_key = None
        if cache is not None:
            cache_key = (arm.key, method, target, hashlib.blake2b(body, digest_size=16).digest())
            hit = cache.get(cache_key, time.monotonic())
            if hit is not None:
                self.observations.count_cache_hit(plan.experiment_id, arm.key)
                arm.metrics.cache_hits.inc()
                arm.metrics.count_response(hit.status)
                await send(
                    {
                        "type": "http.response.start",
                        "status": hit.status,
                        "headers": [*hit.headers, *arm.response_headers, _CACHE_HIT_HEADER],
                    }
                )
                await send({"type": "http.response.body", "body": hit.body})
                return

        control_answer: asyncio.Future[tuple[bytes, bytes] | None] | None = None
        if plan.shadows:
            control_answer = asyncio.get_running_loop().create_future()
            self._mirror(plan, method, target, forwarded, body, control_answer)

        # With the loop given, current_task() skips get_running_loop(), which costs a getpid()
        # system call on Python 3.11.
        watch = _DisconnectWatch(receive, asyncio.current_task(self._loop))
        self._watches.add(watch)
        try:
            await self._forward(
                plan, arm, method, target, forwarded, body, send, watch, cache_key, control_answer
            )
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            # The client went away: the upstream call was cancelled with this task and its
            # connection closed. Nothing is left to answer. The attempt still counts for its
            # arm, with the time until the proxy noticed: a lower bound of its latency, as the
            # upstream had not answered yet (clients give up on slow answers, so leaving these
            # out would flatter a slow arm).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            proxy_metrics.CLIENT_DISCONNECTS.inc()
            if watch.arm_key is not None:
                self.observations.observe(
                    plan.experiment_id,
                    watch.arm_key,
                    (time.perf_counter() - watch.started) * 1000.0,
                    error=False,
                )
        finally:
            if watch.receive is not None:
                watch.stop()
            if control_answer is not None and not control_answer.done():
                control_answer.set_result(None)

    async def _too_large(self, send: Send) -> None:
        proxy_metrics.REJECTED.labels("body_too_large").inc()
        await send_error(
            send, 413, "too_large", f"the request body exceeds {self.max_body_bytes} bytes"
        )

    # ----------------------------------------------------------------- forwarding

    async def _forward(
        self,
        plan: _Plan,
        arm: _Arm,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
        send: Send,
        watch: _DisconnectWatch,
        cache_key: tuple[str, str, str, bytes] | None,
        control_answer: asyncio.Future[tuple[bytes, bytes] | None] | None,
    ) -> None:
        """Call the arm (and control on failure) and send the answer to the client."""
        observations = self.observations
        experiment_id = plan.experiment_id
        fallback = False
        if not arm.is_control:
            if arm.breaker.allow():
                watch.begin(arm.key)
                attempt = await self._attempt(arm, method, target, headers, body)
                if attempt.failure is None:
                    await self._respond(plan, arm, arm, attempt, send, watch, cache_key, None)
                    return
                self._count_failure(arm, attempt.failure)
                watch.arm_key = None
                if not plan.fallback_to_control:
                    observations.observe(experiment_id, arm.key, attempt.latency_ms, error=True)
                    await self._answer_failure(plan, arm, arm, attempt, send, watch)
                    return
                observations.observe(
                    experiment_id, arm.key, attempt.latency_ms, error=True, fallback=True
                )
                if attempt.answer is not None:
                    attempt.answer.close()
            else:
                arm.metrics.errors_breaker_open.inc()
                if not plan.fallback_to_control:
                    observations.observe(experiment_id, arm.key, None, error=True)
                    await self._circuit_open(arm, arm, send, watch)
                    return
                observations.observe(experiment_id, arm.key, None, error=True, fallback=True)
            arm.metrics.fallbacks.inc()
            fallback = True

        control = plan.control
        if not control.breaker.allow():
            control.metrics.errors_breaker_open.inc()
            if not fallback:
                observations.observe(experiment_id, control.key, None, error=True)
            await self._circuit_open(arm, control, send, watch)
            return
        if not fallback:
            watch.begin(control.key)
        attempt = await self._attempt(control, method, target, headers, body)
        if attempt.failure is not None:
            self._count_failure(control, attempt.failure)
            watch.arm_key = None
            if not fallback:
                observations.observe(experiment_id, control.key, attempt.latency_ms, error=True)
            await self._answer_failure(plan, arm, control, attempt, send, watch)
            return
        await self._respond(
            plan,
            arm,
            control,
            attempt,
            send,
            watch,
            None if fallback else cache_key,
            control_answer,
            fallback=fallback,
        )

    async def _attempt(
        self,
        arm: _Arm,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
    ) -> _Attempt:
        """One call to an upstream; reads the answer whole unless it is large or unsized."""
        client = self.client
        if client is None:
            raise RuntimeError("ProxyApp.startup() has not run")
        started = time.perf_counter()
        try:
            answer = await client.request(
                arm.upstream, method, target, headers, body, buffer_limit=BUFFER_LIMIT_BYTES
            )
        except TimeoutError:
            return _failed(_TIMEOUT, started)
        except (aiohttp.ClientError, OSError):
            return _failed(_CONNECT, started)
        status = answer.status
        failure = _STATUS_5XX if status >= 500 else None
        if answer.body is not None:
            latency_ms = (time.perf_counter() - started) * 1000.0
            return _Attempt(status, answer.headers, answer.body, None, started, latency_ms, failure)
        return _Attempt(status, answer.headers, None, answer, started, None, failure)

    def _count_failure(self, arm: _Arm, failure: str) -> None:
        arm.breaker.record_failure()
        metrics = arm.metrics
        if failure == _STATUS_5XX:
            metrics.errors_5xx.inc()
        elif failure == _TIMEOUT:
            metrics.errors_timeout.inc()
        else:
            metrics.errors_connect.inc()

    async def _respond(
        self,
        plan: _Plan,
        assigned: _Arm,
        answering: _Arm,
        attempt: _Attempt,
        send: Send,
        watch: _DisconnectWatch,
        cache_key: tuple[str, str, str, bytes] | None,
        control_answer: asyncio.Future[tuple[bytes, bytes] | None] | None,
        *,
        fallback: bool = False,
    ) -> None:
        """Send a successful (non-5xx) upstream answer to the client and record it."""
        headers = _passed_on(attempt.headers)
        response_headers = [*headers, *assigned.response_headers]
        if fallback:
            response_headers.append(plan.fallback_header)
        status = attempt.status
        body = attempt.body
        if body is None:
            try:
                await self._stream(attempt, response_headers, send, watch)
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                # Headers are already sent, so neither a fallback nor an error status is
                # possible: count the failure and let the server abort the connection, which
                # tells the client the answer is incomplete.
                failure = _TIMEOUT if isinstance(error, TimeoutError) else _CONNECT
                self._count_failure(answering, failure)
                watch.arm_key = None
                assigned.metrics.count_response(status)
                if not fallback:
                    self.observations.observe(
                        plan.experiment_id,
                        assigned.key,
                        (time.perf_counter() - attempt.started) * 1000.0,
                        error=True,
                    )
                logger.warning(
                    "upstream %s failed mid-answer (%s); aborting the response",
                    answering.base_url,
                    failure,
                )
                raise
        else:
            watch.stop()
            await send(
                {"type": "http.response.start", "status": status, "headers": response_headers}
            )
            await send({"type": "http.response.body", "body": body})
        latency_ms = attempt.latency_ms
        watch.arm_key = None
        answering.breaker.record_success()
        assigned.metrics.count_response(status)
        if latency_ms is not None:
            answering_metrics = answering.metrics
            answering_metrics.observe_latency(latency_ms / 1000.0)
        if not fallback:
            self.observations.observe(plan.experiment_id, assigned.key, latency_ms, error=False)
        if body is None:
            return
        if cache_key is not None and plan.cache is not None and 200 <= status < 300:
            plan.cache.put(
                cache_key, now=time.monotonic(), status=status, headers=headers, body=body
            )
        if control_answer is not None and answering.is_control and not control_answer.done():
            control_answer.set_result((body, _content_encoding(headers)))

    async def _stream(
        self,
        attempt: _Attempt,
        response_headers: list[tuple[bytes, bytes]],
        send: Send,
        watch: _DisconnectWatch,
    ) -> None:
        """Relay a large or unsized answer chunk by chunk; sets ``attempt.latency_ms``."""
        answer = attempt.answer
        if answer is None:
            raise RuntimeError("nothing to stream")
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": attempt.status,
                    "headers": response_headers,
                }
            )
            async for chunk in answer.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            attempt.latency_ms = (time.perf_counter() - attempt.started) * 1000.0
            watch.stop()
            await send({"type": "http.response.body", "body": b""})
        finally:
            answer.close()

    async def _answer_failure(
        self,
        plan: _Plan,
        assigned: _Arm,
        answering: _Arm,
        attempt: _Attempt,
        send: Send,
        watch: _DisconnectWatch,
    ) -> None:
        """Pass on a 5xx answer, or send a JSON 502/504 for a timeout or connection failure."""
        if attempt.latency_ms is not None:
            answering.metrics.observe_latency(attempt.latency_ms / 1000.0)
        if attempt.failure == _STATUS_5XX:
            headers = _passed_on(attempt.headers)
            response_headers = [*headers, *assigned.response_headers]
            if answering is not assigned:
                response_headers.append(plan.fallback_header)
            assigned.metrics.count_response(attempt.status)
            if attempt.body is None:
                await self._stream(attempt, response_headers, send, watch)
            else:
                watch.stop()
                await send(
                    {
                        "type": "http.response.start",
                        "status": attempt.status,
                        "headers": response_headers,
                    }
                )
                await send({"type": "http.response.body", "body": attempt.body})
            return
        watch.stop()
        if attempt.failure == _TIMEOUT:
            assigned.metrics.count_response(504)
            await send_error(
                send, 504, "upstream_timeout", f"variant {answering.key!r} did not answer in time"
            )
        else:
            assigned.metrics.count_response(502)
            await send_error(
                send, 502, "upstream_unavailable", f"variant {answering.key!r} is unreachable"
            )

    async def _circuit_open(
        self, assigned: _Arm, answering: _Arm, send: Send, watch: _DisconnectWatch
    ) -> None:
        watch.stop()
        assigned.metrics.count_response(502)
        await send_error(
            send,
            502,
            "upstream_unavailable",
            f"variant {answering.key!r} is failing; its circuit breaker is open",
        )

    # ----------------------------------------------------------------- shadows

    def _mirror(
        self,
        plan: _Plan,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
        control_answer: asyncio.Future[tuple[bytes, bytes] | None],
    ) -> None:
        """Start one background copy per shadow, within the concurrency budget."""
        loop = asyncio.get_running_loop()
        shadow_headers = [*headers, _SHADOW_HEADER]
        for shadow in plan.shadows:
            if len(self._shadow_tasks) >= self.shadow_concurrency:
                shadow.metrics.shadow_saturated.inc()
                continue
            if not shadow.breaker.allow():
                shadow.metrics.shadow_breaker_open.inc()
                continue
            task = loop.create_task(
                self._shadow(plan, shadow, method, target, shadow_headers, body, control_answer)
            )
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self,
        plan: _Plan,
        shadow: _Arm,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
        control_answer: asyncio.Future[tuple[bytes, bytes] | None],
    ) -> None:
        attempt = await self._attempt(shadow, method, target, headers, body)
        shadow_body = attempt.body
        if attempt.answer is not None:
            try:
                shadow_body = await attempt.answer.read()
                attempt.latency_ms = (time.perf_counter() - attempt.started) * 1000.0
            except TimeoutError:
                attempt.failure = _TIMEOUT
            except (aiohttp.ClientError, OSError):
                attempt.failure = _CONNECT
            finally:
                attempt.answer.close()
        if attempt.latency_ms is None:
            attempt.latency_ms = (time.perf_counter() - attempt.started) * 1000.0
        failed = attempt.failure is not None
        if failed:
            self._count_failure(shadow, attempt.failure or _CONNECT)
            shadow.metrics.shadow_error.inc()
        else:
            shadow.breaker.record_success()
            shadow.metrics.shadow_ok.inc()
        shadow.metrics.observe_latency(attempt.latency_ms / 1000.0)
        self.observations.observe(
            plan.experiment_id, shadow.key, attempt.latency_ms, error=failed, is_shadow=True
        )
        if failed or shadow_body is None:
            return
        answer = await control_answer
        if answer is None:
            return
        control_body, control_encoding = answer
        shadow_encoding = _content_encoding(attempt.headers)
        disagreed, abs_diff = compare_answers(
            control_body,
            shadow_body,
            field=plan.compare_field,
            control_encoding=control_encoding,
            shadow_encoding=shadow_encoding,
        )
        self.observations.compare(
            plan.experiment_id, shadow.key, disagreed=disagreed, abs_diff=abs_diff
        )


def _failed(failure: str, started: float) -> _Attempt:
    return _Attempt(0, (), None, None, started, (time.perf_counter() - started) * 1000.0, failure)


def _passed_on(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream's response headers without those the proxy must not pass on."""
    return [header for header in headers if header[0].lower() not in _RESPONSE_DROP]


def _header_text(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The last value of a (lower-case) header as text, or None."""
    found = None
    for header, value in headers:
        if header == name:
            found = value
    return None if found is None else found.decode("utf-8", "replace")


def _content_encoding(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-encoding":
            return value.strip().lower()
    return b""


def _unit_from_request(plan: _Plan, scope: Scope, body: bytes, cookie: bytes | None) -> str | None:
    """The unit id from a cookie, a JSON body field or a query parameter (header: inline)."""
    source = plan.unit_source
    name = plan.unit_attribute
    if source == "query":
        query: bytes = scope["query_string"]
        if not query:
            return None
        for key, value in parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=False):
            if key == name:
                return value
        return None
    if source == "cookie":
        if cookie is None:
            return None
        for pair in cookie.decode("utf-8", "replace").split(";"):
            key, _, value = pair.strip().partition("=")
            if key == name:
                return value.strip().strip('"') or None
        return None
    if source == "json_field":
        if not body:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        field_value: Any = data.get(name)
        if isinstance(field_value, str):
            return field_value
        if isinstance(field_value, int) and not isinstance(field_value, bool):
            return str(field_value)
        return None
    return None


def compare_answers(
    control_body: bytes,
    shadow_body: bytes,
    *,
    field: str = "",
    control_encoding: bytes = b"",
    shadow_encoding: bytes = b"",
) -> tuple[bool, float | None]:
    """Whether a shadow's answer disagrees with control's, and |difference| of a numeric field.

    With ``field`` set and both bodies JSON objects (after undoing gzip/deflate), the field's
    values are compared, and for two numbers their absolute difference is returned. Otherwise
    the bodies are compared byte for byte and the difference is None.
    """
    if field:
        control_data = _json_object(control_body, control_encoding)
        shadow_data = _json_object(shadow_body, shadow_encoding)
        if control_data is not None and shadow_data is not None:
            control_value = control_data.get(field)
            shadow_value = shadow_data.get(field)
            if _is_number(control_value) and _is_number(shadow_value):
                difference = abs(float(shadow_value) - float(control_value))
                return difference != 0.0, difference
            return control_value != shadow_value, None
    return control_body != shadow_body, None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_object(body: bytes, encoding: bytes) -> dict[str, Any] | None:
    try:
        if encoding in (b"gzip", b"x-gzip"):
            body = zlib.decompress(body, wbits=31)
        elif encoding == b"deflate":
            body = zlib.decompress(body)
        elif encoding:
            return None
        data = orjson.loads(body)
    except (zlib.error, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
