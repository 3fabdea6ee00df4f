"""Client.track_label and AsyncClient.track_label against a real edge with the labels API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from rampart_sdk import AsyncClient, Client, InvalidEventError, Label, LabelResult
from routing.models import Label as StoredLabel
from routing.models import Prediction
from tests.factories import create_experiment
from tests.routing.sdk.conftest import EdgeServer


def test_track_label_stores_each_request_id_once(edge: EdgeServer, metrics: Any) -> None:
    experiment = create_experiment()
    Prediction.objects.create(
        experiment=experiment,
        request_id="req-1",
        variant_key="v2",
        unit_id="u-1",
        predicted_at=0.0,
        kind="class",
        status="ok",
        value='"cat"',
    )
    with Client(edge.url, edge.key) as client:
        first = client.track_label("req-1", "cat", timestamp=1_700_000_000)
        again = client.track_label("req-1", "dog")
        many = client.track_labels(
            [Label("req-2", 3), Label("req-3", 0.5, datetime(2026, 1, 2, tzinfo=UTC))]
        )
    assert first == LabelResult(accepted=1, duplicates=0, unmatched=0)
    assert again == LabelResult(accepted=0, duplicates=1, unmatched=0)
    assert many == LabelResult(accepted=2, duplicates=0, unmatched=2)
    stored = {row.request_id: (row.value, row.labelled_at) for row in StoredLabel.objects.all()}
    assert stored == {
        "req-1": ('"cat"', 1_700_000_000.0),
        "req-2": ("3", stored["req-2"][1]),
        "req-3": ("0.5", datetime(2026, 1, 2, tzinfo=UTC).timestamp()),
    }

    async def send() -> LabelResult:
        async with AsyncClient(edge.url, edge.key) as client:
            return await client.track_label("req-4", True)

    assert asyncio.run(send()) == LabelResult(accepted=1, duplicates=0, unmatched=1)


@pytest.mark.parametrize(
    ("request_id", "label", "field"),
    [
        ("", "cat", "request_id"),
        ("r" * 129, "cat", "request_id"),
        ("r", "", "label"),
        ("r", float("nan"), "label"),
        ("r", None, "label"),
        ("r", [1], "label"),
    ],
)
def test_labels_the_api_would_refuse_fail_at_once(request_id: str, label: Any, field: str) -> None:
    with pytest.raises(InvalidEventError) as caught:
        Label(request_id, label)
    assert caught.value.field == field
