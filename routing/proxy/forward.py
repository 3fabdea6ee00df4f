"""The proxy's forwarding: call the assigned arm (and control on failure), send the answer.

``Forwarding`` holds the half of ``ProxyApp`` (``routing.proxy.app``) that runs once the
request is read and its arm chosen: one call per arm within one deadline, the fallback to
control, passing on or streaming the answer, and recording it (metrics, observations, the
prediction cache, the answer shadows compare with).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from routing.edge.asgi import Send, send_error
from routing.observe.observations import ObservationAggregator
from routing.observe.unit_outcomes import UnitTally
from routing.proxy.attempt import (
    CONNECT,
    STATUS_5XX,
    TIMEOUT,
    Attempt,
    call_upstream,
    count_failure,
)
from routing.proxy.compare import ControlAnswer
from routing.proxy.headers import content_encoding, passed_on
from routing.proxy.plan import Arm, Plan
from routing.proxy.predictions import ProxyPredictions, Ticket
from routing.proxy.streaming import StreamMeter, answer_record, is_event_stream, is_llm_target
from routing.proxy.upstream import UpstreamClient
from routing.proxy.watch import DisconnectWatch

logger = logging.getLogger(__name__)


class Forwarding:
    """Forwarding for ``ProxyApp``, which sets these attributes up (``__init__``, ``startup``)."""

    client: UpstreamClient | None
    observations: ObservationAggregator
    predictions: ProxyPredictions
    deadline_s: float
    _loop: asyncio.AbstractEventLoop | None

    async def _forward(
        self,
        plan: Plan,
        arm: Arm,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
        send: Send,
        watch: DisconnectWatch,
        cache_key: tuple[str, str, str, bytes] | None,
        control_answer: ControlAnswer | None,
        tally: UnitTally | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        """Call the arm (and control on failure) and send the answer to the client.

        Both calls share one deadline, PROXY_DEADLINE_S from now: the retry on control gets
        what the arm left, so the client has its answer (or 504) by then.
        """
        observations = self.observations
        experiment_id = plan.experiment_id
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + self.deadline_s
        fallback = False
        # Completion endpoints (token usage, cost): two substring tests on other paths.
        llm = ("/completions" in target or "/responses" in target) and is_llm_target(target)
        if not arm.is_control:
            if arm.breaker.allow():
                watch.begin(arm.key)
                attempt = await call_upstream(
                    self.client, arm, method, target, headers, body, deadline
                )
                if attempt.failure is None:
                    await self._respond(
                        plan,
                        arm,
                        arm,
                        attempt,
                        send,
                        watch,
                        cache_key,
                        None,
                        tally=tally,
                        ticket=ticket,
                        llm=llm,
                    )
                    return
                count_failure(arm, attempt.failure)
                watch.arm_key = None
                if not plan.fallback_to_control:
                    observations.observe(
                        experiment_id, arm.key, attempt.latency_ms, error=True, unit=tally
                    )
                    await self._answer_failure(plan, arm, arm, attempt, send, watch, ticket)
                    return
                observations.observe(
                    experiment_id,
                    arm.key,
                    attempt.latency_ms,
                    error=True,
                    fallback=True,
                    unit=tally,
                )
                if attempt.answer is not None:
                    attempt.answer.close()
            else:
                arm.metrics.errors_breaker_open.inc()
                if not plan.fallback_to_control:
                    observations.observe(experiment_id, arm.key, None, error=True, unit=tally)
                    await self._circuit_open(arm, arm, send, watch, ticket)
                    return
                observations.observe(
                    experiment_id, arm.key, None, error=True, fallback=True, unit=tally
                )
            arm.metrics.fallbacks.inc()
            fallback = True

        control = plan.control
        if fallback and loop.time() >= deadline:
            # The arm used up the request's time: control is not tried, nor blamed.
            watch.stop()
            arm.metrics.count_response(504)
            await send_error(
                send,
                504,
                "upstream_timeout",
                f"variant {arm.key!r} failed and no time was left to ask control",
                headers=() if ticket is None else (ticket.header,),
            )
            return
        if not control.breaker.allow():
            control.metrics.errors_breaker_open.inc()
            if not fallback:
                observations.observe(experiment_id, control.key, None, error=True, unit=tally)
            await self._circuit_open(arm, control, send, watch, ticket)
            return
        if not fallback:
            watch.begin(control.key)
        attempt = await call_upstream(self.client, control, method, target, headers, body, deadline)
        if attempt.failure is not None:
            count_failure(control, attempt.failure)
            watch.arm_key = None
            if not fallback:
                observations.observe(
                    experiment_id, control.key, attempt.latency_ms, error=True, unit=tally
                )
            await self._answer_failure(plan, arm, control, attempt, send, watch, ticket)
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
            tally=tally,
            ticket=ticket,
            llm=llm,
        )

    async def _respond(
        self,
        plan: Plan,
        assigned: Arm,
        answering: Arm,
        attempt: Attempt,
        send: Send,
        watch: DisconnectWatch,
        cache_key: tuple[str, str, str, bytes] | None,
        control_answer: ControlAnswer | None,
        *,
        fallback: bool = False,
        tally: UnitTally | None = None,
        ticket: Ticket | None = None,
        llm: bool = False,
    ) -> None:
        """Send a successful (non-5xx) upstream answer to the client and record it."""
        headers = passed_on(attempt.headers)
        response_headers = [*headers, *assigned.response_headers]
        if fallback:
            response_headers.append(plan.fallback_header)
        status = attempt.status
        body = attempt.body
        if ticket is not None:
            self.predictions.answer(
                ticket, assigned.key, status, body, headers, response_headers, fallback=fallback
            )
        meter = None
        if body is None:
            meter = StreamMeter(attempt.started, sse=is_event_stream(attempt.headers), llm=llm)
            try:
                await self._stream(attempt, response_headers, send, watch, meter)
            except asyncio.CancelledError:
                if watch.disconnected and not fallback:
                    # The client left mid-stream (clients often hang up at the last event):
                    # what was measured until then still describes the arm.
                    duration_ms = (time.perf_counter() - attempt.started) * 1000.0
                    record = meter.record(duration_ms, assigned.prices)
                    self.observations.observe_llm(plan.experiment_id, assigned.key, record, tally)
                raise
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                # Headers are already sent, so neither a fallback nor an error status is
                # possible: count the failure and let the server abort the connection, which
                # tells the client the answer is incomplete.
                failure = TIMEOUT if isinstance(error, TimeoutError) else CONNECT
                count_failure(answering, failure)
                watch.arm_key = None
                assigned.metrics.count_response(status)
                if not fallback:
                    self.observations.observe(
                        plan.experiment_id,
                        assigned.key,
                        (time.perf_counter() - attempt.started) * 1000.0,
                        error=True,
                        unit=tally,
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
            self.observations.observe(
                plan.experiment_id, assigned.key, latency_ms, error=False, unit=tally
            )
            if meter is not None or llm:
                record = answer_record(meter, attempt, assigned.prices)
                self.observations.observe_llm(plan.experiment_id, assigned.key, record, tally)
        if body is None:
            return
        if cache_key is not None and plan.cache is not None and 200 <= status < 300:
            plan.cache.put(
                cache_key, now=time.monotonic(), status=status, headers=headers, body=body
            )
        if control_answer is not None and answering.is_control and not control_answer.done():
            control_answer.set_result((body, content_encoding(headers), latency_ms))

    async def _stream(
        self,
        attempt: Attempt,
        response_headers: list[tuple[bytes, bytes]],
        send: Send,
        watch: DisconnectWatch,
        meter: StreamMeter | None = None,
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
                if meter is not None:
                    meter.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            attempt.latency_ms = (time.perf_counter() - attempt.started) * 1000.0
            watch.stop()
            await send({"type": "http.response.body", "body": b""})
        finally:
            answer.close()

    async def _answer_failure(
        self,
        plan: Plan,
        assigned: Arm,
        answering: Arm,
        attempt: Attempt,
        send: Send,
        watch: DisconnectWatch,
        ticket: Ticket | None = None,
    ) -> None:
        """Pass on a 5xx answer, or send a JSON 502/504 for a timeout or connection failure.

        With quality tracking on, the answer carries the request id (``ticket.header``) too.
        """
        extra = () if ticket is None else (ticket.header,)
        if attempt.latency_ms is not None:
            answering.metrics.observe_latency(attempt.latency_ms / 1000.0)
        if attempt.failure == STATUS_5XX:
            headers = passed_on(attempt.headers)
            response_headers = [*headers, *assigned.response_headers]
            if answering is not assigned:
                response_headers.append(plan.fallback_header)
            response_headers.extend(extra)
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
        if attempt.failure == TIMEOUT:
            assigned.metrics.count_response(504)
            await send_error(
                send,
                504,
                "upstream_timeout",
                f"variant {answering.key!r} did not answer in time",
                headers=extra,
            )
        else:
            assigned.metrics.count_response(502)
            await send_error(
                send,
                502,
                "upstream_unavailable",
                f"variant {answering.key!r} is unreachable",
                headers=extra,
            )

    async def _circuit_open(
        self,
        assigned: Arm,
        answering: Arm,
        send: Send,
        watch: DisconnectWatch,
        ticket: Ticket | None = None,
    ) -> None:
        watch.stop()
        assigned.metrics.count_response(502)
        await send_error(
            send,
            502,
            "upstream_unavailable",
            f"variant {answering.key!r} is failing; its circuit breaker is open",
            headers=() if ticket is None else (ticket.header,),
        )
