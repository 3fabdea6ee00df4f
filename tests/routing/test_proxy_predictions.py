"""Predictions read by the proxy: request ids on answers, sampled rows, unreadable answers counted.

The real edge and ProxyApp in process, forwarding to real model servers on loopback (as in
test_proxy.py); rows are read from the database after the edge shut down (final flush).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from django.db import OperationalError

from routing.models import Prediction
from routing.observe.predictions import PredictionRecorder
from routing.proxy.predictions import new_request_id, read_prediction
from tests.model_server import ModelServer
from tests.routing.test_proxy import make_experiment, run, running_edge

QUALITY = {"quality_enabled": True, "quality_prediction_path": "score"}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ModelServer]]:
    started = {
        "control": ModelServer(name="control", score=0.5).start(),
        "canary": ModelServer(name="canary", score=0.75).start(),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def proxy_settings(settings: Any) -> Any:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0
    settings.PROXY_BREAKER_FAILURES = 1000
    return settings


@pytest.mark.parametrize(
    ("body", "kind", "expected"),
    [
        (b'{"score": 0.75}', "number", ("ok", "0.75")),
        (b'{"score": 3}', "number", ("ok", "3")),
        (b'{"score": "cat"}', "class", ("ok", '"cat"')),
        (b'{"score": 7}', "class", ("ok", "7")),
        (b'{"score": [0.2, 0.8]}', "scores", ("ok", "[0.2,0.8]")),
        (b'{"score": 0.8}', "scores", ("ok", "0.8")),
        (b'{"score": 1.5}', "scores", ("wrong_type", "")),
        (b'{"score": [0.2, "x"]}', "scores", ("wrong_type", "")),
        (b'{"score": []}', "scores", ("wrong_type", "")),
        (b'{"score": 0.5}', "class", ("wrong_type", "")),
        (b'{"score": true}', "number", ("wrong_type", "")),
        (b'{"score": null}', "number", ("wrong_type", "")),
        (b'{"label": 1}', "number", ("missing", "")),
        (b"[1, 2]", "number", ("missing", "")),
        (b"<html>", "number", ("not_json", "")),
        (b"", "number", ("not_json", "")),
    ],
)
def test_reading_one_answer(body: bytes, kind: str, expected: tuple[str, str]) -> None:
    assert read_prediction(body, ("score",), kind) == expected


def test_compressed_answers_are_read_and_unknown_encodings_counted() -> None:
    body = gzip.compress(b'{"score": 0.25}')
    assert read_prediction(body, ("score",), "number", b"gzip") == ("ok", "0.25")
    assert read_prediction(b"\x00", ("score",), "number", b"gzip") == ("not_json", "")
    assert read_prediction(b"{}", ("score",), "number", b"br") == ("not_json", "")


@pytest.mark.django_db(transaction=True)
def test_predictions_are_recorded_per_arm_with_request_ids(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    experiment_id = make_experiment(
        "scored",
        [("v1", servers["control"].url, 0.5), ("v2", servers["canary"].url, 0.5)],
        quality_prediction_kind="number",
        quality_request_id_header="X-Request-Id",
        **QUALITY,
    )

    async def scenario() -> tuple[list[httpx.Response], dict[str, int]]:
        async with running_edge(key) as running:
            post = running.client.post
            v1 = running.units_for("scored", "v1", 3)
            v2 = running.units_for("scored", "v2", 3)
            answers = [
                await post("/proxy/scored/p", headers={"X-Rampart-Unit": unit}) for unit in v1 + v2
            ]
            # The caller's own id; one too long for an id is replaced by the proxy's.
            answers.append(
                await post(
                    "/proxy/scored/p", headers={"X-Rampart-Unit": v2[0], "X-Request-Id": "req-7"}
                )
            )
            answers.append(
                await post(
                    "/proxy/scored/p", headers={"X-Rampart-Unit": v2[1], "X-Request-Id": "x" * 200}
                )
            )
            # No unit: an id, but no prediction (not in the experiment).
            answers.append(await post("/proxy/scored/p"))
            # The model refused the request (4xx): no prediction to read.
            answers.append(
                await post(
                    "/proxy/scored/p", headers={"X-Rampart-Unit": v1[0], "X-Model-Status": "422"}
                )
            )
            # Not JSON: recorded as such. Too large to read whole: counted as streamed.
            for size in ("64", str(2 * 1024 * 1024)):
                answers.append(
                    await post(
                        "/proxy/scored/p",
                        headers={"X-Rampart-Unit": v1[1], "X-Model-Stream": size},
                    )
                )
            # The canary fails and control answers: not the canary's prediction.
            servers["canary"].status = 503
            answers.append(await post("/proxy/scored/p", headers={"X-Rampart-Unit": v2[2]}))
            read = dict(running.proxy.predictions.recorder.read)
        return answers, read

    answers, read = run(scenario)
    ids = [answer.headers["x-rampart-request-id"] for answer in answers]
    assert len(set(ids)) == len(ids)
    assert ids[6] == "req-7"
    assert ids[7] != "x" * 200
    assert answers[-1].headers["x-rampart-served-by"] == "v1"
    rows = {row.request_id: row for row in Prediction.objects.filter(experiment_id=experiment_id)}
    assert set(rows) == {*ids[:8], ids[10]}
    assert rows.pop(ids[10]).status == "not_json"
    assert {rows[i].variant_key for i in ids[:3]} == {"v1"}
    assert {rows[i].value for i in ids[:3]} == {"0.5"}
    assert {rows[i].value for i in ids[3:8]} == {"0.75"}
    assert all(row.status == "ok" and row.kind == "number" for row in rows.values())
    assert all(row.unit_id for row in rows.values())
    assert read == {"ok": 8, "not_json": 1, "streamed": 1}


@pytest.mark.django_db(transaction=True)
def test_unreadable_answers_are_recorded_as_such_and_sampling_bounds_the_rows(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    missing_id = make_experiment(
        "unlabelled",
        [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
        quality_enabled=True,
        quality_prediction_path="predictions[0]",
    )
    sampled_id = make_experiment(
        "sampled",
        [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
        quality_sample_rate=0.0,
        **QUALITY,
    )

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            post = running.client.post
            return [
                await post(f"/proxy/{name}/p", headers={"X-Rampart-Unit": f"u{i}"})
                for name in ("unlabelled", "sampled")
                for i in range(4)
            ]

    answers = run(scenario)
    assert all(answer.status_code == 200 for answer in answers)
    assert all(orjson.loads(answer.content)["score"] == 0.5 for answer in answers)
    assert all("x-rampart-request-id" in answer.headers for answer in answers)
    statuses = list(Prediction.objects.filter(experiment_id=missing_id).values_list("status"))
    assert statuses == [("missing",)] * 4
    assert not Prediction.objects.filter(experiment_id=sampled_id).exists()


@pytest.mark.django_db(transaction=True)
def test_recorder_keeps_rows_through_a_database_outage_and_counts_what_it_drops() -> None:
    calls: list[int] = []

    def failing_then_working(rows: Any) -> tuple[int, int, int]:
        calls.append(len(rows))
        if len(calls) == 1:
            raise OperationalError("database unavailable")
        return len(rows), 0, 0

    recorder = PredictionRecorder(flush_s=60.0, max_buffer=3, insert=failing_then_working)

    def row(index: int) -> Any:
        return (1, f"r{index}", "v1", "u", 0.0, "number", "ok", "1")

    assert [recorder.record(row(i)) for i in range(4)] == [True, True, True, False]
    assert recorder.flush_now() == 0
    assert recorder.stats.buffered == 3
    assert recorder.flush_now() == 3
    stats = recorder.stats
    assert (stats.buffered, stats.written, stats.dropped, stats.failed_flushes) == (0, 3, 1, 1)
    assert stats.read == {"ok": 4}
    assert calls == [3, 3]


def test_request_ids_are_unique_and_short() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert max(len(i) for i in ids) <= 32
    # 70,000 more ids: the counter passes 0xffff, where unpadded hex would sort out of order
    in_order = [new_request_id() for _ in range(70_000)]
    assert sorted(in_order) == in_order


@pytest.mark.django_db(transaction=True)
def test_a_shadows_prediction_is_recorded_under_controls_request_id(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    shadow = ModelServer(name="shadow", score=0.625).start()
    try:
        experiment_id = make_experiment(
            "shadow-scored",
            [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
            shadows=(("v3", shadow.url),),
            quality_prediction_kind="number",
            quality_request_id_header="X-Request-Id",
            **QUALITY,
        )

        async def scenario() -> list[httpx.Response]:
            async with running_edge(key) as running:
                answers = [
                    await running.client.post(
                        "/proxy/shadow-scored/p",
                        headers={"X-Rampart-Unit": f"u{i}", "X-Request-Id": f"req-{i}"},
                    )
                    for i in range(3)
                ]
                while running.proxy.shadows_in_flight:
                    await asyncio.sleep(0.02)
                return answers

        answers = run(scenario)
    finally:
        shadow.stop()
    assert [a.headers["x-rampart-request-id"] for a in answers] == ["req-0", "req-1", "req-2"]
    rows = {
        (row.request_id, row.variant_key): row.value
        for row in Prediction.objects.filter(experiment_id=experiment_id)
    }
    assert rows == {
        **{(f"req-{i}", "v1"): "0.5" for i in range(3)},
        **{(f"req-{i}", "v3"): "0.625" for i in range(3)},
    }
