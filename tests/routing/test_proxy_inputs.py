"""Input drift at the proxy: watched request fields binned, counted per bucket, written once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from routing.models import InputDriftBucket
from routing.observe.inputs import MAX_CELLS, OTHER, InputRecorder
from routing.proxy.inputs import InputField, InputPlan
from tests.model_server import ModelServer
from tests.routing.test_proxy import make_experiment, run, running_edge

FIELDS = {
    "fields": [
        {"path": "amount", "kind": "number"},
        {"path": "user.country", "kind": "category"},
        {"path": "score", "kind": "number", "edges": [0.5, 0.9]},
    ],
    "sample_rate": 1.0,
}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ModelServer]]:
    started = {"control": ModelServer(name="control").start()}
    yield started
    for server in started.values():
        server.stop()


@pytest.mark.parametrize(
    ("field", "value", "cell"),
    [
        (InputField("a", "number", None), 120.0, "+8"),
        (InputField("a", "number", None), 0, "0"),
        (InputField("a", "number", (10.0, 20.0)), 15, "1"),
        (InputField("a", "number", (10.0, 20.0)), 20, "2"),
        (InputField("a", "number", None), "12", "(wrong_type)"),
        (InputField("a", "number", None), True, "(wrong_type)"),
        (InputField("a", "category", None), "DE", "DE"),
        (InputField("a", "category", None), 3, "3"),
        (InputField("a", "category", None), None, "null"),
        (InputField("a", "category", None), [1], "(wrong_type)"),
    ],
)
def test_values_become_cells(field: InputField, value: Any, cell: str) -> None:
    assert field.cell(value) == cell


def test_a_plan_samples_and_a_field_keeps_at_most_max_cells_per_bucket() -> None:
    recorder = InputRecorder(flush_s=60)
    plan = InputPlan(7, (InputField("c", "category", None),), 1.0, 60.0)
    for index in range(MAX_CELLS + 20):
        plan.capture(orjson.dumps({"c": f"v{index}"}), recorder)
    plan.capture(b"<html>", recorder)
    plan.capture(b"{}", recorder)
    (cells,) = recorder.take().values()
    assert len(cells) == MAX_CELLS + 1 and cells[OTHER] == 20 + 2
    assert recorder.buffered == 0
    never = InputPlan(7, (InputField("c", "category", None),), 0.0, 60.0)
    never.capture(b'{"c": 1}', InputRecorder(flush_s=60))


@pytest.mark.django_db(transaction=True)
def test_the_proxy_counts_watched_fields_and_writes_them_on_shutdown(
    settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0
    key = make_key("decide")
    experiment_id = make_experiment(
        "watched",
        [("v1", servers["control"].url, 0.5), ("v2", servers["control"].url, 0.5)],
        input_drift=FIELDS,
    )
    bodies = [
        {"amount": 120.0, "user": {"country": "DE"}, "score": 0.7},
        {"amount": 130.0, "user": {"country": "FR"}, "score": 0.95},
        {"amount": "lots", "score": 0.1},
    ]

    async def scenario() -> None:
        async with running_edge(key) as running:
            for index, body in enumerate(bodies):
                answer = await running.client.post(
                    "/proxy/watched/p",
                    content=orjson.dumps(body),
                    headers={"X-Rampart-Unit": f"u{index}"},
                )
                assert answer.status_code == 200
            await running.client.post("/proxy/watched/p", content=b"not json")

    run(scenario)
    merged: dict[str, dict[str, int]] = {}
    for row in InputDriftBucket.objects.filter(experiment_id=experiment_id):
        for cell, n in orjson.loads(row.counts).items():
            found = merged.setdefault(row.field_path, {})
            found[cell] = found.get(cell, 0) + n
    assert merged["amount"] == {"+8": 2, "(wrong_type)": 1, "(not_json)": 1}
    assert merged["user.country"] == {"DE": 1, "FR": 1, "(missing)": 1, "(not_json)": 1}
    assert merged["score"] == {"1": 1, "2": 1, "0": 1, "(not_json)": 1}
