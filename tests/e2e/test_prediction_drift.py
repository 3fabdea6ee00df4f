"""End to end: a canary whose predictions differ from control's is rolled back for drift, and
a watched request field that drifts from its training distribution alerts Slack once.

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
from tests.processes import running_platform, sending, wait_until
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
    # Input drift tests each closed window once: 3-second windows of users.
    "INPUT_DRIFT_WINDOW_S": "3",
}
DEADLINE_S = 90.0
CONCURRENCY = 4
PACE_S = CONCURRENCY / 100.0  # about 100 requests/s: a few new canary users per second


class Traffic:
    """New users, one request each, through the proxy."""

    def __init__(
        self, url: str, key: str, path: str = "/proxy/drifty/predict", body: bytes = b"{}"
    ) -> None:
        self.url, self.key, self.path, self.body = url, key, path, body
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
                            self.path,
                            headers={"X-Rampart-Unit": uuid.uuid4().hex},
                            content=self.body,
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
    with running_platform(tmp_path, CHILD_ENV) as platform:
        services.experiment_start(actor="test", key="drifty")
        traffic = Traffic(platform.url, key)
        with sending(traffic):
            rolled_back = wait_until(
                lambda: Experiment.objects.filter(key="drifty", status="rolled_back").exists(),
                DEADLINE_S,
            )
            if not rolled_back:
                pytest.fail(
                    "the drifting canary was not rolled back: " + platform.log_tail("worker")
                )
            delivered = wait_until(
                lambda: AlertOutbox.objects.filter(
                    experiment__key="drifty", status="delivered"
                ).exists(),
                30,
            )
            assert delivered, list(AlertOutbox.objects.values("status", "attempts", "last_error"))
            time.sleep(2 * INTERVAL_S)  # time for a duplicate, if there were one

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


def test_a_request_field_that_drifts_from_its_training_distribution_alerts_slack_once(
    metrics: Any,
    make_key: Callable[..., str],
    models: dict[str, ModelServer],
    slack: SlackSink,
    tmp_path: Path,
) -> None:
    services.experiment_create(
        actor="test",
        key="inputs",
        name="input drift",
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url=models["control"].url, weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url=models["control"].url, weight=0.5),
        ],
        metrics=[],
        slack_webhook_url=slack.url("/inputs"),
        input_drift={
            "fields": [
                {"path": "country", "kind": "category", "threshold": 0.2},
                {"path": "amount", "kind": "number"},
            ],
            "sample_rate": 1.0,
            "reference": {
                "type": "training",
                "distributions": {
                    "country": {"counts": {"DE": 600, "FR": 400}},
                    "amount": {"edges": [10, 100], "counts": [0, 1000, 0]},
                },
            },
        },
    )
    key = make_key("decide")
    with running_platform(tmp_path, CHILD_ENV) as platform:
        services.experiment_start(actor="test", key="inputs")
        traffic = Traffic(
            platform.url, key, "/proxy/inputs/predict", b'{"country": "US", "amount": 42}'
        )
        with sending(traffic):
            delivered = wait_until(
                lambda: AlertOutbox.objects.filter(
                    experiment__key="inputs", kind="input_drift", status="delivered"
                ).exists(),
                DEADLINE_S,
            )
            if not delivered:
                pytest.fail("no input drift alert: " + platform.log_tail("worker"))
            time.sleep(3 * INTERVAL_S)  # more runs while it drifts: still one alert

    assert Experiment.objects.get(key="inputs").status == "running"  # a monitor by default
    messages = slack.messages("/inputs")
    assert len({m.headers["x-rampart-delivery"] for m in messages}) == 1, [
        (m.json["blocks"][1], m.headers) for m in messages
    ] + list(AlertOutbox.objects.values("kind", "dedupe_key"))
    assert "Input drift" in str(messages[0].json) and "country" in str(messages[0].json)
    snapshot = ResultSnapshot.objects.filter(experiment__key="inputs").latest("created_at")
    fields = {f["path"]: f for f in snapshot.health["input_drift"]["fields"]}
    assert fields["country"]["flagged"] and not fields["amount"]["flagged"]
    assert fields["amount"]["psi"] < 0.2
