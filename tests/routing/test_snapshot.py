"""Routing snapshot: decisions per status, specs from experiments, key checks, refresh."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from experiments import services
from rampart_sdk.assignment import assign, build_assignment_spec
from rampart_sdk.canary import build_canary_spec
from rampart_sdk.hashing import bucket
from routing.snapshot import RoutingSnapshot, SnapshotHolder, load_snapshot
from tests.factories import create_experiment

pytestmark = pytest.mark.django_db

UNITS = [f"user-{i}" for i in range(4000)]


def _ab(key: str = "search-ab", **extra: Any) -> None:
    create_experiment(key, "ab", **extra)
    services.experiment_start(actor="test", key=key)


def _canary(key: str = "ranker-v2") -> None:
    create_experiment(key, "canary")
    services.experiment_start(actor="test", key=key)


def test_empty_snapshot_is_not_loaded() -> None:
    snapshot = RoutingSnapshot.empty()
    assert not snapshot.loaded
    assert snapshot.route("anything") is None
    assert list(snapshot.routes()) == []


def test_ab_decisions_match_the_assignment_module(metrics: Any) -> None:
    _ab()
    route = load_snapshot().route("search-ab")
    assert route is not None
    # The same configuration built directly through rampart_sdk.assignment, the reference the
    # SDK's local evaluation also follows.
    spec = build_assignment_spec(
        experiment_key="search-ab", variant_keys=["v1", "v2"], weights=[0.5, 0.5]
    )
    for unit in UNITS:
        decision = route.decide(unit)
        expected = assign(spec, unit)
        assert decision.variant == expected.variant_key
        assert decision.reason == "assigned"
        assert decision.in_experiment
    served = Counter(route.decide(unit).variant for unit in UNITS)
    assert 1800 < served["v1"] < 2200
    assert route.decide("user-1").upstream in ("http://127.0.0.1:9001", "http://127.0.0.1:9002")


def test_canary_serves_the_current_ramp_share(metrics: Any) -> None:
    _canary()
    route = load_snapshot().route("ranker-v2")
    assert route is not None
    assert route.view.canary_share == 0.01
    spec = build_canary_spec(
        experiment_key="ranker-v2", variant_keys=["v1", "v2"], canary_shares=[0.01]
    )
    canary_units = {u for u in UNITS if assign(spec, u).variant_key == "v2"}
    assert {u for u in UNITS if route.decide(u).variant == "v2"} == canary_units
    # GrowthBook's two-variation layout puts the canary at [1 - s, 1): check one unit by its
    # raw hash, independently of the spec.
    for unit in UNITS[:200]:
        in_canary = bucket(seed="ranker-v2", unit_id=unit, version=2) >= 0.99
        assert (route.decide(unit).variant == "v2") == in_canary

    services.experiment_advance_ramp(actor="test", key="ranker-v2")
    wider = load_snapshot().route("ranker-v2")
    assert wider is not None and wider.view.canary_share == 0.05
    wider_units = {u for u in UNITS if wider.decide(u).variant == "v2"}
    # Ramp property: everyone in the 1% canary stays in it at 5%.
    assert canary_units <= wider_units
    assert len(wider_units) > len(canary_units)


def test_status_decides_before_the_hash(metrics: Any) -> None:
    _canary("paused-one")
    services.experiment_pause(actor="test", key="paused-one")
    _canary("rolled")
    services.experiment_rollback(actor="test", key="rolled", reason="p95 latency up")
    _canary("done")
    services.experiment_complete(actor="test", key="done", winner_key="v2")
    create_experiment("still-draft", "ab")
    snapshot = load_snapshot()

    def decide(key: str) -> tuple[str, str, bool]:
        route = snapshot.route(key)
        assert route is not None
        decision = route.decide("user-7")
        return decision.variant, decision.reason, decision.in_experiment

    assert decide("paused-one") == ("v1", "not_running", False)
    assert decide("rolled") == ("v1", "rolled_back_to_control", False)
    assert decide("done") == ("v2", "completed", False)
    assert decide("still-draft") == ("v1", "not_running", False)


def test_missing_unit_gets_control(metrics: Any) -> None:
    _ab()
    route = load_snapshot().route("search-ab")
    assert route is not None
    decision = route.decide(None)
    assert (decision.variant, decision.reason, decision.in_experiment) == ("v1", "no_unit", False)


def test_overrides_coverage_and_namespace(metrics: Any) -> None:
    create_experiment("covered", "ab")
    services.experiment_update(
        actor="test",
        key="covered",
        coverage=0.5,
        overrides={"qa-anna": "v2"},
        namespace=("search", 0.0, 0.5),
    )
    services.experiment_start(actor="test", key="covered")
    route = load_snapshot().route("covered")
    assert route is not None
    anna = route.decide("qa-anna")
    assert (anna.variant, anna.reason, anna.in_experiment) == ("v2", "override", False)
    reasons = Counter(route.decide(unit).reason for unit in UNITS)
    # Half the units fall outside the namespace slice and half of the rest outside coverage.
    assert 1800 < reasons["not_in_namespace"] < 2200
    assert 800 < reasons["not_in_coverage"] < 1200
    assert (
        reasons["assigned"] == len(UNITS) - reasons["not_in_namespace"] - reasons["not_in_coverage"]
    )
    for unit in UNITS[:500]:
        decision = route.decide(unit)
        if decision.reason != "assigned":
            assert decision.variant == "v1"
            assert not decision.in_experiment


def test_shadow_variants_get_no_traffic(metrics: Any) -> None:
    variants = [
        {"key": "v1", "upstream_url": "http://127.0.0.1:9001", "weight": 0.5, "is_control": True},
        {"key": "v2", "upstream_url": "http://127.0.0.1:9002", "weight": 0.5},
        {"key": "v3", "upstream_url": "http://127.0.0.1:9003", "weight": 0.0, "is_shadow": True},
    ]
    _ab(variants=variants)
    route = load_snapshot().route("search-ab")
    assert route is not None
    assert [v.key for v in route.shadows] == ["v3"]
    assert {route.decide(unit).variant for unit in UNITS[:1000]} == {"v1", "v2"}
    entry = route.config_entry()
    assert [v["key"] for v in entry["variants"]] == ["v1", "v2"]
    assert entry["shadows"] == [{"key": "v3", "upstream": "http://127.0.0.1:9003"}]


def test_key_check_uses_hashes_and_scopes(make_key: Callable[..., str]) -> None:
    decide_key = make_key("decide")
    ingest_key = make_key("ingest")
    revoked = make_key("decide")
    services.api_key_revoke(actor="test", prefix=revoked.split("_")[1])
    snapshot = load_snapshot()
    assert snapshot.check_key(decide_key, "decide").ok
    assert snapshot.check_key(ingest_key, "decide").status == 403
    assert snapshot.check_key(revoked, "decide").status == 401
    assert snapshot.check_key(None, "decide").status == 401
    assert snapshot.check_key("rk_nope_x", "decide").status == 401
    assert snapshot.check_key("not-a-key", "decide").status == 401
    # The right prefix with a wrong secret must fail too.
    assert snapshot.check_key(decide_key + "x", "decide").status == 401


def test_config_document_has_no_secrets_and_a_stable_etag(
    metrics: Any, make_key: Callable[..., str]
) -> None:
    make_key("decide")
    _ab(slack_webhook_url="https://hooks.example.com/services/T/B/secret")
    snapshot = load_snapshot()
    body, etag = snapshot.config_document()
    assert b"secret" not in body and b"key_hash" not in body
    again_body, again_etag = load_snapshot().config_document()
    assert (again_body, again_etag) == (body, etag)
    services.experiment_update(actor="test", key="search-ab", weights={"v1": 0.9, "v2": 0.1})
    assert load_snapshot().config_document()[1] != etag


def test_holder_rebuilds_only_when_the_version_changes(metrics: Any) -> None:
    _ab()
    holder = SnapshotHolder(refresh_s=0.05)
    first = holder.refresh_now()
    assert holder.current is first
    assert holder.check_now() is False
    assert holder.current is first
    services.experiment_pause(actor="test", key="search-ab")
    assert holder.check_now() is True
    route = holder.current.route("search-ab")
    assert route is not None and route.decide("u").reason == "not_running"
    assert holder.current.version > first.version


def test_holder_keeps_serving_when_a_refresh_fails() -> None:
    calls: list[int] = []

    def flaky_version() -> int:
        calls.append(1)
        raise RuntimeError("database unreachable")

    snapshot = RoutingSnapshot(version=3, views=(), api_keys=())
    holder = SnapshotHolder(refresh_s=0.01, loader=lambda: snapshot, version_reader=flaky_version)

    async def run() -> None:
        await holder.start()
        # Until two checks failed, however long a loaded machine takes (a fixed 0.1 s once
        # saw none).
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert holder.current is snapshot
        await holder.stop()

    asyncio.run(run())
    assert len(calls) >= 2
