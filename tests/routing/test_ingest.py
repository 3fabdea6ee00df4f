"""The events API: validation naming index and field, idempotent writes, counts, the HTTP part."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from routing.edge.app import Edge, build_edge
from routing.edge.context import EdgeContext
from routing.edge.ingest import EventsApp, parse_events
from routing.edge.problems import EdgeError
from routing.models import Event
from routing.observe.event_store import events_insert
from routing.observe.recorder import ExposureRecorder
from routing.snapshot import SnapshotHolder
from tests.processes import free_port, start_process, stop_process, wait_for_http
from tests.routing.problems import assert_problem

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _event(number: int, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"e-{number}", "unit_id": f"u-{number}", "name": "purchase", **fields}


def _body(events: list[Any]) -> bytes:
    return orjson.dumps({"events": events})


# --- validation (no database) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ("not an object", None),
        ({"unit_id": "u", "name": "n"}, "event_id"),
        (_event(9, event_id=""), "event_id"),
        (_event(9, event_id=42), "event_id"),
        (_event(9, event_id="x" * 129), "event_id"),
        (_event(9, event_id="a\x00b"), "event_id"),
        ({"event_id": "e", "name": "n"}, "unit_id"),
        (_event(9, unit_id=True), "unit_id"),
        (_event(9, unit_id=["u"]), "unit_id"),
        (_event(9, unit_id="u" * 201), "unit_id"),
        ({"event_id": "e", "unit_id": "u"}, "name"),
        (_event(9, name="n" * 129), "name"),
        (_event(9, value="3"), "value"),
        (_event(9, value=True), "value"),
        (_event(9, value=[1]), "value"),
        (_event(9, timestamp="yesterday"), "timestamp"),
        (_event(9, timestamp="2026-05-01T12:00:00"), "timestamp"),
        (_event(9, timestamp=1_714_564_800_000), "timestamp"),
        (_event(9, timestamp=-1), "timestamp"),
        (_event(9, timestamp={"s": 1}), "timestamp"),
        (_event(9, vaule=3), "vaule"),
    ],
)
def test_each_rule_names_the_index_and_the_field(bad: Any, field: str | None) -> None:
    with pytest.raises(EdgeError) as caught:
        parse_events(_body([_event(0), _event(1), bad, _event(3)]), now=NOW)
    assert (caught.value.status, caught.value.index, caught.value.field) == (400, 2, field)
    body = orjson.loads(caught.value.body())
    code = "unknown_field" if field == "vaule" else "validation_error"
    assert body["code"] == code and body["type"] == f"urn:rampart:problem:{code}"
    assert (body["index"], body["field"]) == (2, field)
    [entry] = body["errors"]
    assert (entry["index"], entry["field"], entry["code"]) == (2, field, code)
    assert entry["message"] and body["detail"] == f"event 2: {entry['message']}"


def test_every_bad_event_of_a_batch_is_listed() -> None:
    body = _body([_event(0), _event(1, value="x"), _event(2), _event(3, unit_id=None)])
    with pytest.raises(EdgeError) as caught:
        parse_events(body, now=NOW)
    errors = caught.value.errors or []
    assert [(e["index"], e["field"]) for e in errors] == [(1, "value"), (3, "unit_id")]


@pytest.mark.parametrize(
    ("timestamp", "accepted"),
    [
        ("9999-12-31T23:59:59Z", False),
        (NOW + timedelta(seconds=301), False),
        (NOW + timedelta(seconds=299), True),
        (NOW - timedelta(days=400), True),
    ],
)
def test_timestamps_beyond_the_clock_skew_are_refused(
    timestamp: Any, accepted: bool, settings: Any
) -> None:
    settings.EDGE_MAX_CLOCK_SKEW_S = 300
    raw = timestamp if isinstance(timestamp, str) else timestamp.isoformat()
    body = _body([_event(0), _event(1, timestamp=raw)])
    if accepted:
        assert parse_events(body, now=NOW).rows[1][4] == datetime.fromisoformat(raw)
        return
    with pytest.raises(EdgeError) as caught:
        parse_events(body, now=NOW)
    assert (caught.value.status, caught.value.index, caught.value.field) == (400, 1, "timestamp")
    assert "EDGE_MAX_CLOCK_SKEW_S" in caught.value.message
    # Epoch seconds get the same limit.
    epoch = _body([_event(0, timestamp=datetime.fromisoformat(raw).timestamp())])
    with pytest.raises(EdgeError):
        parse_events(epoch, now=NOW)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'"unit_id": "u-\xff"', "unit_id"),  # invalid UTF-8 bytes
        (b'"unit_id": "u-\\udcff"', "unit_id"),  # a lone surrogate escape
        (b'"event_id": "e-\xc3"', "event_id"),  # a truncated sequence
    ],
)
def test_ids_that_are_not_utf8_are_refused_never_replaced(raw: bytes, field: str) -> None:
    body = b'{"events": [{"event_id": "a", "unit_id": "u", "name": "n"}, {"name": "n", '
    body += (b'"event_id": "b", ' if field == "unit_id" else b'"unit_id": "u", ') + raw + b"}]}"
    with pytest.raises(EdgeError) as caught:
        parse_events(body, now=NOW)
    error = caught.value
    assert (error.status, error.code, error.index, error.field) == (
        400,
        "invalid_encoding",
        1,
        field,
    )


def test_valid_events_are_normalised() -> None:
    batch = parse_events(
        orjson.dumps(
            [
                {"event_id": "a", "unit_id": 7, "name": "click"},
                {"event_id": "b" * 128, "unit_id": "u" * 200, "name": "n" * 128, "value": 2},
                {
                    "event_id": "c",
                    "unit_id": "u",
                    "name": "revenue",
                    "value": -19.5,
                    "timestamp": "2024-05-01T14:00:00+02:00",
                },
                {"event_id": "d", "unit_id": "u", "name": "x", "timestamp": 1_700_000_000.5},
                {"event_id": "e", "unit_id": "u", "name": "x", "timestamp": "2024-05-01T12:00Z"},
                {"event_id": "f", "unit_id": "u", "name": "x", "value": None, "timestamp": None},
            ]
        ),
        now=NOW,
    )
    assert batch.rows == [
        ("a", "7", "click", 1.0, NOW),
        ("b" * 128, "u" * 200, "n" * 128, 2.0, NOW),
        ("c", "u", "revenue", -19.5, datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("d", "u", "x", 1.0, datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ("e", "u", "x", 1.0, datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("f", "u", "x", 1.0, NOW),
    ]
    assert all(row[4].tzinfo is UTC for row in batch.rows)


def test_a_repeated_event_id_in_one_batch_keeps_the_first() -> None:
    batch = parse_events(
        _body([_event(1, value=5), _event(2), _event(1, value=6), _event(1)]), now=NOW
    )
    assert [(row[0], row[3]) for row in batch.rows] == [("e-1", 5.0), ("e-2", 1.0)]
    assert (batch.size, batch.repeated) == (4, 2)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{nope", 400, None),
        (b'"events"', 400, "events"),
        (b'{"events": {"a": 1}}', 400, "events"),
        (b'{"items": []}', 400, "items"),
        (b"{}", 400, "events"),
        (orjson.dumps([_event(n) for n in range(11)]), 400, "events"),
    ],
)
def test_bad_shapes_are_refused(body: bytes, status: int, field: str | None) -> None:
    with pytest.raises(EdgeError) as caught:
        parse_events(body, now=NOW, max_events=10)
    assert (caught.value.status, caught.value.field) == (status, field)


# --- writes -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_events_insert_counts_new_rows_and_skips_stored_ids() -> None:
    first = parse_events(_body([_event(n) for n in range(5)]), now=NOW).rows
    assert events_insert(rows=first, received_at=NOW) == 5
    overlapping = parse_events(_body([_event(n, value=9) for n in range(3, 8)]), now=NOW).rows
    assert events_insert(rows=overlapping, received_at=NOW + timedelta(seconds=1)) == 3
    assert events_insert(rows=overlapping, received_at=NOW) == 0
    stored = {event.event_id: event for event in Event.objects.all()}
    assert sorted(stored) == [f"e-{n}" for n in range(8)]
    # The first write of an id wins; a later batch with the same id changes nothing.
    assert stored["e-3"].value == 1.0 and stored["e-3"].received_at == NOW
    assert stored["e-7"].value == 9.0 and stored["e-7"].timestamp == NOW


# --- the HTTP part, in process ------------------------------------------------------------


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class EdgeCalls:
    """Runs requests against an edge with its lifespan started, in one event loop."""

    def __init__(self, app: Edge) -> None:
        self.app = app

    def post_all(self, requests: list[tuple[bytes, dict[str, str]]]) -> list[httpx.Response]:
        async def run() -> list[httpx.Response]:
            await self.app.startup()
            try:
                transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
                async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
                    return [
                        await client.post("/v1/events", content=body, headers=headers)
                        for body, headers in requests
                    ]
            finally:
                await self.app.shutdown()

        return asyncio.run(run())

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def run() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(run())


def _edge(*, require_key: bool = True, max_events: int = 10_000) -> EdgeCalls:
    context = EdgeContext(
        snapshots=SnapshotHolder(refresh_s=60),
        exposures=ExposureRecorder(flush_s=60),
        require_key=require_key,
    )
    context.snapshots.refresh_now()
    app = build_edge(
        mounts={"/v1/events": lambda c: EventsApp(c, max_events=max_events)}, context=context
    )
    return EdgeCalls(app)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.django_db(transaction=True)
def test_batches_are_idempotent_and_counted(make_key: Callable[..., str]) -> None:
    auth = _auth(make_key("ingest"))
    before = {
        "accepted": _counter("rampart_events_accepted_total"),
        "duplicates": _counter("rampart_events_duplicates_total"),
        "rejected": _counter("rampart_events_rejected_total"),
    }
    edge = _edge()
    responses = edge.post_all(
        [
            (_body([_event(1, value=2.5), _event(2), _event(1)]), auth),
            # Bare list; e-2 was stored by the first batch.
            (orjson.dumps([_event(2), _event(3, timestamp="2024-05-01T12:00:00Z")]), auth),
            # A bad event at index 1 refuses the batch: e-4 is not written either.
            (_body([_event(4), _event(5, value="x")]), auth),
            (_body([_event(1), _event(2), _event(3)]), auth),
        ]
    )
    assert [r.status_code for r in responses] == [200, 200, 400, 200]
    assert responses[0].json() == {"accepted": 2, "duplicates": 1}
    assert responses[1].json() == {"accepted": 1, "duplicates": 1}
    problem = assert_problem(responses[2], 400, "validation_error", "value", index=1)
    assert problem["errors"] == [
        {
            "index": 1,
            "field": "value",
            "code": "validation_error",
            "message": "value must be a number",
        }
    ]
    assert responses[3].json() == {"accepted": 0, "duplicates": 3}
    rows = {e.event_id: (e.unit_id, e.name, e.value) for e in Event.objects.all()}
    assert rows == {
        "e-1": ("u-1", "purchase", 2.5),
        "e-2": ("u-2", "purchase", 1.0),
        "e-3": ("u-3", "purchase", 1.0),
    }
    assert Event.objects.get(event_id="e-3").timestamp == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert _counter("rampart_events_accepted_total") - before["accepted"] == 3
    assert _counter("rampart_events_duplicates_total") - before["duplicates"] == 5
    assert _counter("rampart_events_rejected_total") - before["rejected"] == 2


@pytest.mark.django_db(transaction=True)
def test_keys_scopes_methods_paths_and_limits(make_key: Callable[..., str]) -> None:
    ingest, decide = make_key("ingest"), make_key("decide")
    edge = _edge(max_events=3)
    batch = _body([_event(1)])
    answers = edge.post_all(
        [
            (batch, {}),
            (batch, _auth("rk_nope_nope")),
            (batch, _auth(decide)),
            (batch, {"X-Rampart-Key": ingest}),
            (_body([_event(n) for n in range(4)]), _auth(ingest)),
            (b"[" + b" " * (8 * 1024 * 1024) + b"]", _auth(ingest)),
            (b"{not json", _auth(ingest)),
        ]
    )
    refused = [(a.status_code, a.json()["code"]) for a in answers if a.status_code != 200]
    assert refused == [
        (401, "not_authenticated"),
        (401, "not_authenticated"),
        (403, "permission_denied"),
        (400, "validation_error"),  # more events than a batch may hold
        (413, "payload_too_large"),  # more bytes than a body may hold
        (400, "malformed_json"),
    ]
    assert all(
        a.headers["content-type"] == "application/problem+json"
        for a in answers
        if a.status_code != 200
    )
    assert answers[3].json() == {"accepted": 1, "duplicates": 0}
    assert edge.request("GET", "/v1/events", headers=_auth(ingest)).status_code == 405
    assert edge.request("POST", "/v1/events/other", headers=_auth(ingest)).status_code == 404
    assert Event.objects.count() == 1

    open_edge = _edge(require_key=False)
    assert open_edge.post_all([(_body([_event(2)]), {})])[0].json() == {
        "accepted": 1,
        "duplicates": 0,
    }


# --- a real uvicorn edge ------------------------------------------------------------------


@pytest.fixture
def events_edge(
    transactional_db: None, tmp_path: Path, make_key: Callable[..., str]
) -> Iterator[tuple[str, str]]:
    key = make_key("ingest")
    port = free_port()
    process = start_process(
        [
            "-m",
            "uvicorn",
            "--factory",
            "tests.routing.edge_factories:events_edge",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--lifespan",
            "on",
        ],
        env={"EDGE_REQUIRE_KEY": "true"},
        log=tmp_path / "edge.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/v1/events", timeout=30)
        yield url, key
    finally:
        stop_process(process)


def test_concurrent_overlapping_batches_through_uvicorn_count_exactly(
    events_edge: tuple[str, str],
) -> None:
    url, key = events_edge
    # Eight batches of 400 over 1,000 ids, each overlapping its neighbours; sent at once,
    # they race on the same ids, and every id must be accepted exactly once overall.
    batches = [
        _body([_event((start * 300 + offset) % 1000) for offset in range(400)])
        for start in range(8)
    ]

    def post(body: bytes) -> dict[str, int]:
        response = httpx.post(f"{url}/v1/events", content=body, headers=_auth(key), timeout=30.0)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(post, batches))
    assert all(a["accepted"] + a["duplicates"] == 400 for a in answers)
    distinct = {(start * 300 + offset) % 1000 for start in range(8) for offset in range(400)}
    assert sum(a["accepted"] for a in answers) == len(distinct) == Event.objects.count()
    again = post(batches[0])
    assert again == {"accepted": 0, "duplicates": 400}
