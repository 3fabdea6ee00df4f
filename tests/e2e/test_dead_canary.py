"""End to end: a canary that answers 500 to every request is rolled back within two intervals.

Processes: the edge (uvicorn), a Celery worker and Celery beat as children on the test
database and broker; in this process two model servers (control never fails, the canary
always answers 500), a Slack stand-in and a traffic generator sending every request through
the proxy, each from a new user. The error-rate guardrail takes the user as the unit
(`analysis.rate_guardrails`): a user's fast outcome is known RATE_WINDOW_FAST_S after its
first request and flushed by the edge within RECORDER_FLUSH_S, so the first analysis after
that bets on the canary's first users. The test measures the time from the canary's first
request to the rollback's audit entry, in analysis intervals.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from analysis.models import AlertOutbox
from experiments import services
from experiments.models import AuditEntry, Experiment
from tests.processes import (
    running_platform,
    running_servers,
    sending,
    wait_until,
)
from tests.slack_sink import SlackSink

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

INTERVAL_S = 3.0
CHILD_ENV = {
    "ANALYSIS_INTERVAL_S": str(INTERVAL_S),
    "SNAPSHOT_REFRESH_S": "0.2",
    "RECORDER_FLUSH_S": "0.2",
    "OBSERVATION_BUCKET_S": "1",
    "RATE_WINDOW_FAST_S": "1",
    "RATE_WINDOW_SLOW_S": "10",
    "EDGE_REQUIRE_KEY": "true",
    "ALERT_BACKOFF_BASE_S": "0.2",
    "ALERT_BACKOFF_MAX_S": "1",
}
DEADLINE_S = 60.0
CONCURRENCY = 8
# Paced, not as fast as possible: an unpaced generator saturates both cores of a CI machine and
# starves the worker and beat whose timing this test measures. 200 requests/s still brings the
# canary several new users per second.
REQUESTS_PER_S = 200.0
PACE_S = CONCURRENCY / REQUESTS_PER_S


class Traffic:
    """New users, one request each, through the proxy; records when the canary first served."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.stop = threading.Event()
        self.first_canary_request: float | None = None
        self.requests = 0
        self.canary_requests_after: list[float] = []

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.url, headers={"X-Rampart-Key": self.key}, timeout=10
        ) as client:

            async def loop() -> None:
                while not self.stop.is_set():
                    sent = time.time()
                    try:
                        response = await client.post(
                            "/proxy/dead/predict",
                            headers={"X-Rampart-Unit": uuid.uuid4().hex},
                            content=b'{"features": [1, 2, 3]}',
                        )
                    except httpx.HTTPError:
                        await asyncio.sleep(PACE_S)
                        continue
                    self.requests += 1
                    if response.headers.get("x-rampart-variant") == "v2":
                        if self.first_canary_request is None:
                            self.first_canary_request = sent
                        self.canary_requests_after.append(sent)
                    await asyncio.sleep(max(0.0, PACE_S - (time.time() - sent)))

            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


@pytest.fixture
def models(tmp_path: Path) -> Iterator[dict[str, str]]:
    behaviour = {"control": 0.0, "dead": 1.0}
    with running_servers(
        {
            name: lambda port, name=name, error_rate=error_rate: [
                *("-m", "tests.e2e.flaky_model", "--port", str(port), "--name", name),
                *("--delay", "0.005", "--error-rate", str(error_rate)),
            ]
            for name, error_rate in behaviour.items()
        },
        tmp_path,
    ) as urls:
        yield urls


def test_a_canary_failing_every_request_is_rolled_back_within_two_intervals(
    metrics: Any,
    make_key: Callable[..., str],
    models: dict[str, str],
    slack: SlackSink,
    tmp_path: Path,
) -> None:
    services.experiment_create(
        actor="test",
        key="dead",
        name="dead canary",
        kind="canary",
        variants=[
            services.VariantInput(
                key="v1", upstream_url=models["control"], weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url=models["dead"], weight=0.5),
        ],
        metrics=[
            services.MetricUseInput(metric_key="error-rate", role="guardrail", margin=0.0),
            services.MetricUseInput(metric_key="latency-p95", role="guardrail", margin=0.1),
        ],
        ramp_steps=[services.RampStepInput(0.1, 3600, 10), services.RampStepInput(1.0, 0, 0)],
        slack_webhook_url=slack.url("/dead"),
    )
    key = make_key("decide")
    with running_platform(tmp_path, CHILD_ENV) as platform:
        services.experiment_start(actor="test", key="dead")
        traffic = Traffic(platform.url, key)
        with sending(traffic):
            rolled_back = wait_until(
                lambda: Experiment.objects.filter(key="dead", status="rolled_back").exists(),
                DEADLINE_S,
            )
            if not rolled_back:
                pytest.fail("the dead canary was not rolled back: " + platform.log_tail("worker"))
            # Time for a duplicate alert to show up, if there were one.
            delivered = wait_until(
                lambda: AlertOutbox.objects.filter(
                    experiment__key="dead", status="delivered"
                ).exists(),
                30,
            )
            assert delivered, list(AlertOutbox.objects.values("status", "attempts", "last_error"))
            time.sleep(2 * INTERVAL_S)

    audit = AuditEntry.objects.get(experiment__key="dead", action="rollback")
    assert audit.after["evidence"]["metric"] == "error-rate", audit.after["evidence"]
    assert traffic.first_canary_request is not None
    elapsed = audit.created_at.timestamp() - traffic.first_canary_request
    canary_requests = sum(
        1 for at in traffic.canary_requests_after if at <= audit.created_at.timestamp()
    )
    print(
        f"\nrolled back {elapsed:.2f} s ({elapsed / INTERVAL_S:.2f} analysis intervals) after "
        f"the canary's first request, after {canary_requests} canary requests "
        f"({traffic.requests} requests in all)"
    )
    assert elapsed <= 2 * INTERVAL_S, (
        f"rolled back {elapsed:.2f} s after the first canary request",
        platform.log_tail("worker"),
    )
    messages = slack.messages("/dead")
    assert len({m.headers["x-rampart-delivery"] for m in messages}) == 1
    assert "Error rate" in str(messages[0].json)
    assert AlertOutbox.objects.filter(experiment__key="dead").count() == 1
