"""The labels API: validation naming index and field, idempotent writes, unmatched ids counted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from routing.edge.app import EdgeContext, build_edge
from routing.edge.labels import LabelsApp, parse_labels
from routing.edge.problems import EdgeError
from routing.models import Label, Prediction
from routing.observe.recorder import ExposureRecorder
from routing.snapshot import SnapshotHolder
from tests.factories import create_experiment
from tests.routing.problems import assert_problem

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _label(number: int, **fields: Any) -> dict[str, Any]:
    return {"request_id": f"r-{number}", "label": "cat", **fields}


def _body(labels: list[Any]) -> bytes:
    return orjson.dumps({"labels": labels})


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ("not an object", None),
        ({"label": "cat"}, "request_id"),
        (_label(9, request_id=""), "request_id"),
        (_label(9, request_id=7), "request_id"),
        (_label(9, request_id="x" * 129), "request_id"),
        ({"request_id": "r"}, "label"),
        (_label(9, label=None), "label"),
        (_label(9, label=""), "label"),
        (_label(9, label="c" * 201), "label"),
        (_label(9, label=[0, 1]), "label"),
        (_label(9, label={"class": 1}), "label"),
        (_label(9, timestamp="yesterday"), "timestamp"),
        (_label(9, timestamp="2099-01-01T00:00:00Z"), "timestamp"),
        (_label(9, lable="dog"), "lable"),
    ],
)
def test_each_rule_names_the_index_and_the_field(bad: Any, field: str | None) -> None:
    with pytest.raises(EdgeError) as caught:
        parse_labels(_body([_label(0), _label(1), bad]), now=NOW)
    assert (caught.value.status, caught.value.index, caught.value.field) == (400, 2, field)
    body = orjson.loads(caught.value.body())
    assert body["detail"].startswith("label 2: ")


def test_valid_labels_are_normalised_and_the_first_of_an_id_wins() -> None:
    rows, size = parse_labels(
        _body(
            [
                _label(1, label=1),
                _label(2, label=0.25, timestamp="2026-05-01T11:00:00+01:00"),
                _label(3, label=True, timestamp=1_700_000_000),
                _label(1, label=2),
            ]
        ),
        now=NOW,
    )
    assert size == 4
    assert rows == [
        ("r-1", "1", NOW.timestamp()),
        ("r-2", "0.25", NOW.timestamp() - 7200),
        ("r-3", "true", 1_700_000_000.0),
    ]


def test_bad_shapes_are_refused() -> None:
    for body, field in [(b"[]", "labels"), (b'{"labels": {}}', "labels"), (b'{"x": []}', "x")]:
        with pytest.raises(EdgeError) as caught:
            parse_labels(body, now=NOW)
        assert (caught.value.status, caught.value.field) == (400, field)


def _post_all(requests: list[tuple[bytes, dict[str, str]]]) -> list[httpx.Response]:
    context = EdgeContext(
        snapshots=SnapshotHolder(refresh_s=60),
        exposures=ExposureRecorder(flush_s=60),
        require_key=True,
    )
    context.snapshots.refresh_now()
    app = build_edge(mounts={"/v1/labels": LabelsApp}, context=context)

    async def run() -> list[httpx.Response]:
        await app.startup()
        try:
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
                return [
                    await client.post("/v1/labels", content=body, headers=headers)
                    for body, headers in requests
                ]
        finally:
            await app.shutdown()

    return asyncio.run(run())


@pytest.mark.django_db(transaction=True)
def test_labels_are_stored_once_and_unmatched_ids_counted(
    make_key: Callable[..., str], metrics: Any
) -> None:
    experiment = create_experiment()
    for number in (1, 2):
        Prediction.objects.create(
            experiment=experiment,
            request_id=f"r-{number}",
            variant_key="v1",
            unit_id=f"u-{number}",
            predicted_at=NOW.timestamp(),
            kind="class",
            status="ok",
            value='"cat"',
        )
    auth = {"Authorization": f"Bearer {make_key('ingest')}"}
    before = {
        name: _counter(name)
        for name in (
            "rampart_labels_accepted_total",
            "rampart_labels_duplicates_total",
            "rampart_labels_unmatched_total",
        )
    }
    answers = _post_all(
        [
            (_body([_label(1), _label(3, label=4), _label(1, label="dog")]), auth),
            (_body([_label(1), _label(2, label="dog"), _label(4, label=0)]), auth),
            (_body([_label(5), _label(6, label="x" * 201)]), auth),
            (_body([_label(1)]), {"Authorization": f"Bearer {make_key('decide')}"}),
        ]
    )
    assert [answer.status_code for answer in answers] == [200, 200, 400, 403]
    assert answers[0].json() == {"accepted": 2, "duplicates": 1, "unmatched": 1}
    assert answers[1].json() == {"accepted": 2, "duplicates": 1, "unmatched": 1}
    assert_problem(answers[2], 400, "validation_error", "label", index=1)
    stored = dict(Label.objects.values_list("request_id", "value"))
    assert stored == {"r-1": '"cat"', "r-2": '"dog"', "r-3": "4", "r-4": "0"}
    assert _counter("rampart_labels_accepted_total") - before["rampart_labels_accepted_total"] == 4
    duplicates = _counter("rampart_labels_duplicates_total")
    assert duplicates - before["rampart_labels_duplicates_total"] == 2
    unmatched = _counter("rampart_labels_unmatched_total")
    assert unmatched - before["rampart_labels_unmatched_total"] == 2
