"""Input drift at the proxy: sampled users' watched request fields, once per user and window."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from experiments.input_windows import SCALE, InputWindows, unit_hash
from routing.models import InputDriftBucket
from routing.observe.inputs import MAX_CELLS, OTHER, InputRecorder, counts_of
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


# Windows that started at the epoch and never end: every sampled user is monitored.
FOREVER = InputWindows(reference=None, started=0.0, window_s=1e12)
CATEGORY = (InputField("c", "category", None),)


def _plan(rate: float = 1.0, windows: InputWindows = FOREVER, max_users: int = 1000) -> InputPlan:
    return InputPlan(7, CATEGORY, rate, 60.0, windows, max_users)


def _counted(recorder: InputRecorder) -> dict[str, int]:
    merged: dict[str, int] = {}
    for cells in counts_of(recorder.take()).values():
        for cell, n in cells.items():
            merged[cell] = merged.get(cell, 0) + n
    return merged


def _users_counted(plan: InputPlan, recorder: InputRecorder, units: list[str]) -> set[str]:
    """The units whose request `plan` counts (the body names the unit), 40 per bucket read."""
    counted: set[str] = set()
    for start in range(0, len(units), 40):
        for unit in units[start : start + 40]:
            plan.capture(orjson.dumps({"c": unit}), unit, recorder)
        counted |= set(_counted(recorder))
    return counted


def test_a_field_keeps_at_most_max_cells_per_bucket_and_requests_without_a_unit_do_not_count() -> (
    None
):
    recorder = InputRecorder(flush_s=60)
    plan = _plan()
    for index in range(MAX_CELLS + 20):
        plan.capture(orjson.dumps({"c": f"v{index}"}), f"u{index}", recorder)
    plan.capture(b"<html>", "not-json", recorder)
    plan.capture(b"{}", "empty", recorder)
    plan.capture(b'{"c": "v0"}', None, recorder)
    (cells,) = counts_of(recorder.take()).values()
    assert len(cells) == MAX_CELLS + 1 and cells[OTHER] == 20 + 2
    assert sum(cells.values()) == MAX_CELLS + 22
    assert recorder.buffered == 0


def test_a_user_counts_once_per_window_with_its_first_request() -> None:
    recorder = InputRecorder(flush_s=60)
    plan = _plan()
    for value in ("first", "second", "third"):
        plan.capture(orjson.dumps({"c": value}), "sticky", recorder)
    plan.capture(b'{"c": "other user"}', "light", recorder)
    assert _counted(recorder) == {"first": 1, "other user": 1}
    # A new window: the same user counts again, once.
    assert recorder.first_in_window(7, "next", unit_hash("sticky"), 10)
    assert not recorder.first_in_window(7, "next", unit_hash("sticky"), 10)
    assert recorder.first_in_window(8, "next", unit_hash("sticky"), 10)  # per experiment
    now = time.time()
    short = InputWindows(reference=None, started=now - 120.0, window_s=60.0)
    plan = _plan(windows=short)
    plan.capture(b'{"c": "again"}', "sticky", recorder)
    plan.capture(b'{"c": "and again"}', "sticky", recorder)
    assert _counted(recorder) == {"again": 1}


def test_sampling_selects_users_by_their_hash() -> None:
    recorder = InputRecorder(flush_s=60)
    plan = _plan(rate=0.3, max_users=100_000)
    units = [f"user-{i}" for i in range(5000)]
    counted = _users_counted(plan, recorder, units)
    expected = {u for u in units if unit_hash(u) < 0.3 * SCALE}
    assert counted == expected and 1350 < len(counted) < 1650
    # A sampled user's later requests are not counted again.
    assert _users_counted(plan, recorder, units) == set()
    # A second process (a new recorder) samples the same users.
    other = InputRecorder(flush_s=60)
    assert _users_counted(_plan(rate=0.3, max_users=100_000), other, units) == expected


def test_a_pinned_reference_s_users_and_the_monitored_users_are_disjoint_halves() -> None:
    now = time.time()
    recorder = InputRecorder(flush_s=60)
    monitoring = _plan(
        windows=InputWindows(reference=(now - 7200, now - 3600), started=0.0, window_s=3600.0),
        max_users=100_000,
    )
    referencing = _plan(
        windows=InputWindows(reference=(now - 60, now + 3600), started=0.0, window_s=7200.0),
        max_users=100_000,
    )
    units = [f"user-{i}" for i in range(4000)]
    monitored = _users_counted(monitoring, recorder, units)
    referenced = _users_counted(referencing, recorder, units)
    assert not monitored & referenced and monitored | referenced == set(units)
    assert monitored == {u for u in units if unit_hash(u) >= SCALE / 2}


def test_past_the_cap_a_window_s_later_new_users_are_dropped_and_counted() -> None:
    def dropped() -> float:
        value = REGISTRY.get_sample_value(
            "rampart_input_drift_dropped_total", {"cause": "users_cap"}
        )
        return value or 0.0

    before = dropped()
    recorder = InputRecorder(flush_s=60)
    plan = _plan(max_users=3)
    for index in range(5):
        plan.capture(orjson.dumps({"c": f"v{index}"}), f"u{index}", recorder)
    plan.capture(b'{"c": "v0 again"}', "u0", recorder)  # seen: not a new user, not dropped
    assert _counted(recorder) == {"v0": 1, "v1": 1, "v2": 1}
    assert dropped() - before == 2


@pytest.mark.django_db(transaction=True)
def test_the_proxy_counts_watched_fields_and_writes_them_on_shutdown(
    settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0
    key = make_key("decide")
    # A reference window that has ended: the requests fall in monitoring window 1.
    hour = datetime.now(UTC) - timedelta(hours=1)
    reference = {
        "type": "window",
        "start": (hour - timedelta(hours=1)).isoformat(),
        "end": hour.isoformat(),
    }
    experiment_id = make_experiment(
        "watched",
        [("v1", servers["control"].url, 0.5), ("v2", servers["control"].url, 0.5)],
        input_drift={**FIELDS, "reference": reference},
    )
    # Users of the monitored half (the upper half of the hash) and one of the reference's.
    units = [f"u{i}" for i in range(40) if unit_hash(f"u{i}") >= SCALE / 2][:4]
    referenced = next(f"u{i}" for i in range(40) if unit_hash(f"u{i}") < SCALE / 2)
    bodies = [
        {"amount": 120.0, "user": {"country": "DE"}, "score": 0.7},
        {"amount": 130.0, "user": {"country": "FR"}, "score": 0.95},
        {"amount": "lots", "score": 0.1},
    ]

    async def scenario() -> None:
        async with running_edge(key) as running:
            for unit, body in zip(units, bodies, strict=False):
                answer = await running.client.post(
                    "/proxy/watched/p",
                    content=orjson.dumps(body),
                    headers={"X-Rampart-Unit": unit},
                )
                assert answer.status_code == 200
            # Not counted: a user's second request, a reference user, a request without a unit.
            for unit in (units[0], referenced, None):
                answer = await running.client.post(
                    "/proxy/watched/p",
                    content=orjson.dumps({"amount": 1e5, "user": {"country": "IT"}}),
                    headers={} if unit is None else {"X-Rampart-Unit": unit},
                )
                assert answer.status_code == 200
            await running.client.post(
                "/proxy/watched/p", content=b"not json", headers={"X-Rampart-Unit": units[3]}
            )

    run(scenario)
    merged: dict[str, dict[str, int]] = {}
    for row in InputDriftBucket.objects.filter(experiment_id=experiment_id):
        for cell, n in orjson.loads(row.counts).items():
            found = merged.setdefault(row.field_path, {})
            found[cell] = found.get(cell, 0) + n
    assert merged["amount"] == {"+8": 2, "(wrong_type)": 1, "(not_json)": 1}
    assert merged["user.country"] == {"DE": 1, "FR": 1, "(missing)": 1, "(not_json)": 1}
    assert merged["score"] == {"1": 1, "2": 1, "0": 1, "(not_json)": 1}
