"""End to end: an A/A ramp whose two model servers slow down together is not rolled back.

Processes: the edge (uvicorn), a Celery worker and Celery beat as children on the test
database and broker; two model servers in their own processes (identical, 1% errors each,
seeded differently), and in this process a traffic generator sending every request through
the proxy, each from a new user. Every request carries ``x-model-delay``, which rises
linearly from 5 ms to 40 ms over the run whichever server answers it, so both versions slow
down together while the canary's share ramps 1 -> 5 -> 10 -> 25 -> 50%: control's data come
mostly from the fast early minutes and the canary's from the slow later ones. Guardrails on
latency-p95 and error-rate must not roll it back, and the last analysis must have evaluated
them (status "ok" with an always-valid p-value, not "insufficient").

The same ramp with a latency-mean guardrail too: the mean latency is compared on per-user
latency sums within ramp steps (`analysis.stats.latency_mean`). Pooled over the whole run,
the shared slowdown made the canary look about 18% slower at the 1-5% steps and rolled the
A/A ramp back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from analysis import selectors
from analysis.models import ResultSnapshot
from experiments import services
from experiments.models import AuditEntry, Experiment
from tests.processes import (
    running_platform,
    running_servers,
    sending,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHILD_ENV = {
    "ANALYSIS_INTERVAL_S": "1",
    "SNAPSHOT_REFRESH_S": "0.2",
    "RECORDER_FLUSH_S": "0.2",
    "OBSERVATION_BUCKET_S": "1",
    "RATE_WINDOW_FAST_S": "1",
    "RATE_WINDOW_SLOW_S": "5",
    "EDGE_REQUIRE_KEY": "true",
}
STEP_S = 4
# 1 -> 5 -> 10 -> 25% for STEP_S each, then 50% until the end of the run.
STEPS = [(0.01, STEP_S, 0), (0.05, STEP_S, 0), (0.1, STEP_S, 0), (0.25, STEP_S, 0), (0.5, 3600, 0)]
RUN_S = 30.0
DELAY_START_S, DELAY_END_S = 0.005, 0.040
CONCURRENCY = 8
CONTEMPORANEOUS = ("latency-p95", "error-rate")
MARGINS = {"latency-mean": 0.1, "latency-p95": 0.1, "error-rate": 0.2}


class SlowingTraffic:
    """New users, one request each; the model delay rises linearly over RUN_S."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.served: dict[str, int] = {}

    def delay(self) -> float:
        progress = min((time.monotonic() - self.started) / RUN_S, 1.0)
        return DELAY_START_S + (DELAY_END_S - DELAY_START_S) * progress

    def run(self) -> None:
        self.started = time.monotonic()
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.url, headers={"X-Rampart-Key": self.key}, timeout=10
        ) as client:

            async def loop() -> None:
                while not self.stop.is_set():
                    try:
                        response = await client.post(
                            "/proxy/drift/predict",
                            headers={
                                "X-Rampart-Unit": uuid.uuid4().hex,
                                "x-model-delay": f"{self.delay():.4f}",
                            },
                            content=b'{"features": [1, 2, 3]}',
                        )
                    except httpx.HTTPError:
                        continue
                    variant = response.headers.get("x-rampart-variant", "")
                    self.served[variant] = self.served.get(variant, 0) + 1

            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


@pytest.fixture
def models(tmp_path: Path) -> Iterator[dict[str, str]]:
    with running_servers(
        {
            name: lambda port, name=name, seed=seed: [
                *("-m", "tests.e2e.flaky_model", "--port", str(port), "--name", name),
                *("--delay", str(DELAY_START_S), "--error-rate", "0.01", "--seed", str(seed)),
            ]
            for seed, name in enumerate(("control", "canary"))
        },
        tmp_path,
    ) as urls:
        yield urls


def _status() -> str:
    return str(Experiment.objects.values_list("status", flat=True).get(key="drift"))


@pytest.mark.parametrize(
    "guardrails",
    [
        pytest.param(CONTEMPORANEOUS, id="p95-and-error-rate"),
        pytest.param(("latency-mean", *CONTEMPORANEOUS), id="with-mean"),
    ],
)
def test_an_aa_ramp_slowing_down_together_is_not_rolled_back(
    guardrails: tuple[str, ...],
    metrics: Any,
    make_key: Callable[..., str],
    models: dict[str, str],
    tmp_path: Path,
) -> None:
    services.experiment_create(
        actor="test",
        key="drift",
        name="A/A ramp under a shared slowdown",
        kind="canary",
        variants=[
            services.VariantInput(
                key="v1", upstream_url=models["control"], weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url=models["canary"], weight=0.5),
        ],
        metrics=[
            services.MetricUseInput(metric_key=name, role="guardrail", margin=MARGINS[name])
            for name in guardrails
        ],
        ramp_steps=[services.RampStepInput(s, d, e) for s, d, e in STEPS],
    )
    key = make_key("decide")
    statuses: set[str] = set()
    with running_platform(tmp_path, CHILD_ENV) as platform:
        services.experiment_start(actor="test", key="drift")
        traffic = SlowingTraffic(platform.url, key)
        with sending(traffic):
            deadline = time.monotonic() + RUN_S
            while time.monotonic() < deadline and statuses <= {"running"}:
                statuses.add(_status())
                time.sleep(0.2)
            # One more analysis interval on the slowest data, then stop.
            time.sleep(1.5)
            statuses.add(_status())

    experiment = Experiment.objects.get(key="drift")
    history = selectors.result_history(experiment_id=experiment.pk)
    last = history[-1] if history else None
    explain = json.dumps(
        {"statuses": sorted(statuses), "served": traffic.served, "last": last and last.metrics},
        default=str,
    )[-3000:]
    assert statuses == {"running"}, explain
    assert not ResultSnapshot.objects.filter(experiment=experiment, decision="rollback").exists()
    assert not AuditEntry.objects.filter(experiment=experiment, action="rollback").exists()
    advances = AuditEntry.objects.filter(experiment=experiment, action="advance").count()
    assert advances == len(STEPS) - 1, (advances, explain)
    assert len(history) >= 10, (len(history), explain)
    assert last is not None and last.decision != "hold", explain
    rows = {row["metric"]: row for row in last.metrics if row["metric"] in guardrails}
    assert set(rows) == set(guardrails), explain
    for name, row in rows.items():
        assert row["status"] == "ok", (name, explain)
        assert row["p_always_valid"] is not None and row["p_always_valid"] > 0, (name, explain)
    print(
        f"\n{len(history)} analyses, {advances} advances, served {traffic.served}; last: "
        + ", ".join(
            f"{n} {r['rel_effect']:+.3f} (p {r['p_always_valid']:.3g})" for n, r in rows.items()
        )
    )
