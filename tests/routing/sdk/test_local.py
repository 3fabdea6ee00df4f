"""Local evaluation: conditional polling of /v1/config, config changes, edge-equal errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any

import httpx
import pytest

from experiments import services
from rampart_sdk import (
    AsyncLocalEvaluator,
    BadRequestError,
    Client,
    Decision,
    ExperimentNotFoundError,
    LocalEvaluator,
    NotFoundError,
    RampartError,
)
from rampart_sdk.local_config import LocalConfig
from tests.factories import create_experiment
from tests.processes import ROOT
from tests.routing.sdk.conftest import EdgeServer

UNITS = [f"user-{n}" for n in range(300)]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_polls_with_etags_and_follows_config_changes(edge: EdgeServer, metrics: Any) -> None:
    create_experiment("ranker-v2", "ab")
    services.experiment_start(actor="test", key="ranker-v2")
    first_version = edge.sync()
    with (
        Client(edge.url, edge.key) as client,
        LocalEvaluator(edge.url, edge.key, refresh_s=0.02) as evaluator,
    ):
        assert evaluator.version == first_version and evaluator.etag
        # An unchanged config is answered 304 and not downloaded again.
        _wait_for(lambda: evaluator.stats.not_modified >= 3)
        assert evaluator.stats.fetched == 1 and evaluator.stats.failed == 0
        assert [evaluator.decide("ranker-v2", u) for u in UNITS] == client.decide_many(
            "ranker-v2", UNITS
        )
        assert evaluator.experiments == ["ranker-v2"]
        assert evaluator.decide_all("user-1") == client.decide_all("user-1")

        services.experiment_update(actor="test", key="ranker-v2", weights={"v1": 1.0, "v2": 0.0})
        weights_version = edge.sync()
        _wait_for(lambda: evaluator.version == weights_version)
        assert evaluator.stats.fetched == 2
        assert {evaluator.decide("ranker-v2", u).variant for u in UNITS} == {"v1"}

        services.experiment_rollback(actor="test", key="ranker-v2", reason="test", evidence={})
        rollback_version = edge.sync()
        _wait_for(lambda: evaluator.version == rollback_version)
        local = evaluator.decide("ranker-v2", "user-1")
        assert local == client.decide("ranker-v2", "user-1")
        assert (local.variant, local.reason, local.in_experiment) == (
            "v1",
            "rolled_back_to_control",
            False,
        )
        assert evaluator.decide_all("user-1") == {}

    async def run_async() -> list[Decision]:
        async with AsyncLocalEvaluator(edge.url, edge.key, refresh_s=0.02) as evaluator:
            assert evaluator.version == rollback_version
            deadline = time.monotonic() + 10
            while evaluator.stats.not_modified < 1:
                assert time.monotonic() < deadline, "no conditional poll was answered"
                await asyncio.sleep(0.01)
            assert evaluator.stats.fetched == 1
            return [evaluator.decide("ranker-v2", u) for u in UNITS[:10]]

    with Client(edge.url, edge.key) as client:
        assert asyncio.run(run_async()) == client.decide_many("ranker-v2", UNITS[:10])


def _document(**entry: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 1,
        "key": "exp",
        "kind": "ab",
        "status": "running",
        "seed": "exp",
        "hash_version": 2,
        "unit_source": "header",
        "unit_attribute": "X-Rampart-Unit",
        "coverage": 1.0,
        "namespace": None,
        "control": "a",
        "canary_share": None,
        "ramp_position": None,
        "winner": None,
        "variants": [
            {
                "key": "a",
                "weight": 0.5,
                "is_control": True,
                "upstream": "http://a",
                "ranges": [[0.0, 0.5]],
            },
            {
                "key": "b",
                "weight": 0.5,
                "is_control": False,
                "upstream": "http://b",
                "ranges": [[0.5, 1.0]],
            },
        ],
        "shadows": [{"key": "s", "upstream": "http://s"}],
        "overrides": {"qa": "b"},
        "fixed": None,
    }
    base.update(entry)
    return {"format": 1, "version": 3, "experiments": [base]}


def _evaluator(document: dict[str, Any]) -> LocalEvaluator:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json=document, headers={"ETag": '"3-x"'})
    )
    return LocalEvaluator("http://edge", "rk_a_b", transport=transport).start()


def test_unit_and_experiment_errors_are_the_edges() -> None:
    evaluator = _evaluator(_document())
    try:
        with pytest.raises(ExperimentNotFoundError) as missing:
            evaluator.decide("nope", "u")
        assert (missing.value.status, missing.value.field) == (404, "experiment")
        assert missing.value.code == "experiment_not_found"
        assert isinstance(missing.value, NotFoundError)
        for unit in ("", None, True, 1.5, "x" * 201):
            with pytest.raises(BadRequestError) as bad:
                evaluator.decide("exp", unit)  # type: ignore[arg-type]
            assert (bad.value.field, bad.value.code) == ("unit", "validation_error")
        assert evaluator.decide("exp", 42) == evaluator.decide("exp", "42")
        override = evaluator.decide("exp", "qa")
        assert (override.variant, override.reason, override.in_experiment) == (
            "b",
            "override",
            False,
        )
    finally:
        evaluator.close()


def test_fixed_and_unbuildable_experiments() -> None:
    fixed = LocalConfig(
        _document(status="completed", fixed={"variant": "b", "reason": "completed"})
    )
    decision = fixed.routes["exp"].decide("u-1")
    assert decision == Decision("exp", "u-1", "b", False, "completed", "http://b")
    assert hash(decision) == hash(Decision("exp", "u-1", "b", False, "completed", "http://b"))
    with pytest.raises(FrozenInstanceError):
        decision.variant = "a"  # type: ignore[misc]
    # Ranges that do not match the weights cannot be evaluated: control, as the edge does.
    broken = LocalConfig(_document(coverage=0.5))
    assert broken.routes["exp"].decide("u-1").reason == "invalid_config"
    assert not broken.routes["exp"].is_running
    with pytest.raises(RampartError, match="format"):
        LocalConfig({"format": 2, "version": 1, "experiments": []})
    with pytest.raises(RampartError, match="start"):
        LocalEvaluator("http://edge", "rk_a_b").decide("exp", "u")


def test_the_sdk_imports_no_server_code() -> None:
    probe = (
        "import sys, rampart_sdk\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('django', 'rest_framework', 'experiments', 'config', 'analysis', 'celery', 'psycopg')"
        " or m.split('.')[0] == 'routing')\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
