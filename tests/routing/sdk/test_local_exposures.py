"""Exposures of local decisions: what reaches the edge, once, and what the edge records.

The queue, dedup, refusals and failures are checked against a stand-in edge (httpx's
MockTransport); the records against a real uvicorn edge, where locally decided units must
produce exactly the Exposure rows the edge writes when it decides the same units itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from experiments import services
from rampart_sdk import (
    AsyncLocalEvaluator,
    AuthenticationError,
    Client,
    ExposureResult,
    LocalEvaluator,
    NotFoundError,
    RetryPolicy,
    ServerError,
)
from routing.models import Exposure
from tests.routing.edge_factories import ServedEdge, serve_edge
from tests.routing.sdk.conftest import EdgeServer

UNITS = [f"user-{number}" for number in range(1000)]
NO_WAIT = RetryPolicy(max_retries=1, backoff_base_s=0.0, backoff_cap_s=0.0)


def _document() -> dict[str, Any]:
    """A /v1/config document: "exp", an even A/B test over 80% of units, one override."""
    return {
        "format": 1,
        "version": 1,
        "experiments": [
            {
                "id": 1,
                "key": "exp",
                "kind": "ab",
                "status": "running",
                "seed": "exp",
                "hash_version": 2,
                "unit_source": "header",
                "unit_attribute": "X-Rampart-Unit",
                "coverage": 0.8,
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
                        "ranges": [[0.0, 0.4]],
                    },
                    {
                        "key": "b",
                        "weight": 0.5,
                        "is_control": False,
                        "upstream": "http://b",
                        "ranges": [[0.5, 0.9]],
                    },
                ],
                "shadows": [],
                "overrides": {"qa-anna": "b"},
                "fixed": None,
            }
        ],
    }


@dataclass
class StandInEdge:
    """Serves the config and takes exposures; ``answers`` scripts the exposure answers."""

    answers: list[Callable[[list[dict[str, Any]]], httpx.Response]] = field(default_factory=list)
    batches: list[list[dict[str, Any]]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/config":
            return httpx.Response(200, json=_document(), headers={"ETag": '"1"'})
        exposures = orjson.loads(request.content)["exposures"]
        self.batches.append(exposures)
        if self.answers:
            return self.answers.pop(0)(exposures)
        return _accept(exposures)

    @property
    def sent(self) -> list[tuple[str, str, str]]:
        return [(e["experiment"], e["unit_id"], e["variant"]) for b in self.batches for e in b]

    def evaluator(self, **options: Any) -> LocalEvaluator:
        evaluator = LocalEvaluator(
            "http://edge", "rk_test", transport=httpx.MockTransport(self), retry=NO_WAIT, **options
        )
        evaluator.refresh()
        return evaluator


def _accept(exposures: list[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(202, json={"accepted": len(exposures), "ignored": 0})


def _refuse(*indexes: int) -> Callable[[list[dict[str, Any]]], httpx.Response]:
    def answer(exposures: list[dict[str, Any]]) -> httpx.Response:
        errors = [
            {"index": i, "field": "variant", "code": "assignment_conflict", "message": "not its"}
            for i in indexes
        ]
        problem = {
            "type": "urn:rampart:problem:assignment_conflict",
            "title": "Assignment conflict",
            "status": 409,
            "detail": "exposure: not its variant",
            "code": "assignment_conflict",
            "field": "variant",
            "index": indexes[0],
            "errors": errors,
        }
        return httpx.Response(409, json=problem)

    return answer


def _status(status: int) -> Callable[[list[dict[str, Any]]], httpx.Response]:
    return lambda exposures: httpx.Response(status, json={"error": {"code": "x", "message": ""}})


def _units_in(edge: StandInEdge, units: list[str]) -> list[str]:
    """The units of ``units`` in the experiment, found without queuing anything."""
    with edge.evaluator(track_exposures=False) as evaluator:
        return [unit for _, unit, _ in _in_experiment(evaluator, units)]


def _in_experiment(evaluator: LocalEvaluator, units: list[str]) -> list[tuple[str, str, str]]:
    decisions = [evaluator.decide("exp", unit) for unit in units]
    return [(d.experiment, d.unit, d.variant) for d in decisions if d.in_experiment]


# --- against a stand-in edge --------------------------------------------------------------


def test_each_exposure_is_sent_once_with_the_time_of_its_decision() -> None:
    edge = StandInEdge()
    evaluator = edge.evaluator(exposure_batch_size=300)
    started = time.time()
    expected = _in_experiment(evaluator, UNITS[:500])
    decided = time.time()
    # Decided again before and after the flush, and an overridden unit (never counted).
    for unit in [*UNITS[:500], "qa-anna"]:
        evaluator.decide("exp", unit)
    assert 0 < len(expected) < 500
    result = evaluator.flush()
    assert result == ExposureResult(accepted=len(expected))
    assert edge.sent == expected
    assert [len(batch) for batch in edge.batches] == [300, len(expected) - 300]
    assert all(started <= e["timestamp"] <= decided for b in edge.batches for e in b)
    for unit in UNITS[:500]:
        evaluator.decide("exp", unit)
    assert evaluator.exposure_stats.buffered == 0
    assert evaluator.flush() == ExposureResult()
    assert len(edge.batches) == 2
    evaluator.close()
    stats = evaluator.exposure_stats
    assert (stats.accepted, stats.dropped, stats.rejected) == (len(expected), 0, 0)


def test_the_remembered_units_are_bounded_least_recent_forgotten_first() -> None:
    edge = StandInEdge()
    evaluator = edge.evaluator(exposure_cache_size=100, exposure_batch_size=10)
    units = _units_in(edge, UNITS)[:120]
    for unit in units:
        evaluator.decide("exp", unit)
        # A hot unit, decided all along, stays remembered.
        evaluator.decide("exp", units[0])
    evaluator.flush()
    assert sorted(unit for _, unit, _ in edge.sent) == sorted(units)
    seen = evaluator._exposures.seen_units("exp")  # type: ignore[union-attr]
    assert len(seen.recent) + len(seen.older) <= 100
    # Generations of 50 units: the first one (units 0-49) was forgotten when units 50-98
    # filled the second, which is the older one now; the hot unit moved along each time.
    for unit in [*units[40:60], units[0]]:
        evaluator.decide("exp", unit)
    evaluator.flush()
    assert [unit for _, unit, _ in edge.sent[120:]] == units[40:50]
    evaluator.close()


def test_refused_exposures_are_dropped_and_the_rest_sent_at_once() -> None:
    edge = StandInEdge(answers=[_refuse(1, 3)])
    evaluator = edge.evaluator()
    expected = _in_experiment(evaluator, UNITS[:10])
    result = evaluator.flush()
    assert result == ExposureResult(accepted=len(expected) - 2, rejected=2)
    first, second = edge.batches
    assert second == [e for i, e in enumerate(first) if i not in (1, 3)]
    assert evaluator.exposure_stats.rejected == 2
    evaluator.close()


def test_a_failed_batch_is_kept_and_sent_once_later() -> None:
    # Two 503s: the request and its one retry.
    edge = StandInEdge(answers=[_status(503), _status(503)])
    evaluator = edge.evaluator(exposure_batch_size=5)
    expected = _in_experiment(evaluator, UNITS[:20])
    with pytest.raises(ServerError):
        evaluator.flush()
    assert evaluator.exposure_stats.buffered == len(expected)
    # Decided again while waiting: still sent once.
    _in_experiment(evaluator, UNITS[:20])
    assert evaluator.flush().accepted == len(expected)
    # After the refused first batch (sent twice, with its retry), each exposure once.
    assert sorted(edge.sent[10:]) == sorted(expected)
    evaluator.close()


def test_a_full_queue_drops_new_exposures_and_queues_them_when_decided_again() -> None:
    edge = StandInEdge()
    evaluator = edge.evaluator(exposure_batch_size=2, max_buffered_exposures=4)
    expected = _in_experiment(evaluator, UNITS[:20])
    assert evaluator.exposure_stats.buffered == 4
    assert evaluator.exposure_stats.dropped == len(expected) - 4
    evaluator.flush()
    _in_experiment(evaluator, UNITS[:20])
    evaluator.flush()
    assert edge.sent == expected[:8]
    evaluator.close()


def test_an_edge_without_the_exposures_api_turns_reporting_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge = StandInEdge(answers=[_status(404)])
    evaluator = edge.evaluator()
    first = _in_experiment(evaluator, UNITS[:20])
    with caplog.at_level(logging.ERROR, logger="rampart_sdk"), pytest.raises(NotFoundError):
        evaluator.flush()
    later = _in_experiment(evaluator, UNITS[20:40])
    assert evaluator.flush() == ExposureResult()
    evaluator.close()
    assert len(edge.batches) == 1
    assert evaluator.exposure_stats.dropped == len(first) + len(later)
    assert sum("does not serve" in r.message for r in caplog.records) == 1


def test_close_sends_what_is_left_and_logs_instead_of_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge = StandInEdge()
    with edge.evaluator() as evaluator:
        expected = _in_experiment(evaluator, UNITS[:50])
    assert sorted(edge.sent) == sorted(expected)

    # The same refusal raises from flush(), and is logged by close().
    refusing = StandInEdge(answers=[_status(401), _status(401)]).evaluator()
    queued = _in_experiment(refusing, UNITS[:50])
    with pytest.raises(AuthenticationError):
        refusing.flush()
    queued += _in_experiment(refusing, UNITS[50:100])
    with caplog.at_level(logging.ERROR, logger="rampart_sdk"):
        refusing.close()
    assert refusing.exposure_stats.dropped == len(queued)
    assert sum("not sent at close" in r.message for r in caplog.records) == 1


def test_without_tracking_nothing_is_queued_and_decisions_are_the_same() -> None:
    edge = StandInEdge()
    tracked = edge.evaluator()
    untracked = edge.evaluator(track_exposures=False)
    assert [untracked.decide("exp", u) for u in UNITS] == [tracked.decide("exp", u) for u in UNITS]
    assert untracked.flush() == ExposureResult()
    untracked.close()
    assert edge.batches == []
    tracked.close()


def test_the_background_flusher_sends_on_time_and_when_a_batch_is_full() -> None:
    edge = StandInEdge()
    transport = httpx.MockTransport(edge)
    with LocalEvaluator(
        "http://edge", "rk_test", transport=transport, exposure_flush_interval_s=0.05
    ) as evaluator:
        expected = _in_experiment(evaluator, UNITS[:5])
        _wait_for(lambda: len(edge.sent) == len(expected))
    edge = StandInEdge()
    units = _units_in(edge, UNITS)[:10]
    with LocalEvaluator(
        "http://edge",
        "rk_test",
        transport=httpx.MockTransport(edge),
        exposure_flush_interval_s=60,
        exposure_batch_size=10,
    ) as evaluator:
        # Decided in another thread: the tenth exposure wakes the flusher all the same.
        thread = threading.Thread(target=lambda: [evaluator.decide("exp", u) for u in units])
        thread.start()
        thread.join()
        _wait_for(lambda: len(edge.sent) == 10)


def test_the_async_evaluator_reports_exposures_too() -> None:
    edge = StandInEdge()

    async def run() -> list[tuple[str, str, str]]:
        async with AsyncLocalEvaluator(
            "http://edge",
            "rk_test",
            transport=httpx.MockTransport(edge),
            exposure_flush_interval_s=0.05,
        ) as evaluator:
            decisions = [evaluator.decide("exp", unit) for unit in UNITS[:100]]
            expected = [(d.experiment, d.unit, d.variant) for d in decisions if d.in_experiment]
            deadline = time.monotonic() + 10
            while len(edge.sent) < len(expected):
                assert time.monotonic() < deadline, "the flusher did not send in time"
                await asyncio.sleep(0.01)
            for unit in UNITS[100:200]:
                evaluator.decide("exp", unit)
        return expected

    expected = asyncio.run(run())
    # The rest went out when the block ended.
    assert len(edge.sent) > len(expected)
    assert edge.sent[: len(expected)] == expected


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --- against a real edge ------------------------------------------------------------------


@pytest.fixture
def edge(
    transactional_db: None, tmp_path: Path, make_key: Callable[..., str]
) -> Iterator[tuple[ServedEdge, EdgeServer]]:
    env = {"EDGE_REQUIRE_KEY": "true", "SNAPSHOT_REFRESH_S": "0.1", "RECORDER_FLUSH_S": "0.05"}
    with serve_edge("exposures_edge", log=tmp_path / "edge.log", env=env) as served:
        yield served, EdgeServer(url=served.url, key=make_key("decide"))


def _create_twin(key: str) -> None:
    """One of several experiments with the same settings: three arms, 85% coverage."""
    variants = [
        services.VariantInput(
            key=name, upstream_url=f"http://127.0.0.1:{9001 + n}", weight=weight, is_control=n == 0
        )
        for n, (name, weight) in enumerate((("control", 0.2), ("arm-1", 0.3), ("arm-2", 0.5)))
    ]
    services.experiment_create(
        actor="test",
        key=key,
        name=key,
        kind="ab",
        variants=variants,
        seed="twins",
        coverage=0.85,
        overrides={"qa-anna": "arm-1"},
    )
    services.experiment_start(actor="test", key=key)


def _recorded(key: str) -> set[tuple[str, str]]:
    return {(row.unit_id, row.variant_key) for row in Exposure.objects.filter(experiment__key=key)}


def test_local_decisions_record_what_the_edge_records(
    edge: tuple[ServedEdge, EdgeServer],
) -> None:
    served, server = edge
    for key in ("by-edge", "by-sync-sdk", "by-async-sdk"):
        _create_twin(key)
    server.sync()
    units = [*UNITS, "qa-anna"]
    with Client(server.url, server.key) as client:
        served_by_edge = client.decide_many("by-edge", units)
    with LocalEvaluator(server.url, server.key) as evaluator:
        # Three times each: repeats send nothing.
        for _ in range(3):
            local = [evaluator.decide("by-sync-sdk", unit) for unit in units]
            evaluator.flush()
    sync_stats = evaluator.exposure_stats

    async def decide_async() -> None:
        async with AsyncLocalEvaluator(server.url, server.key) as evaluator:
            for unit in units:
                evaluator.decide("by-async-sdk", unit)

    asyncio.run(decide_async())
    # Stopping the edge writes every exposure it buffered.
    served.stop()
    expected = {(d.unit, d.variant) for d in served_by_edge if d.in_experiment}
    assert 0.8 * len(UNITS) < len(expected) < 0.9 * len(UNITS)
    assert ("qa-anna", "arm-1") not in expected
    assert [(d.variant, d.in_experiment) for d in local] == [
        (d.variant, d.in_experiment) for d in served_by_edge
    ]
    assert _recorded("by-edge") == expected
    assert _recorded("by-sync-sdk") == expected
    assert _recorded("by-async-sdk") == expected
    assert (sync_stats.accepted, sync_stats.rejected, sync_stats.dropped) == (len(expected), 0, 0)
