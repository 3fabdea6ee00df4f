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
from routing.edge import EdgeError
from routing.exposures_api import InvalidExposures, validate_exposures
from routing.models import Exposure
from routing.snapshot import RoutingSnapshot, load_snapshot
from tests.factories import create_experiment
from tests.routing.edge_factories import ServedEdge, serve_edge
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


def _bad_exposures(snapshot: RoutingSnapshot) -> list[tuple[Any, str | None]]:
    units = _units(snapshot, "ranker")
    good = _exposure(snapshot)
    return [
        ("not an object", None),
        ({"unit_id": units["v1"][0], "variant": "v1"}, "experiment"),
        ({**good, "experiment": 42}, "experiment"),
        ({**good, "experiment": "nope"}, "experiment"),
        ({**good, "experiment": "paused"}, "experiment"),
        ({**good, "experiment": "draft"}, "experiment"),
        ({"experiment": "ranker", "variant": "v1"}, "unit_id"),
        ({**good, "unit_id": True}, "unit_id"),
        ({**good, "unit_id": "u" * 201}, "unit_id"),
        ({**good, "unit_id": "a\x00b"}, "unit_id"),
        # Outside the half coverage: the edge serves control and records nothing.
        ({**good, "unit_id": units["out"][0]}, "unit_id"),
        ({"experiment": "ranker", "unit_id": units["v1"][0]}, "variant"),
        ({**good, "variant": "v9"}, "variant"),
        # The unit is in the experiment, but in the other arm.
        ({**good, "variant": "v2"}, "variant"),
        ({**good, "timestamp": "yesterday"}, "timestamp"),
        ({**good, "timestamp": "2026-05-01T12:00:00"}, "timestamp"),
        ({**good, "timestamp": 1_777_636_800_000}, "timestamp"),
        ({**good, "varient": "v1"}, "varient"),
    ]


@pytest.mark.django_db
def test_each_rule_names_the_index_and_the_field(snapshot: RoutingSnapshot) -> None:
    valid = [_exposure(snapshot, "v1", 1), _exposure(snapshot, "v2", 0)]
    for bad, field in _bad_exposures(snapshot):
        with pytest.raises(InvalidExposures) as caught:
            validate_exposures(_body([*valid, bad, valid[0]]), snapshot=snapshot, now=NOW)
        [error] = caught.value.errors
        assert (error.index, error.field) == (2, field), bad
        body = orjson.loads(caught.value.as_body())
        assert body == {
            "error": {
                "code": "invalid_exposure",
                "index": 2,
                "field": field,
                "message": error.message,
                "errors": [{"index": 2, "field": field, "message": error.message}],
            }
        }


@pytest.mark.django_db
def test_every_invalid_exposure_is_listed(snapshot: RoutingSnapshot) -> None:
    good = _exposure(snapshot, "v1")
    wrong_arm = {**good, "variant": "v2"}
    batch = [good, wrong_arm, good, {**good, "experiment": "paused"}, wrong_arm]
    with pytest.raises(InvalidExposures) as caught:
        validate_exposures(_body(batch), snapshot=snapshot, now=NOW)
    assert [(e.index, e.field) for e in caught.value.errors] == [
        (1, "variant"),
        (3, "experiment"),
        (4, "variant"),
    ]
    assert "gets variant 'v1'" in caught.value.errors[0].message


@pytest.mark.django_db
def test_valid_exposures_are_accepted_and_overrides_ignored(snapshot: RoutingSnapshot) -> None:
    ranker = snapshot.route("ranker")
    assert ranker is not None
    later = NOW - timedelta(minutes=5)
    batch = [
        _exposure(snapshot, "v1"),
        {**_exposure(snapshot, "v2"), "timestamp": "2026-05-01T13:55:00+02:00"},
        {**_exposure(snapshot, "v2", 1), "timestamp": later.timestamp()},
        # In the future: the edge cannot receive an exposure before it happened.
        {**_exposure(snapshot, "v1", 1), "timestamp": (NOW + timedelta(hours=1)).isoformat()},
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
        (orjson.dumps({"exposures": [{}] * 3}), 413, "exposures"),
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
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["index"], error["field"]) == ("invalid_exposure", 1, "variant")
    assert error["errors"] == [{"index": 1, "field": "variant", "message": error["message"]}]
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
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "forbidden"
    headers = {"Authorization": f"Bearer {server.key}"}
    assert httpx.get(f"{server.url}/v1/exposures", headers=headers).status_code == 405
    assert httpx.post(f"{server.url}/v1/exposures/x", headers=headers).status_code == 404
    too_many = _post(server, {"exposures": [{}] * 10_001})
    assert (too_many.status_code, too_many.json()["error"]["code"]) == (413, "too_large")
