"""End to end: proxy traffic, a real Celery worker and beat, automatic rollback and ramp.

Processes: the edge (uvicorn `config.asgi:application`), a Celery worker and Celery beat
(ANALYSIS_INTERVAL_S=1) as children on the test database and the configured broker
(filesystem on SQLite, Redis on PostgreSQL); in this process three model servers, a Slack
stand-in and a traffic generator that sends every request through the proxy.

Two canaries run at once. "slow" sends half its traffic to a model 40% slower than control:
the p95 latency guardrail (margin 10%) must roll it back, after which the proxy sends
everything to control and Slack has received exactly one well-formed message. "steady"
sends traffic to a model as fast as control through three short ramp steps: it must advance
through every step and complete with the canary as the winner.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from analysis import selectors
from analysis.models import AlertOutbox
from experiments import services
from experiments.models import AuditEntry, Experiment
from tests.processes import (
    free_port,
    running_platform,
    sending,
    start_process,
    stop_process,
    wait_for_http,
    wait_until,
)
from tests.slack_sink import SlackSink

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CONTROL_DELAY_S = 0.050
SLOW_DELAY_S = 0.070  # 40% slower than control
CONTROL_ERROR_RATE = 0.10
SLOW_ERROR_RATE = 0.20  # and twice the errors
ROLLBACK_DEADLINE_S = 60.0
COMPLETE_DEADLINE_S = 60.0
MAX_TRAFFIC_S = 100.0
CONCURRENCY = 16

CHILD_ENV = {
    "ANALYSIS_INTERVAL_S": "1",
    "SNAPSHOT_REFRESH_S": "0.2",
    "RECORDER_FLUSH_S": "0.2",
    "OBSERVATION_BUCKET_S": "1",
    "EDGE_REQUIRE_KEY": "true",
    "ALERT_BACKOFF_BASE_S": "0.2",
    "ALERT_BACKOFF_MAX_S": "1",
}


@dataclass
class Served:
    at: float
    variant: str
    status: int


@dataclass
class Traffic:
    """Sends requests through the proxy, alternating experiments, each from a new unit."""

    url: str
    key: str
    experiments: tuple[str, ...]
    served: dict[str, list[Served]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: int = 0

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        deadline = time.monotonic() + MAX_TRAFFIC_S
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=self.url, headers={"X-Rampart-Key": self.key}, limits=limits, timeout=10
        ) as client:

            async def loop(index: int) -> None:
                count = 0
                while not self.stop.is_set() and time.monotonic() < deadline:
                    experiment = self.experiments[(index + count) % len(self.experiments)]
                    count += 1
                    try:
                        response = await client.post(
                            f"/proxy/{experiment}/predict",
                            headers={"X-Rampart-Unit": uuid.uuid4().hex},
                            content=b'{"features": [1, 2, 3]}',
                        )
                    except httpx.HTTPError:
                        self.errors += 1
                        continue
                    # A failed canary request falls back to control: control served it.
                    variant = response.headers.get("x-rampart-variant", "")
                    self.served.setdefault(experiment, []).append(
                        Served(
                            at=time.monotonic(),
                            variant=response.headers.get("x-rampart-served-by", variant),
                            status=response.status_code,
                        )
                    )

            await asyncio.gather(*(loop(i) for i in range(CONCURRENCY)))


def _latest(key: str) -> str:
    """The last analysis result as JSON, to explain a failure."""
    snapshot = selectors.latest_result(experiment_id=Experiment.objects.get(key=key).pk)
    if snapshot is None:
        return "no analysis yet"
    return json.dumps(
        {
            "decision": snapshot.decision,
            "reason": snapshot.reason,
            "latency": snapshot.latency,
            "metrics": snapshot.metrics,
        }
    )


def _latency(key: str) -> Any:
    snapshot = selectors.result_history(experiment_id=Experiment.objects.get(key=key).pk)
    return [s.latency for s in snapshot if s.decision == "rollback"]


def _status(key: str) -> str:
    return str(Experiment.objects.values_list("status", flat=True).get(key=key))


@dataclass
class Model:
    url: str


@pytest.fixture
def models(tmp_path: Path) -> Iterator[dict[str, Model]]:
    """Model servers in their own processes, so the traffic generator's load on this
    process's GIL does not blur their latencies. The slow canary is 40% slower and fails
    twice as often as control; the steady canary behaves like control."""
    behaviour = {
        "control": (CONTROL_DELAY_S, CONTROL_ERROR_RATE),
        "slow": (SLOW_DELAY_S, SLOW_ERROR_RATE),
        "steady": (CONTROL_DELAY_S, CONTROL_ERROR_RATE),
    }
    processes = {}
    ports = {name: free_port() for name in behaviour}
    for seed, (name, (delay, error_rate)) in enumerate(behaviour.items()):
        processes[name] = start_process(
            [
                *("-m", "tests.e2e.flaky_model", "--port", str(ports[name]), "--name", name),
                *("--delay", str(delay), "--error-rate", str(error_rate), "--seed", str(seed)),
            ],
            log=tmp_path / f"model-{name}.log",
        )
    try:
        for port in ports.values():
            wait_for_http(f"http://127.0.0.1:{port}/")
        yield {name: Model(url=f"http://127.0.0.1:{port}") for name, port in ports.items()}
    finally:
        for process in processes.values():
            stop_process(process)


def _canary(
    key: str, canary_url: str, control_url: str, slack_url: str, steps: list[tuple[float, int, int]]
) -> None:
    services.experiment_create(
        actor="test",
        key=key,
        name=f"{key} canary",
        kind="canary",
        variants=[
            services.VariantInput(key="v1", upstream_url=control_url, weight=0.5, is_control=True),
            services.VariantInput(key="v2", upstream_url=canary_url, weight=0.5),
        ],
        metrics=[
            services.MetricUseInput(metric_key="latency-p95", role="guardrail", margin=0.1),
            services.MetricUseInput(metric_key="error-rate", role="guardrail", margin=0.2),
        ],
        ramp_steps=[services.RampStepInput(s, d, e) for s, d, e in steps],
        slack_webhook_url=slack_url,
    )


def test_bad_canary_rolls_back_and_good_canary_completes(
    metrics: Any,
    make_key: Callable[..., str],
    models: dict[str, Model],
    slack: SlackSink,
    tmp_path: Path,
) -> None:
    control = models["control"].url
    _canary("slow", models["slow"].url, control, slack.url("/slow"), [(0.5, 3600, 10), (1.0, 0, 0)])
    _canary(
        "steady",
        models["steady"].url,
        control,
        slack.url("/steady"),
        [(0.2, 2, 20), (0.5, 2, 20), (1.0, 2, 20)],
    )
    key = make_key("decide")
    with running_platform(tmp_path, CHILD_ENV) as platform:
        for key_ in ("slow", "steady"):
            services.experiment_start(actor="test", key=key_)
        traffic = Traffic(url=platform.url, key=key, experiments=("slow", "steady"))
        started = time.monotonic()
        with sending(traffic):
            if not wait_until(lambda: _status("slow") == "rolled_back", ROLLBACK_DEADLINE_S):
                print("last analysis of slow:", _latest("slow"))
                print(platform.log_tail("worker"))
                pytest.fail("the slow canary was not rolled back in time")
            rolled_back_at = time.monotonic()
            assert wait_until(lambda: _status("steady") == "completed", COMPLETE_DEADLINE_S), (
                "steady canary did not complete",
                platform.log_tail("worker"),
            )
            # Give the edges a few snapshot refreshes, and any duplicate alert time to arrive.
            time.sleep(3.0)
            after = time.monotonic()
            time.sleep(1.0)

    slow = traffic.served["slow"]
    canary_served = [s.at for s in slow if s.variant == "v2"]
    assert canary_served, "the slow canary never served a request"
    time_to_rollback = max(canary_served) - min(canary_served)
    print(
        f"\ntime-to-rollback {time_to_rollback:.2f}s (first to last request served by the "
        f"slow canary); rollback seen {rolled_back_at - started:.2f}s after traffic started; "
        f"{len(slow)} requests to 'slow', {len(canary_served)} of them to the canary; "
        f"latency at rollback {_latency('slow')}"
    )
    assert max(canary_served) < after
    late = [s for s in slow if s.at >= after]
    assert late and all(s.variant == "v1" for s in late)

    audit = AuditEntry.objects.get(experiment__key="slow", action="rollback")
    assert audit.actor == "rampart:analysis"
    # Both guardrails are violated; whichever trips first is the evidence.
    tripped = audit.after["evidence"]["metric"]
    assert tripped in ("latency-p95", "error-rate")

    # One alert, delivered at least once: an attempt whose answer did not arrive within the
    # send timeout (a loaded machine) is sent again, with the same delivery id, and counted.
    messages = slack.messages("/slow")
    assert {m.headers["x-rampart-delivery"] for m in messages} == {
        messages[0].headers["x-rampart-delivery"]
    }
    assert {m.body for m in messages} == {messages[0].body}
    alert = AlertOutbox.objects.get(experiment__key="slow")
    assert alert.status == "delivered" and len(messages) == alert.attempts
    message = messages[0].json
    text = str(message)
    assert message["blocks"][0]["type"] == "header" and "Rolled back" in text
    metric_name = "p95 latency" if tripped == "latency-p95" else "Error rate"
    for expected in (
        "`slow`",
        metric_name,
        "`v2`",
        "always-valid",
        "n per arm",
        "/experiments/slow/",
    ):
        assert expected in text

    steady = Experiment.objects.get(key="steady")
    assert steady.winner is not None and steady.winner.key == "v2"
    assert AuditEntry.objects.filter(experiment=steady, action="advance").count() == 2
    # Distinct alerts in the order sent (a repeated delivery of one alert counted once).
    by_delivery = {m.headers["x-rampart-delivery"]: m for m in slack.messages("/steady")}
    titles = [m.json["blocks"][0]["text"]["text"] for m in by_delivery.values()]
    assert [t.split(":")[1] for t in titles] == ["arrow_up", "arrow_up", "white_check_mark"]
