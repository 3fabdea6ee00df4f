"""End to end: a canary whose predictions differ from control's is rolled back for drift.

Processes: the edge (uvicorn) with the proxy, a Celery worker and Celery beat as children on
the test database and broker; in this process two model servers (tests/model_server.py)
whose answers carry different scores, a Slack stand-in and a traffic generator sending each
request through the proxy from a new user. Quality tracking reads the score from every
answer (numbers, binned on control's first users); the prediction-drift check (tolerance
0.02, action rollback) bets on the users' first predictions and rolls the canary back, once,
with the drift as the evidence, and the alert reaches Slack.
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

from analysis.models import AlertOutbox, ResultSnapshot
from experiments import services
from experiments.models import AuditEntry, Experiment
from tests.model_server import ModelServer
from tests.processes import free_port, start_process, stop_process, wait_for_http
from tests.slack_sink import SlackSink

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

INTERVAL_S = 2.0
CHILD_ENV = {
    "ANALYSIS_INTERVAL_S": str(INTERVAL_S),
    "SNAPSHOT_REFRESH_S": "0.2",
    "RECORDER_FLUSH_S": "0.2",
    "OBSERVATION_BUCKET_S": "1",
    "EDGE_REQUIRE_KEY": "true",
    "ALERT_BACKOFF_BASE_S": "0.2",
    "ALERT_BACKOFF_MAX_S": "1",
}
DEADLINE_S = 90.0
CONCURRENCY = 4
PACE_S = CONCURRENCY / 100.0  # about 100 requests/s: a few new canary users per second


class Traffic:
    """New users, one request each, through the proxy."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.stop = threading.Event()
        self.by_arm: dict[str, int] = {}

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
                            "/proxy/drifty/predict",
                            headers={"X-Rampart-Unit": uuid.uuid4().hex},
                            content=b'{"features": [1, 2, 3]}',
                        )
                    except httpx.HTTPError:
                        await asyncio.sleep(PACE_S)
                        continue
                    arm = response.headers.get("x-rampart-variant", "")
                    self.by_arm[arm] = self.by_arm.get(arm, 0) + 1
                    await asyncio.sleep(max(0.0, PACE_S - (time.time() - sent)))

            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


@pytest.fixture
def models() -> Iterator[dict[str, ModelServer]]:
    servers = {
        "control": ModelServer(name="control", score=0.2),
        "canary": ModelServer(name="canary", score=0.7),
    }
    for server in servers.values():
        server.keep_requests = False
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def slack() -> Iterator[SlackSink]:
    sink = SlackSink().start()
    yield sink
    sink.stop()


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_canary_whose_predictions_drift_is_rolled_back_and_slack_hears_once(
    metrics: Any,
    make_key: Callable[..., str],
    models: dict[str, ModelServer],
    slack: SlackSink,
    tmp_path: Path,
) -> None:
    services.experiment_create(
        actor="test",
        key="drifty",
        name="drifting canary",
        kind="canary",
        variants=[
            services.VariantInput(
                key="v1", upstream_url=models["control"].url, weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url=models["canary"].url, weight=0.5),
        ],
        metrics=[],
        ramp_steps=[services.RampStepInput(0.2, 3600, 10), services.RampStepInput(1.0, 0, 0)],
        slack_webhook_url=slack.url("/drift"),
        quality_enabled=True,
        quality_prediction_path="score",
        quality_prediction_kind="number",
        prediction_drift_enabled=True,
        prediction_drift_tolerance=0.02,
        prediction_drift_action="rollback",
    )
    key = make_key("decide")
    port = free_port()
    edge = start_process(
        [
            *("-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1"),
            *("--port", str(port), "--no-access-log", "--log-level", "warning"),
        ],
        env=CHILD_ENV,
        log=tmp_path / "edge.log",
    )
    worker = start_process(
        [
            *("-m", "celery", "-A", "config", "worker", "--pool=solo", "-l", "warning"),
            *("--without-heartbeat", "--without-gossip", "--without-mingle"),
        ],
        env=CHILD_ENV,
        log=tmp_path / "worker.log",
    )
    beat = start_process(
        [
            *("-m", "celery", "-A", "config", "beat", "-l", "warning"),
            *("-s", str(tmp_path / "beat-schedule")),
        ],
        env=CHILD_ENV,
        log=tmp_path / "beat.log",
    )
    url = f"http://127.0.0.1:{port}"
    traffic = Traffic(url, key)
    sender = threading.Thread(target=traffic.run, daemon=True)
    try:
        wait_for_http(url + "/proxy/")
        services.experiment_start(actor="test", key="drifty")
        sender.start()
        rolled_back = _wait(
            lambda: Experiment.objects.filter(key="drifty", status="rolled_back").exists(),
            DEADLINE_S,
        )
        if not rolled_back:
            pytest.fail(
                "the drifting canary was not rolled back: "
                + (tmp_path / "worker.log").read_text()[-3000:]
            )
        delivered = _wait(
            lambda: AlertOutbox.objects.filter(
                experiment__key="drifty", status="delivered"
            ).exists(),
            30,
        )
        assert delivered, list(AlertOutbox.objects.values("status", "attempts", "last_error"))
        time.sleep(2 * INTERVAL_S)  # time for a duplicate, if there were one
    finally:
        traffic.stop.set()
        if sender.is_alive():
            sender.join(15)
        for process in (beat, worker, edge):
            stop_process(process)

    audit = AuditEntry.objects.get(experiment__key="drifty", action="rollback")
    evidence = audit.after["evidence"]
    assert evidence["metric"] == "prediction_drift" and evidence["arm"] == "v2", evidence
    assert evidence["p_value"] <= 0.05
    snapshot = ResultSnapshot.objects.filter(experiment__key="drifty", decision="rollback").latest(
        "created_at"
    )
    drift = snapshot.health["prediction_drift"]
    assert drift["flagged"] == ["v2"]
    # Control answers 0.2, the canary 0.7: all of the canary's users fall in the bin above
    # everything control answered while the bins were fixed, where control has none.
    assert "0.2" in drift["categories"]
    top = drift["categories"].index("[0.2, inf)")
    assert drift["arms"]["v2"]["shares"][top] == 1.0 and drift["arms"]["v1"]["shares"][top] == 0
    messages = slack.messages("/drift")
    assert len({m.headers["x-rampart-delivery"] for m in messages}) == 1
    assert "Prediction drift" in str(messages[0].json)
    assert AlertOutbox.objects.filter(experiment__key="drifty").count() == 1
    print(
        f"\nrolled back for prediction drift after {evidence['n']} users bet on "
        f"(requests per arm: {traffic.by_arm})"
    )
