"""The proxy's remembered decisions are the route's own, and their memory is bounded."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from experiments import services
from routing.edge.context import EdgeContext
from routing.proxy import plan as proxy_plan
from routing.proxy.app import ProxyApp
from routing.snapshot import load_snapshot
from tests.factories import create_experiment

pytestmark = pytest.mark.django_db

UNITS = [f"user-{i}" for i in range(3000)] + ["qa-anna"]


def plan_and_route(key: str) -> tuple[Any, Any]:
    snapshot = load_snapshot()
    app = ProxyApp(EdgeContext.from_settings())
    plan = app.plans.get(snapshot, key)
    assert plan is not None
    return plan, snapshot.route(key)


def expected(plan: Any, route: Any, unit: str | None) -> tuple[Any, bool, str]:
    decision = route.decide(unit)
    return plan.arms[decision.variant], decision.in_experiment, decision.reason


def test_remembered_decisions_equal_the_routes_for_every_reason(
    metrics: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_experiment("covered", "ab")
    services.experiment_update(
        actor="test",
        key="covered",
        coverage=0.5,
        overrides={"qa-anna": "v2"},
        namespace=("search", 0.0, 0.5),
    )
    services.experiment_start(actor="test", key="covered")
    plan, route = plan_and_route("covered")
    monkeypatch.setattr(proxy_plan, "MAX_REMEMBERED_UNITS", 1000)
    reasons = set()
    for unit in UNITS * 2:  # the second pass answers from memory (and past the bound)
        outcome = plan.decide(unit)
        assert outcome == expected(plan, route, unit)
        reasons.add(outcome[2])
    assert reasons == {"assigned", "override", "not_in_coverage", "not_in_namespace"}
    assert plan.decide(None) == expected(plan, route, None)
    assert len(plan.decided) <= 1000
    # Strings and ints only: the cyclic garbage collector never walks this memory.
    assert not gc.is_tracked(plan.decided)


def test_a_new_snapshot_starts_a_new_memory(metrics: Any) -> None:
    create_experiment("ramped", "ab")
    services.experiment_start(actor="test", key="ramped")
    app = ProxyApp(EdgeContext.from_settings())
    first = app.plans.get(load_snapshot(), "ramped")
    assert first is not None
    assert {first.decide(unit)[0].key for unit in UNITS} == {"v1", "v2"}
    services.experiment_update(actor="test", key="ramped", weights={"v1": 0.0, "v2": 1.0})
    second = app.plans.get(load_snapshot(), "ramped")
    assert second is not None and second is not first
    assert not second.decided
    assert {second.decide(unit)[0].key for unit in UNITS} == {"v2"}
