"""The exposures API: whole-batch checks against the edge's own decisions, and recording.

The rules are checked in process against a snapshot built from the database; recording,
keys and HTTP answers through a real uvicorn edge (tests.routing.edge_factories), on
whichever database the suite runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from experiments import services
from routing.edge.exposures_api import validate_exposures
from routing.edge.problems import TITLES, EdgeError
from routing.models import Exposure
from routing.snapshot import RoutingSnapshot, load_snapshot
from tests.factories import create_experiment
from tests.routing.edge_factories import ServedEdge, serve_edge
from tests.routing.problems import assert_problem
from tests.routing.sdk.conftest import EdgeServer

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
CANDIDATES = [f"user-{number}" for number in range(400)]


def _create_running(key: str, **changes: Any) -> None:
    create_experiment(key, "ab")
    if changes:
        services.experiment_update(actor="test", key=key, **changes)
    services.experiment_start(actor="test", key=key)


def _units(snapshot: RoutingSnapshot, key: str) -> dict[str, list[str]]:
    """Candidate units by what the edge decides for them: variant key, or "out"."""
    route = snapshot.route(key)
    assert route is not None
    by_outcome: dict[str, list[str]] = {}
    for unit in CANDIDATES:
        decision = route.decide(unit)
        by_outcome.setdefault(decision.variant if decision.in_experiment else "out", []).append(
            unit
        )
    return by_outcome


def _body(exposures: list[Any]) -> bytes:
    return orjson.dumps({"exposures": exposures})


# --- the rules (in process) ---------------------------------------------------------------


@pytest.fixture
def snapshot(metrics: Any) -> RoutingSnapshot:
    """ranker (A/B, half coverage, one override), a paused and a draft experiment."""
    _create_running("ranker", coverage=0.5, overrides={"qa-anna": "v2"})
    _create_running("paused")
    services.experiment_pause(actor="test", key="paused")
    create_experiment("draft", "ab")
    return load_snapshot()


def _exposure(snapshot: RoutingSnapshot, arm: str = "v1", number: int = 0) -> dict[str, Any]:
    unit = _units(snapshot, "ranker")[arm][number]
    return {"experiment": "ranker", "unit_id": unit, "variant": arm}


def _bad_exposures(snapshot: RoutingSnapshot) -> list[tuple[Any, str | None, str]]:
    units = _units(snapshot, "ranker")
    good = _exposure(snapshot)
    return [
        ("not an object", None, "validation_error"),
        ({"unit_id": units["v1"][0], "variant": "v1"}, "experiment", "validation_error"),
        ({**good, "experiment": 42}, "experiment", "validation_error"),
        ({**good, "experiment": "nope"}, "experiment", "assignment_conflict"),
        ({**good, "experiment": "paused"}, "experiment", "assignment_conflict"),
        ({**good, "experiment": "draft"}, "experiment", "assignment_conflict"),
        ({"experiment": "ranker", "variant": "v1"}, "unit_id", "validation_error"),
        ({**good, "unit_id": True}, "unit_id", "validation_error"),
        ({**good, "unit_id": "u" * 201}, "unit_id", "validation_error"),
        ({**good, "unit_id": "a\x00b"}, "unit_id", "validation_error"),
        # Outside the half coverage: the edge serves control and records nothing.
        ({**good, "unit_id": units["out"][0]}, "unit_id", "assignment_conflict"),
        ({"experiment": "ranker", "unit_id": units["v1"][0]}, "variant", "validation_error"),
        ({**good, "variant": "v9"}, "variant", "assignment_conflict"),
        # The unit is in the experiment, but in the other arm.
        ({**good, "variant": "v2"}, "variant", "assignment_conflict"),
        ({**good, "timestamp": "yesterday"}, "timestamp", "validation_error"),
        ({**good, "timestamp": "2026-05-01T12:00:00"}, "timestamp", "validation_error"),
        ({**good, "timestamp": 1_777_636_800_000}, "timestamp", "validation_error"),
        ({**good, "varient": "v1"}, "varient", "unknown_field"),
        # Beyond the clock skew a client may have (EDGE_MAX_CLOCK_SKEW_S, 300 s by default).
        (
            {**good, "timestamp": (NOW + timedelta(seconds=301)).isoformat()},
            "timestamp",
            "validation_error",
        ),
        ({**good, "timestamp": "9999-12-31T23:59:59Z"}, "timestamp", "validation_error"),
    ]


@pytest.mark.django_db
def test_each_rule_names_the_index_and_the_field(snapshot: RoutingSnapshot) -> None:
    valid = [_exposure(snapshot, "v1", 1), _exposure(snapshot, "v2", 0)]
    for bad, field, code in _bad_exposures(snapshot):
        with pytest.raises(EdgeError) as caught:
            validate_exposures(_body([*valid, bad, valid[0]]), snapshot=snapshot, now=NOW)
        [error] = caught.value.errors or []
        assert (error["index"], error["field"]) == (2, field), bad
        body = orjson.loads(caught.value.body())
        assert body == {
            "type": f"urn:rampart:problem:{code}",
            "title": TITLES[code],
            "status": 409 if code == "assignment_conflict" else 400,
            "detail": f"exposure 2: {error['message']}",
            "code": code,
            "field": field,
            "index": 2,
            "errors": [{"index": 2, "field": field, "code": code, "message": error["message"]}],
            "batch_size": 4,
        }


@pytest.mark.django_db
def test_every_invalid_exposure_is_listed(snapshot: RoutingSnapshot) -> None:
    good = _exposure(snapshot, "v1")
    wrong_arm = {**good, "variant": "v2"}
    batch = [good, wrong_arm, good, {**good, "experiment": "paused"}, wrong_arm]
    with pytest.raises(EdgeError) as caught:
        validate_exposures(_body(batch), snapshot=snapshot, now=NOW)
    errors = caught.value.errors or []
    assert [(e["index"], e["field"]) for e in errors] == [
        (1, "variant"),
        (3, "experiment"),
        (4, "variant"),
    ]
    assert "gets variant 'v1'" in errors[0]["message"]
    # Only conflicts with the edge's assignments: 409. One malformed exposure makes it a 400.
    assert (caught.value.status, caught.value.code) == (409, "assignment_conflict")
    with pytest.raises(EdgeError) as mixed:
        validate_exposures(_body([*batch, {**good, "unit_id": ""}]), snapshot=snapshot, now=NOW)
    assert (mixed.value.status, mixed.value.code, mixed.value.index) == (400, "validation_error", 1)
    assert [e["code"] for e in mixed.value.errors or []][-1] == "validation_error"


@pytest.mark.django_db
def test_valid_exposures_are_accepted_and_overrides_ignored(snapshot: RoutingSnapshot) -> None:
    ranker = snapshot.route("ranker")
    assert ranker is not None
    later = NOW - timedelta(minutes=5)
    batch = [
        _exposure(snapshot, "v1"),
        {**_exposure(snapshot, "v2"), "timestamp": "2026-05-01T13:55:00+02:00"},
        {**_exposure(snapshot, "v2", 1), "timestamp": later.timestamp()},
        # Ahead, within the clock skew: the edge cannot receive an exposure before it
        # happened, so it is taken as received now.
        {**_exposure(snapshot, "v1", 1), "timestamp": (NOW + timedelta(minutes=4)).isoformat()},
        # Overridden units are QA traffic: never refused, never counted (like the edge).
        {"experiment": "ranker", "unit_id": "qa-anna", "variant": "v1"},
        {"experiment": "ranker", "unit_id": "qa-anna", "variant": "v2"},
    ]
    validated = validate_exposures(_body(batch), snapshot=snapshot, now=NOW)
    assert validated.ignored == 2
    assert [(e.experiment_id, e.unit_id, e.variant_key, e.at) for e in validated.accepted] == [
        (ranker.experiment_id, batch[0]["unit_id"], "v1", NOW),
        (ranker.experiment_id, batch[1]["unit_id"], "v2", NOW - timedelta(minutes=5)),
        (ranker.experiment_id, batch[2]["unit_id"], "v2", later),
        (ranker.experiment_id, batch[3]["unit_id"], "v1", NOW),
    ]
    # Integer unit ids are their decimal strings, as /v1/decide takes them.
    number = next(int(u) for u in map(str, range(400)) if ranker.decide(u).in_experiment)
    numeric = {
        "experiment": "ranker",
        "unit_id": number,
        "variant": ranker.decide(str(number)).variant,
    }
    assert validate_exposures(_body([numeric]), snapshot=snapshot, now=NOW).accepted[0].unit_id == (
        str(number)
    )


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{", 400, None),
        (b'[{"experiment": "ranker"}]', 400, "exposures"),
        (b'{"exposures": {}}', 400, "exposures"),
        (b'{"exposures": [], "extra": 1}', 400, "extra"),
        (b"{}", 400, "exposures"),
        (orjson.dumps({"exposures": [{}] * 3}), 400, "exposures"),
    ],
)
def test_batch_shape(body: bytes, status: int, field: str | None) -> None:
    with pytest.raises(EdgeError) as caught:
        validate_exposures(body, snapshot=RoutingSnapshot.empty(), now=NOW, max_exposures=2)
    assert (caught.value.status, caught.value.field) == (status, field)


# --- through a real edge ------------------------------------------------------------------


@pytest.fixture
def edge(
    transactional_db: None, tmp_path: Path, make_key: Callable[..., str], metrics: Any
) -> Iterator[tuple[ServedEdge, EdgeServer]]:
    """The edge of tests.routing.edge_factories.exposures_edge, and a decide key."""
    _create_running("ranker", overrides={"qa-anna": "v2"})
    env = {"EDGE_REQUIRE_KEY": "true", "SNAPSHOT_REFRESH_S": "0.1", "RECORDER_FLUSH_S": "0.05"}
    with serve_edge("exposures_edge", log=tmp_path / "edge.log", env=env) as served:
        server = EdgeServer(url=served.url, key=make_key("decide"))
        server.sync()
        yield served, server


def _post(server: EdgeServer, body: Any, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/exposures",
        content=orjson.dumps(body),
        headers={"Authorization": f"Bearer {key or server.key}"},
        timeout=10,
    )


def _rows() -> set[tuple[str, str, datetime]]:
    return {
        (row.unit_id, row.variant_key, row.first_seen_at)
        for row in Exposure.objects.filter(experiment__key="ranker")
    }


def _edge_units() -> dict[str, list[str]]:
    route = load_snapshot().route("ranker")
    assert route is not None
    units: dict[str, list[str]] = {}
    for unit in CANDIDATES:
        decision = route.decide(unit)
        units.setdefault(decision.variant, []).append(unit)
    return units


def _wait_for_rows(count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while Exposure.objects.filter(experiment__key="ranker").count() < count:
        assert time.monotonic() < deadline, "the exposures were not written in time"
        time.sleep(0.02)


def test_accepted_exposures_are_recorded_once(edge: tuple[ServedEdge, EdgeServer]) -> None:
    served, server = edge
    units = _edge_units()
    first = datetime(2026, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    exposures = [
        {
            "experiment": "ranker",
            "unit_id": units["v1"][0],
            "variant": "v1",
            "timestamp": first.isoformat(),
        },
        {"experiment": "ranker", "unit_id": units["v2"][0], "variant": "v2"},
    ]
    # Repeated in the batch, and the whole batch sent twice (an SDK retry after a timeout).
    batch = {"exposures": [*exposures, exposures[0], {**exposures[1], "unit_id": "qa-anna"}]}
    for _ in range(2):
        response = _post(server, batch)
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 3, "ignored": 1}
    later = {**exposures[0], "timestamp": (first + timedelta(hours=1)).isoformat()}
    assert _post(server, {"exposures": [later]}).status_code == 202
    _wait_for_rows(2)
    served.stop()
    rows = _rows()
    # Each exposure once, with the timestamp it was first sent with.
    assert {(unit, variant) for unit, variant, _ in rows} == {
        (units["v1"][0], "v1"),
        (units["v2"][0], "v2"),
    }
    assert (units["v1"][0], "v1", first) in rows


def test_a_mismatched_variant_refuses_the_batch(edge: tuple[ServedEdge, EdgeServer]) -> None:
    served, server = edge
    units = _edge_units()
    valid = {"experiment": "ranker", "unit_id": units["v1"][0], "variant": "v1"}
    wrong = {"experiment": "ranker", "unit_id": units["v2"][0], "variant": "v1"}
    response = _post(server, {"exposures": [valid, wrong]})
    error = assert_problem(response, 409, "assignment_conflict", "variant", index=1)
    [entry] = error["errors"]
    assert (entry["index"], entry["field"], entry["code"]) == (1, "variant", "assignment_conflict")
    # A later valid batch is written; the refused batch's valid exposure never is.
    marker = {"experiment": "ranker", "unit_id": units["v2"][1], "variant": "v2"}
    assert _post(server, {"exposures": [marker]}).status_code == 202
    _wait_for_rows(1)
    served.stop()
    assert {(unit, variant) for unit, variant, _ in _rows()} == {(units["v2"][1], "v2")}


def test_keys_methods_and_paths(
    edge: tuple[ServedEdge, EdgeServer], make_key: Callable[..., str]
) -> None:
    _, server = edge
    body = {"exposures": []}
    assert _post(server, body).json() == {"accepted": 0, "ignored": 0}
    assert _post(server, body, key="rk_nope_nope").status_code == 401
    ingest_only = make_key("ingest")
    server.sync()
    forbidden = _post(server, body, key=ingest_only)
    assert_problem(forbidden, 403, "permission_denied")
    headers = {"Authorization": f"Bearer {server.key}"}
    not_allowed = httpx.get(f"{server.url}/v1/exposures", headers=headers)
    assert_problem(not_allowed, 405, "method_not_allowed")
    assert not_allowed.headers["allow"] == "POST"
    assert_problem(httpx.post(f"{server.url}/v1/exposures/x", headers=headers), 404, "not_found")
    too_many = _post(server, {"exposures": [{}] * 10_001})
    assert_problem(too_many, 400, "validation_error", "exposures")
