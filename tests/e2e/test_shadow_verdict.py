"""End to end: paired shadow verdicts from real mirrored traffic.

Processes: the edge (uvicorn), a Celery worker and Celery beat as children on the test database
and broker; three classifier stand-ins (``tests.e2e.label_model``, 20 ms each): control, a shadow
that answers like control, and a shadow that answers differently on 20% of requests. Traffic
goes through the proxy, each request from a new user with a new body. The proxy mirrors every
request to both shadows and pairs their answers and latencies with control's; the worker folds
the pairs and judges each shadow. Expected: the differing shadow "worse" (its disagreement
bound above the 5% tolerance), the identical one "ready", and one Slack alert each.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from analysis.models import AlertOutbox, ShadowAnalysis
from experiments import services
from tests.processes import (
    running_platform,
    running_servers,
    sending,
    wait_until,
)
from tests.slack_sink import SlackSink

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHILD_ENV = {
    "ANALYSIS_INTERVAL_S": "1",
    "SNAPSHOT_REFRESH_S": "0.2",
    "RECORDER_FLUSH_S": "0.2",
    "OBSERVATION_BUCKET_S": "1",
    "EDGE_REQUIRE_KEY": "true",
    "ALERT_BACKOFF_BASE_S": "0.2",
    "ALERT_BACKOFF_MAX_S": "1",
}
DEADLINE_S = 150.0
CONCURRENCY = 8
REQUESTS_PER_S = 150.0
PACE_S = CONCURRENCY / REQUESTS_PER_S


class Traffic:
    """A new user per request, through the proxy, until ``stop`` is set."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.url, headers={"X-Rampart-Key": self.key}, timeout=10
        ) as client:

            async def loop() -> None:
                while not self.stop.is_set():
                    sent = time.time()
                    with contextlib.suppress(httpx.HTTPError):
                        await client.post(
                            "/proxy/shadowed/predict",
                            headers={"X-Rampart-Unit": uuid.uuid4().hex},
                            content=b'{"id": "%s"}' % uuid.uuid4().hex.encode(),
                        )
                    await asyncio.sleep(max(0.0, PACE_S - (time.time() - sent)))

            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


@pytest.fixture
def models(tmp_path: Path) -> Iterator[dict[str, str]]:
    behaviour = {"control": 0.0, "same": 0.0, "differs": 0.2}
    with running_servers(
        {
            name: lambda port, share=share: [
                *("-m", "tests.e2e.label_model", "--port", str(port)),
                *("--delay", "0.02", "--disagree", str(share)),
            ]
            for name, share in behaviour.items()
        },
        tmp_path,
    ) as urls:
        yield urls


def test_a_differing_shadow_is_worse_and_an_identical_one_ready(
    metrics: Any,
    make_key: Callable[..., str],
    models: dict[str, str],
    slack: SlackSink,
    tmp_path: Path,
) -> None:
    services.experiment_create(
        actor="test",
        key="shadowed",
        name="shadowed classifier",
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url=models["control"], weight=0.9, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url=models["control"], weight=0.1),
            services.VariantInput(
                key="same", upstream_url=models["same"], weight=0.0, is_shadow=True
            ),
            services.VariantInput(
                key="differs", upstream_url=models["differs"], weight=0.0, is_shadow=True
            ),
        ],
        shadow_compare_field="label",
        slack_webhook_url=slack.url("/shadow"),
    )
    key = make_key("decide")
    with running_platform(tmp_path, CHILD_ENV) as platform:
        services.experiment_start(actor="test", key="shadowed")
        traffic = Traffic(platform.url, key)
        with sending(traffic):

            def judged() -> bool:
                verdicts = dict(
                    ShadowAnalysis.objects.filter(experiment__key="shadowed").values_list(
                        "variant_key", "verdict"
                    )
                )
                return "collecting" not in verdicts.values() and len(verdicts) == 2

            if not wait_until(judged, DEADLINE_S, interval=0.2):
                rows = list(ShadowAnalysis.objects.values("variant_key", "verdict", "result"))
                pytest.fail(f"no verdicts: {rows} " + platform.log_tail("worker", 2000))
            traffic.stop.set()
            rows = {row.variant_key: row for row in ShadowAnalysis.objects.all()}
            differs, same = rows["differs"], rows["same"]
            assert differs.verdict == "worse", differs.result
            assert "disagrees with control on at least" in differs.reason
            assert 0.05 < differs.result["disagreement"]["lower"] < 0.2
            assert 0.15 < differs.result["disagreement"]["estimate"] < 0.25
            assert same.verdict == "ready", same.result
            assert same.result["disagreement"]["estimate"] == 0.0
            # One alert per shadow, delivered to the Slack stand-in.
            outbox = AlertOutbox.objects.filter(kind="shadow_verdict")
            assert outbox.count() == 2

            # Other alerts may arrive too (health warnings of the A/B itself); wait for the two
            # shadow verdicts.
            def shadow_texts() -> list[str]:
                texts = (message.json["text"] for message in list(slack.received))
                return sorted(text for text in texts if "Shadow verdict" in text)

            assert wait_until(lambda: len(shadow_texts()) >= 2, 20.0, interval=0.2), slack.received
            texts = shadow_texts()
            assert len(texts) == 2, texts
            assert "shadow `differs`" in texts[0] and "shadow `same`" in texts[1], texts
            print(
                f"\nshadow verdicts: differs after {differs.result['pairs']} pairs "
                f"({differs.reason}); same after {same.result['pairs']} pairs ({same.reason})"
            )
