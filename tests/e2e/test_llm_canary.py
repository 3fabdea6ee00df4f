"""End to end: a slow, expensive LLM canary is rolled back on its TTFT and cost guardrails.

Processes: the edge (uvicorn, Django behind it), a Celery worker and Celery beat as children
on the test database and broker, and two OpenAI-compatible stand-ins (``scripts.llm_server``):
"small" (control: TTFT about 30 ms, cheap) and "large" (the canary: TTFT about 120 ms and five
to ten times the price per token). In this process, the official ``openai`` client streams chat
completions through ``/proxy/chat/v1`` with ``stream_options.include_usage``, for users named
in the ``user`` field: half the requests from a new user, half from one of the last 30 (sticky
users with several answers each). The guardrails: p95 TTFT may rise at most 20%, cost per
request at most 50%, both with the user as the unit (the users' windows are 1 s and 5 s
here). The canary must be rolled back, once, with one of them as the evidence, and the
experiment page must show the TTFT and cost figures per version.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from analysis.models import ResultSnapshot
from experiments import services
from experiments.models import AuditEntry, Experiment
from tests.llm.conftest import create_llm_metrics
from tests.processes import (
    running_platform,
    running_servers,
    sending,
    wait_until,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

INTERVAL_S = 2.0
CHILD_ENV = {
    "ANALYSIS_INTERVAL_S": str(INTERVAL_S),
    "SNAPSHOT_REFRESH_S": "0.2",
    "RECORDER_FLUSH_S": "0.2",
    "OBSERVATION_BUCKET_S": "1",
    "RATE_WINDOW_FAST_S": "1",
    "RATE_WINDOW_SLOW_S": "5",
    "EDGE_REQUIRE_KEY": "true",
}
DEADLINE_S = 90.0
CONCURRENCY = 8
REQUESTS_PER_S = 60.0
PACE_S = CONCURRENCY / REQUESTS_PER_S
SMALL = {"ttft": "30", "prices": (0.5, 1.5)}
LARGE = {"ttft": "120", "prices": (3.0, 15.0)}


class Traffic:
    """Streamed chat completions through the proxy with the openai client, half from new
    users and half from recent ones."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.stop = threading.Event()
        self.served: dict[str, int] = {}
        self.failures = 0
        self.errors: list[str] = []
        self.users: list[str] = []
        self.random = random.Random(17)

    def user(self) -> str:
        if self.users and self.random.random() < 0.5:
            return self.random.choice(self.users[-30:])
        self.users.append(uuid.uuid4().hex)
        return self.users[-1]

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.key, max_retries=0)

        async def loop() -> None:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="any",
                        messages=[{"role": "user", "content": "suggest a product"}],
                        user=self.user(),
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    variant = raw.headers.get("x-rampart-variant", "?")
                    async for _ in raw.parse():
                        pass
                    self.served[variant] = self.served.get(variant, 0) + 1
                except openai.OpenAIError as error:
                    self.failures += 1
                    self.errors.append(repr(error))
                await asyncio.sleep(max(0.0, PACE_S - (time.monotonic() - sent)))

        try:
            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
        finally:
            await client.close()


@pytest.fixture
def llms(tmp_path: Path) -> Iterator[dict[str, str]]:
    with running_servers(
        {
            name: lambda port, name=name, spec=spec: [
                *("-m", "scripts.llm_server", "--name", name, "--port", str(port)),
                *("--ttft-ms", spec["ttft"], "--ttft-sigma", "0.2", "--seed", "7"),
                *("--tokens-per-s", "400", "--output-tokens", "20"),
            ]
            for name, spec in (("small", SMALL), ("large", LARGE))
        },
        tmp_path,
        ready_path="/v1/models",
    ) as urls:
        yield urls


def test_a_slow_expensive_llm_canary_is_rolled_back_on_ttft_and_cost(
    metrics: Any,
    make_key: Callable[..., str],
    llms: dict[str, str],
    tmp_path: Path,
) -> None:
    create_llm_metrics()
    services.experiment_create(
        actor="test",
        key="chat",
        name="small vs large",
        kind="canary",
        unit_source="json_field",
        unit_attribute="user",
        variants=[
            services.VariantInput(
                key="small",
                upstream_url=llms["small"],
                weight=0.5,
                is_control=True,
                price_input_per_m=SMALL["prices"][0],
                price_output_per_m=SMALL["prices"][1],
            ),
            services.VariantInput(
                key="large",
                upstream_url=llms["large"],
                weight=0.5,
                price_input_per_m=LARGE["prices"][0],
                price_output_per_m=LARGE["prices"][1],
            ),
        ],
        metrics=[
            services.MetricUseInput(metric_key="ttft-p95", role="guardrail", margin=0.2),
            services.MetricUseInput(metric_key="cost-per-request", role="guardrail", margin=0.5),
            services.MetricUseInput(metric_key="tokens-per-s", role="secondary"),
        ],
        ramp_steps=[services.RampStepInput(0.5, 3600, 10), services.RampStepInput(1.0, 0, 0)],
    )
    key = make_key("decide")
    started = time.monotonic()
    with running_platform(tmp_path, CHILD_ENV) as platform:
        services.experiment_start(actor="test", key="chat")
        traffic = Traffic(f"{platform.url}/proxy/chat/v1", key)
        with sending(traffic):
            rolled_back = wait_until(
                lambda: Experiment.objects.filter(key="chat", status="rolled_back").exists(),
                DEADLINE_S,
                interval=0.1,
            )
            if not rolled_back:
                pytest.fail(
                    f"not rolled back; served {traffic.served}, failures {traffic.failures}: "
                    + platform.log_tail("worker")
                )
            elapsed = time.monotonic() - started
            time.sleep(2 * INTERVAL_S)  # time for a second rollback to show up, if there were one

    audit = AuditEntry.objects.get(experiment__key="chat", action="rollback")
    evidence = audit.after["evidence"]
    assert evidence["metric"] in ("ttft-p95", "cost-per-request"), evidence
    assert evidence["arm"] == "large"
    assert evidence["rel_effect"] > 0.5, evidence
    print(
        f"\nrolled back on {evidence['metric']} ({evidence['rel_effect']:+.0%}) "
        f"{elapsed:.1f} s after the start; served {traffic.served}, failures {traffic.failures}"
    )
    assert traffic.failures == 0, traffic.errors[:5]
    assert sum(traffic.served.values()) > len(traffic.users)  # users came back
    snapshot = ResultSnapshot.objects.filter(experiment__key="chat").latest("id")
    small, large = snapshot.latency["small"]["llm"], snapshot.latency["large"]["llm"]
    assert large["ttft_p50"] > small["ttft_p50"]
    assert large["cost_mean"] > 5 * small["cost_mean"]
    assert small["approx_requests"] == large["approx_requests"] == 0
