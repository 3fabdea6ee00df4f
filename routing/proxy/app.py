"""The ``/proxy/`` ASGI app: one request from arrival to answer (see ``routing.proxy``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Final

import aiohttp
from django.conf import settings

from routing.edge.asgi import (
    Receive,
    Scope,
    Send,
    auth_error,
    not_ready_error,
    send_error,
    send_problem,
)
from routing.edge.context import SCOPE_DECIDE, EdgeContext, resolve_route
from routing.edge.inputs import MAX_UNIT_LENGTH
from routing.edge.problems import EdgeError
from routing.logcontext import set_route
from routing.observe.inputs import InputRecorder
from routing.observe.observations import ObservationAggregator
from routing.observe.unit_outcomes import UnitOutcomeBook
from routing.proxy import metrics as proxy_metrics
from routing.proxy.breaker import CircuitBreaker
from routing.proxy.compare import ControlAnswer
from routing.proxy.forward import Forwarding
from routing.proxy.headers import (
    ACTION_AUTHORIZATION,
    ACTION_CONNECTION,
    ACTION_COOKIE,
    ACTION_FORWARDED_FOR,
    ACTION_KEY,
    ACTION_LENGTH,
    ACTION_UNIT,
    CACHE_HIT_HEADER,
    REQUEST_HEADER_ACTIONS,
    header_text,
    unit_encoding_error,
    unit_from_request,
)
from routing.proxy.plan import PlanBook
from routing.proxy.predictions import ProxyPredictions
from routing.proxy.shadow import Shadows
from routing.proxy.upstream import UpstreamClient
from routing.proxy.watch import DISCONNECT_WATCH_AFTER_S, DisconnectWatch, WatchSweep

logger = logging.getLogger(__name__)

MOUNT_PREFIX: Final = "/proxy/"


class ProxyApp(Forwarding):
    """The ``/proxy/`` part of the edge (``routing.edge.context.SubApp``).

    Arrival, checks, assignment, cache and shadows are here; the call to the arm (and to
    control on failure) and the answer are ``Forwarding``'s (``routing.proxy.forward``).
    """

    def __init__(self, context: EdgeContext) -> None:
        self.context = context
        self.max_body_bytes = int(settings.PROXY_MAX_BODY_BYTES)
        self.connect_timeout_s = float(settings.PROXY_CONNECT_TIMEOUT_S)
        self.read_timeout_s = float(settings.PROXY_READ_TIMEOUT_S)
        self.deadline_s = float(settings.PROXY_DEADLINE_S)
        self.pool_limit = int(settings.PROXY_POOL_LIMIT)
        self.pool_limit_per_host = int(settings.PROXY_POOL_LIMIT_PER_HOST)
        # Per-user outcome windows of the rate guardrails, flushed with the observations.
        self.units = UnitOutcomeBook(
            fast_s=float(settings.RATE_WINDOW_FAST_S),
            slow_s=float(settings.RATE_WINDOW_SLOW_S),
        )
        self.observations = ObservationAggregator(
            bucket_s=int(settings.OBSERVATION_BUCKET_S),
            flush_interval_s=float(settings.RECORDER_FLUSH_S),
            max_cells=int(settings.RECORDER_MAX_BUFFER),
            batch_rows=int(settings.RECORDER_BATCH_ROWS),
            backoff_base_s=float(settings.RECORDER_BACKOFF_BASE_S),
            backoff_max_s=float(settings.RECORDER_BACKOFF_MAX_S),
            failure_log_s=float(settings.RECORDER_FAILURE_LOG_S),
            units=self.units,
        )
        self.session: aiohttp.ClientSession | None = None
        self.connector: aiohttp.TCPConnector | None = None
        self.client: UpstreamClient | None = None
        self.plans = PlanBook(
            breaker_failures=int(settings.PROXY_BREAKER_FAILURES),
            breaker_cooldown_s=float(settings.PROXY_BREAKER_COOLDOWN_S),
        )
        self.shadows = Shadows(
            self.observations, concurrency=int(settings.PROXY_SHADOW_CONCURRENCY)
        )
        self._watches = WatchSweep(DISCONNECT_WATCH_AFTER_S)
        self.predictions = ProxyPredictions()
        self.shadows.predictions = self.predictions
        self.inputs = InputRecorder()
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
        # The session owns the pool; requests use its connections (routing.proxy.upstream), so
        # its per-request settings (decompression, cookies) never apply.
        self.session = aiohttp.ClientSession(connector=self.connector)
        self.client = UpstreamClient(
            self.session,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
        )
        self.shadows.client = self.client
        await self.observations.start()
        await self.predictions.start()
        await self.inputs.start()
        self._publisher = loop.create_task(self._publish_metrics(), name="rampart-proxy-metrics")

    async def shutdown(self) -> None:
        """Finish mirrored requests, close the client, write the remaining observations."""
        self._watches.close()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        await self.shadows.close()
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        proxy_metrics.publish_pending()
        await self.observations.stop()
        await self.predictions.stop()
        await self.inputs.stop()

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(proxy_metrics.PUBLISH_INTERVAL_S)
            proxy_metrics.publish_pending()

    @property
    def shadows_in_flight(self) -> int:
        return self.shadows.in_flight

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """Circuit breakers by upstream base URL."""
        return self.plans.breakers

    # ----------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        experiment_key, _, _ = path[len(MOUNT_PREFIX) :].partition("/")
        snapshot = self.context.snapshots.current
        plan = self.plans.get(snapshot, experiment_key) if experiment_key else None

        # One pass over the headers: what to forward, the key, the unit, the body size.
        actions = plan.header_actions if plan is not None else REQUEST_HEADER_ACTIONS
        headers = scope["headers"]
        forwarded: list[bytes] = []
        header_key: str | None = None
        bearer_key: str | None = None
        unit: str | None = None
        unit_error: EdgeError | None = None
        cookie: bytes | None = None
        content_length = -1
        forwarded_for = ""
        connection_tokens: frozenset[bytes] = frozenset()
        for name, value in headers:
            action = actions.get(name)
            if action is None:
                # Forwarded byte for byte: the server's parser has already refused CR and LF.
                forwarded.append(b"%s: %s\r\n" % (name, value))
            elif action == ACTION_UNIT:
                try:
                    unit = value.decode()
                except UnicodeDecodeError:
                    unit_error = unit_encoding_error("header", name.decode("latin-1"))
                forwarded.append(b"%s: %s\r\n" % (name, value))
            elif action == ACTION_KEY:
                header_key = value.decode("latin-1").strip()
            elif action == ACTION_LENGTH:
                content_length = int(value) if value.isdigit() else -1
            elif action == ACTION_FORWARDED_FOR:
                forwarded_for = value.decode("utf-8", "replace")
            elif action == ACTION_CONNECTION:
                connection_tokens = frozenset(token.strip().lower() for token in value.split(b","))
            elif action == ACTION_AUTHORIZATION:
                if value[:10].lower() == b"bearer rk_":
                    # A Rampart key is ours; any other Authorization header is the model's.
                    bearer_key = value[7:].decode("latin-1").strip()
                else:
                    forwarded.append(b"%s: %s\r\n" % (name, value))
            elif action == ACTION_COOKIE:
                cookie = value
                forwarded.append(b"%s: %s\r\n" % (name, value))
        if plan is not None and plan.unit_source == "header" and actions is REQUEST_HEADER_ACTIONS:
            # The unit header is one the proxy also reads for itself (say, Cookie).
            try:
                unit = header_text(headers, plan.unit_header)
            except EdgeError as error:
                unit_error = error
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
            await send_problem(send, not_ready_error())
            return
        if self.context.require_key:
            check = snapshot.check_key(header_key or bearer_key, SCOPE_DECIDE)
            if not check.ok:
                proxy_metrics.REJECTED.labels("auth").inc()
                await send_problem(send, auth_error(check))
                return
        if plan is None:
            await self._unknown_experiment(scope, receive, send, experiment_key)
            return
        if content_length > self.max_body_bytes:
            await self._too_large(send)
            return
        if unit_error is not None:
            proxy_metrics.REJECTED.labels("invalid_unit").inc()
            await send_problem(send, unit_error)
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
            try:
                unit = unit_from_request(plan.unit_source, plan.unit_attribute, scope, body, cookie)
            except EdgeError as error:
                proxy_metrics.REJECTED.labels("invalid_unit").inc()
                await send_problem(send, error)
                return
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
        tally = None
        if in_experiment and unit is not None and plan.shares is not None:
            tally = self.units.tally(plan.experiment_id, unit, arm.key, plan.shares)
        quality = plan.quality
        ticket = None if quality is None else quality.ticket(headers, unit, in_experiment)
        if plan.inputs is not None:
            plan.inputs.capture(body, unit, self.inputs)

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
                hit_headers = [*hit.headers, *arm.response_headers, CACHE_HIT_HEADER]
                if ticket is not None:
                    self.predictions.answer(
                        ticket, arm.key, hit.status, hit.body, hit.headers, hit_headers
                    )
                await send(
                    {"type": "http.response.start", "status": hit.status, "headers": hit_headers}
                )
                await send({"type": "http.response.body", "body": hit.body})
                return

        control_answer: ControlAnswer | None = None
        if plan.shadows:
            control_answer = asyncio.get_running_loop().create_future()
            self.shadows.mirror(plan, method, target, forwarded, body, control_answer, unit, ticket)

        # With the loop given, current_task() skips get_running_loop(), which costs a getpid()
        # system call on Python 3.11.
        watch = DisconnectWatch(receive, asyncio.current_task(self._loop))
        self._watches.add(watch)
        try:
            await self._forward(
                plan,
                arm,
                method,
                target,
                forwarded,
                body,
                send,
                watch,
                cache_key,
                control_answer,
                tally,
                ticket,
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
                    unit=tally,
                )
        finally:
            if watch.receive is not None:
                watch.stop()
            if control_answer is not None and not control_answer.done():
                control_answer.set_result(None)

    async def _unknown_experiment(
        self, scope: Scope, receive: Receive, send: Send, experiment_key: str
    ) -> None:
        """A key the snapshot lacks: served once the version check finds it, else refused.

        ``routing.edge.context.resolve_route`` says when: 404 ``experiment_not_found``, or 503
        ``experiment_not_on_edge`` with ``Retry-After`` while the config version cannot be
        confirmed. Nothing is forwarded in either case.
        """
        try:
            if not experiment_key:
                raise EdgeError(
                    404,
                    "experiment_not_found",
                    "the path names no experiment: use /proxy/{experiment}/{path}",
                    "experiment",
                )
            await resolve_route(self.context, experiment_key)
        except EdgeError as error:
            proxy_metrics.REJECTED.labels("unknown_experiment").inc()
            await send_problem(send, error)
            return
        # The version check installed a snapshot that holds the experiment: serve it.
        await self(scope, receive, send)

    async def _too_large(self, send: Send) -> None:
        proxy_metrics.REJECTED.labels("body_too_large").inc()
        await send_error(
            send,
            413,
            "payload_too_large",
            f"the request body exceeds {self.max_body_bytes} bytes",
        )
