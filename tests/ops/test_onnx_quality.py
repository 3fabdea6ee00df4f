"""Real models through the real proxy: an fp32 digits classifier against int8 and degraded ones.

The three ONNX versions of ``scripts.onnx_models`` each serve from their own uvicorn on
loopback (onnxruntime); users send held-out digits through the edge's proxy with quality
tracking on, the true digits go to ``POST /v1/labels`` on the same edge, and the analysis
service decides: the degraded candidate is rolled back on the accuracy guardrail, the int8
one is not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from analysis import services as analysis_services
from experiments import services
from experiments.models import AuditEntry, Experiment
from routing.edge.app import EdgeContext, build_edge
from routing.edge.labels import LabelsApp
from routing.models import Label, Prediction
from routing.proxy.app import ProxyApp
from scripts import onnx_models
from scripts.onnx_models import ModelSet, OnnxModelServer, build_models
from tests.processes import free_port

USERS = 300
REQUESTS_PER_USER = 2


@pytest.fixture(scope="module")
def models() -> ModelSet:
    # var/models, keyed by every input of the build: shared with the quality demo's tests and
    # the next suite on this checkout (the first one in a clean checkout builds it).
    return build_models()


class Served:
    """An ASGI app on uvicorn in a thread of the test process, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "did not start"
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def servers(models: ModelSet) -> Iterator[dict[str, Served]]:
    started = {
        version: Served(OnnxModelServer(name=version, path=models.path(version)))
        for version in ("fp32", "int8", "degraded")
    }
    yield started
    for server in started.values():
        server.stop()


def test_the_model_cache_is_keyed_by_every_input_of_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = onnx_models._cache_key()
    assert key == onnx_models._cache_key()
    monkeypatch.setattr(onnx_models, "BUILD_REVISION", onnx_models.BUILD_REVISION + 1)
    revised = onnx_models._cache_key()
    assert revised != key
    real_version = onnx_models.metadata.version
    monkeypatch.setattr(
        onnx_models.metadata,
        "version",
        lambda name: "0.0" if name == "scikit-learn" else real_version(name),
    )
    assert onnx_models._cache_key() not in (key, revised)
    monkeypatch.setattr(onnx_models, "CORRUPTED_CLASSES", {3: 5})
    assert onnx_models._cache_key() not in (key, revised)


def test_the_versions_are_what_the_story_needs(models: ModelSet) -> None:
    accuracy = models.accuracy
    assert accuracy["fp32"] >= 0.95
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= 0.01
    assert accuracy["degraded"] <= accuracy["fp32"] - 0.10
    assert models.path("int8").stat().st_size < models.path("fp32").stat().st_size / 2
    server = OnnxModelServer(name="fp32", path=models.path("fp32"))
    assert server.answer(b'{"features": [1, 2]}')[0] == 400
    features, _ = models.held_out()
    status, body = server.answer(orjson.dumps({"features": features[0].tolist()}))
    answer = orjson.loads(body)
    assert status == 200 and len(answer["scores"]) == 10
    assert answer["label"] == max(range(10), key=answer["scores"].__getitem__)


def _run_users(
    models: ModelSet, key: str, experiment: str
) -> tuple[list[httpx.Response], dict[str, Any]]:
    """Users send held-out digits through the proxy, then the truth goes to /v1/labels."""
    features, truth = models.held_out()
    edge = build_edge(
        mounts={"/proxy/": ProxyApp, "/v1/labels": LabelsApp}, context=EdgeContext.from_settings()
    )

    async def scenario() -> tuple[list[httpx.Response], dict[str, Any]]:
        await edge.startup()
        try:
            transport = httpx.ASGITransport(app=edge)  # type: ignore[arg-type]
            async with httpx.AsyncClient(
                transport=transport, base_url="http://edge", headers={"X-Rampart-Key": key}
            ) as client:
                answers, labels = [], []
                for index in range(USERS * REQUESTS_PER_USER):
                    row = index % len(features)
                    answer = await client.post(
                        f"/proxy/{experiment}/predict",
                        json={"features": features[row].tolist()},
                        headers={"X-Rampart-Unit": f"user-{index % USERS}"},
                    )
                    answers.append(answer)
                    labels.append(
                        {
                            "request_id": answer.headers["x-rampart-request-id"],
                            "label": int(truth[row]),
                        }
                    )
                sent = await client.post(
                    "/v1/labels",
                    json={"labels": labels},
                    headers={"Authorization": f"Bearer {key}"},
                )
                return answers, sent.json()
        finally:
            await edge.shutdown()

    return asyncio.run(scenario())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("candidate", "rolled_back"), [("degraded", True), ("int8", False)], ids=["degraded", "int8"]
)
def test_a_degraded_candidate_is_rolled_back_on_accuracy_and_int8_is_not(
    models: ModelSet,
    servers: dict[str, Served],
    make_key: Callable[..., str],
    settings: Any,
    candidate: str,
    rolled_back: bool,
) -> None:
    settings.RECORDER_FLUSH_S = 60.0  # written at shutdown; labels join them at analysis
    services.metric_create(
        actor="test",
        key="accuracy",
        name="Accuracy",
        kind="mean",
        source="quality:accuracy",
        direction="higher",
        window_s=60,
    )
    services.experiment_create(
        actor="test",
        key="digits",
        name="digits",
        kind="ab",
        variants=[
            services.VariantInput(
                key="fp32", upstream_url=servers["fp32"].url, weight=0.5, is_control=True
            ),
            services.VariantInput(key=candidate, upstream_url=servers[candidate].url, weight=0.5),
        ],
        metrics=[services.MetricUseInput(metric_key="accuracy", role="guardrail", margin=0.01)],
        quality_enabled=True,
        quality_prediction_path="label",
        quality_prediction_kind="class",
    )
    experiment = services.experiment_start(actor="test", key="digits").experiment
    answers, sent = _run_users(models, make_key("decide", "ingest"), "digits")
    assert all(answer.status_code == 200 for answer in answers)
    assert sent["accepted"] == USERS * REQUESTS_PER_USER and sent["duplicates"] == 0
    served = {answer.headers["x-model"] for answer in answers}
    assert served == {"fp32", candidate}
    assert Prediction.objects.filter(status="ok").count() == USERS * REQUESTS_PER_USER
    assert Label.objects.count() == USERS * REQUESTS_PER_USER

    result = analysis_services.analysis_run(experiment_id=experiment.pk)
    assert result is not None
    row = next(m for m in result.snapshot.metrics if m["metric"] == "accuracy")
    status = Experiment.objects.get(pk=experiment.pk).status
    if rolled_back:
        assert result.snapshot.decision == "rollback" and status == "rolled_back"
        assert row["status"] == "breach"
        evidence = AuditEntry.objects.get(action="rollback").after["evidence"]
        assert evidence["metric"] == "accuracy" and evidence["arm"] == candidate
    else:
        assert result.snapshot.decision != "rollback" and status == "running"
        assert row["status"] != "breach"
    shares = result.snapshot.health["labels"]["arms"]
    assert {arm: entry["labelled_share"] for arm, entry in shares.items()} == {
        "fp32": 1.0,
        candidate: 1.0,
    }
