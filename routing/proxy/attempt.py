"""One call to an upstream and its outcome: what the proxy forwards, answers and counts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp

from routing.proxy.plan import Arm
from routing.proxy.upstream import UpstreamAnswer, UpstreamClient

# Answers up to this size (with a Content-Length) are read whole and sent in one message.
BUFFER_LIMIT_BYTES: Final = 1024 * 1024

TIMEOUT: Final = "timeout"
CONNECT: Final = "connect"
STATUS_5XX: Final = "status_5xx"


@dataclass(slots=True)
class Attempt:
    """The outcome of one upstream call.

    ``body`` is set when the answer was read whole; ``answer`` when it is still to be
    streamed. ``failure`` is None, ``STATUS_5XX``, ``TIMEOUT`` or ``CONNECT``.
    """

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes | None
    answer: UpstreamAnswer | None
    started: float
    latency_ms: float | None
    failure: str | None


def failed(failure: str, started: float) -> Attempt:
    return Attempt(0, (), None, None, started, (time.perf_counter() - started) * 1000.0, failure)


async def call_upstream(
    client: UpstreamClient | None,
    arm: Arm,
    method: str,
    target: str,
    headers: list[bytes],
    body: bytes,
    deadline: float | None = None,
) -> Attempt:
    """One call to an upstream; reads the answer whole unless it is large or unsized.

    ``deadline`` (event loop time) ends the call with a ``TIMEOUT`` at the latest then.
    """
    if client is None:
        raise RuntimeError("ProxyApp.startup() has not run")
    started = time.perf_counter()
    try:
        answer = await client.request(
            arm.upstream,
            method,
            target,
            headers,
            body,
            buffer_limit=BUFFER_LIMIT_BYTES,
            deadline=deadline,
        )
    except TimeoutError:
        return failed(TIMEOUT, started)
    except (aiohttp.ClientError, OSError):
        return failed(CONNECT, started)
    status = answer.status
    failure = STATUS_5XX if status >= 500 else None
    if answer.body is not None:
        latency_ms = (time.perf_counter() - started) * 1000.0
        return Attempt(status, answer.headers, answer.body, None, started, latency_ms, failure)
    return Attempt(status, answer.headers, None, answer, started, None, failure)


def count_failure(arm: Arm, failure: str) -> None:
    """Count a failed call against its arm: the breaker, and the error metric of its kind."""
    arm.breaker.record_failure()
    metrics = arm.metrics
    if failure == STATUS_5XX:
        metrics.errors_5xx.inc()
    elif failure == TIMEOUT:
        metrics.errors_timeout.inc()
    else:
        metrics.errors_connect.inc()
