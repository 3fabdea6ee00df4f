"""Shadow variants: a mirrored copy of each forwarded request, compared with control's answer."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from routing.observe.observations import ObservationAggregator
from routing.proxy.attempt import CONNECT, TIMEOUT, call_upstream, count_failure
from routing.proxy.compare import ControlAnswer, compare_answers
from routing.proxy.headers import SHADOW_HEADER, content_encoding
from routing.proxy.plan import Arm, Plan
from routing.proxy.predictions import ProxyPredictions, Ticket
from routing.proxy.upstream import UpstreamClient

# (user, shadow) pairs (routing.observe.shadow_pairs) taken, per process. Past the cap new ones
# give no pair: which users count never depends on their answers, so the test stays valid.
MAX_PAIRED_USERS = 200_000


class Shadows:
    """Sends the mirrored copies in the background, at most ``concurrency`` at a time."""

    def __init__(
        self,
        observations: ObservationAggregator,
        *,
        concurrency: int,
        max_paired_users: int = MAX_PAIRED_USERS,
    ) -> None:
        self.observations = observations
        self.concurrency = concurrency
        self.max_paired_users = max_paired_users
        # (experiment id, shadow key, unit) of every user whose first request mirrored to that
        # shadow this process has seen.
        self._paired_users: set[tuple[int, str, str]] = set()
        # Set by ProxyApp.startup(), with the session it creates.
        self.client: UpstreamClient | None = None
        # Set by ProxyApp: records shadows' predictions of sampled requests (quality on).
        self.predictions: ProxyPredictions | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel the copies still in flight and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def mirror(
        self,
        plan: Plan,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
        control_answer: ControlAnswer,
        unit: str | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        """Start one background copy per shadow, within the concurrency budget.

        The first mirrored request of each user (``unit``) to a shadow is the user's pair with
        that shadow for the paired statistics; the choice is made here, before any answer
        exists (and before the concurrency budget or the breaker is looked at), and claimed
        across processes by the flush (``routing.observe.pair_claims``).
        """
        loop = asyncio.get_running_loop()
        shadow_headers = [*headers, SHADOW_HEADER]
        experiment_id = plan.experiment_id
        paired = self._paired_users
        for shadow in plan.shadows:
            pair_unit = None
            if unit is not None:
                user = (experiment_id, shadow.key, unit)
                if user not in paired and len(paired) < self.max_paired_users:
                    paired.add(user)
                    pair_unit = unit
                    self.observations.claim_pair(experiment_id, shadow.key, unit)
            if len(self._tasks) >= self.concurrency:
                shadow.metrics.shadow_saturated.inc()
                continue
            if not shadow.breaker.allow():
                shadow.metrics.shadow_breaker_open.inc()
                continue
            task = loop.create_task(
                self._shadow(
                    plan,
                    shadow,
                    method,
                    target,
                    shadow_headers,
                    body,
                    control_answer,
                    pair_unit,
                    ticket,
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _shadow(
        self,
        plan: Plan,
        shadow: Arm,
        method: str,
        target: str,
        headers: list[bytes],
        body: bytes,
        control_answer: ControlAnswer,
        pair_unit: str | None,
        ticket: Ticket | None,
    ) -> None:
        attempt = await call_upstream(self.client, shadow, method, target, headers, body)
        shadow_body = attempt.body
        if attempt.answer is not None:
            try:
                shadow_body = await attempt.answer.read()
                attempt.latency_ms = (time.perf_counter() - attempt.started) * 1000.0
            except TimeoutError:
                attempt.failure = TIMEOUT
            except (aiohttp.ClientError, OSError):
                attempt.failure = CONNECT
            finally:
                attempt.answer.close()
        if attempt.latency_ms is None:
            attempt.latency_ms = (time.perf_counter() - attempt.started) * 1000.0
        failed = attempt.failure is not None
        if failed:
            count_failure(shadow, attempt.failure or CONNECT)
            shadow.metrics.shadow_error.inc()
        else:
            shadow.breaker.record_success()
            shadow.metrics.shadow_ok.inc()
        shadow.metrics.observe_latency(attempt.latency_ms / 1000.0)
        self.observations.observe(
            plan.experiment_id, shadow.key, attempt.latency_ms, error=failed, is_shadow=True
        )
        if failed or shadow_body is None:
            if pair_unit is not None:
                # The user's pair still counts: a failed answer differs from control's.
                failed_against = await control_answer
                if failed_against is not None:
                    self.observations.pair_failure(
                        plan.experiment_id,
                        shadow.key,
                        control_ms=failed_against[2],
                        shadow_ms=attempt.latency_ms,
                        pair_unit=pair_unit,
                    )
            return
        answer = await control_answer
        if answer is None:
            return
        control_body, control_encoding, control_ms = answer
        if ticket is not None and self.predictions is not None:
            self.predictions.shadow_answer(
                ticket, shadow.key, attempt.status, shadow_body, attempt.headers
            )
        shadow_encoding = content_encoding(attempt.headers)
        disagreed, abs_diff = compare_answers(
            control_body,
            shadow_body,
            field=plan.compare_field,
            control_encoding=control_encoding,
            shadow_encoding=shadow_encoding,
        )
        self.observations.compare(
            plan.experiment_id,
            shadow.key,
            disagreed=disagreed,
            abs_diff=abs_diff,
            control_ms=control_ms,
            shadow_ms=attempt.latency_ms,
            pair_unit=pair_unit,
        )
