"""The OpenFeature provider, used through OpenFeature's client API against a real edge.

Flags are evaluated with ``api.get_client().get_string_details`` (never the provider's
methods), with a ``LocalEvaluator`` and with a ``Client`` as the provider's source, and
compared with the edge's own decisions; exposures recorded by the provider's hook and events
sent through OpenFeature's tracking API are read back from the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import ErrorCode, Reason
from openfeature.track import TrackingEventDetails

from experiments import services
from experiments.selectors import config_version_current
from rampart_sdk import Client, LocalEvaluator
from rampart_sdk.openfeature import RampartProvider
from routing.models import Event, Exposure
from tests.routing.edge_factories import ServedEdge, serve_edge
from tests.routing.test_growthbook_parity import PARITY_IDS

UNITS = PARITY_IDS[:2000]
QA_UNIT = "qa-anna"


@pytest.fixture
def edge(transactional_db: None, tmp_path: Path) -> Iterator[ServedEdge]:
    with serve_edge(
        "exposures_edge",
        log=tmp_path / "edge.log",
        env={"EDGE_REQUIRE_KEY": "true", "SNAPSHOT_REFRESH_S": "0.1", "RECORDER_FLUSH_S": "0.1"},
    ) as served:
        yield served


@pytest.fixture
def openfeature_api() -> Iterator[None]:
    yield
    api.shutdown()
    api.clear_providers()


def _variants(weights: tuple[float, ...]) -> list[services.VariantInput]:
    keys = ["control", *(f"arm-{n}" for n in range(1, len(weights)))]
    return [
        services.VariantInput(
            key=key,
            upstream_url=f"http://127.0.0.1:{9001 + n}",
            weight=weight,
            is_control=n == 0,
        )
        for n, (key, weight) in enumerate(zip(keys, weights, strict=True))
    ]


def _create_experiments() -> None:
    services.experiment_create(
        actor="test",
        key="ab",
        name="ab",
        kind="ab",
        variants=_variants((0.3, 0.7)),
        coverage=0.8,
        namespace=("search", 0.0, 0.9),
        overrides={QA_UNIT: "arm-1"},
    )
    services.experiment_create(
        actor="test",
        key="canary",
        name="canary",
        kind="canary",
        variants=_variants((0.5, 0.5)),
        ramp_steps=[services.RampStepInput(canary_share=0.1), services.RampStepInput(1.0)],
    )
    for key in ("rolled-back", "completed", "paused"):
        services.experiment_create(
            actor="test", key=key, name=key, kind="ab", variants=_variants((0.5, 0.5))
        )
    for key in ("ab", "canary", "rolled-back", "completed", "paused"):
        services.experiment_start(actor="test", key=key)
    services.experiment_rollback(actor="test", key="rolled-back", reason="guardrail")
    services.experiment_complete(actor="test", key="completed", winner_key="arm-1")
    services.experiment_pause(actor="test", key="paused")


EXPERIMENTS = ("ab", "canary", "rolled-back", "completed", "paused")
REASONS = {
    "assigned": Reason.SPLIT,
    "override": Reason.TARGETING_MATCH,
    "not_in_coverage": Reason.DEFAULT,
    "not_in_namespace": Reason.DEFAULT,
    "not_running": Reason.DISABLED,
    "rolled_back_to_control": Reason.DISABLED,
    "completed": Reason.STATIC,
}


def _sync(url: str, key: str) -> None:
    """Wait until the edge's snapshot holds every change made so far (the key included)."""
    wanted = config_version_current()

    def current() -> bool:
        response = httpx.get(f"{url}/v1/config", headers={"Authorization": f"Bearer {key}"})
        return response.status_code == 200 and response.json()["version"] >= wanted

    _wait_for(current)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_openfeature_flags_are_the_edges_decisions_and_record_exposures(
    edge: ServedEdge, make_key: Callable[..., str], openfeature_api: None
) -> None:
    _create_experiments()
    key = make_key("decide", "ingest")
    _sync(edge.url, key)
    units = [QA_UNIT, *UNITS]
    evaluated: dict[str, list[Any]] = {}
    with Client(edge.url, key) as rampart:
        with LocalEvaluator(edge.url, key, exposure_flush_interval_s=0.1) as evaluator:
            api.set_provider(RampartProvider(evaluator, events=rampart))
            client = api.get_client()
            for name in EXPERIMENTS:
                evaluated[name] = [
                    client.get_string_details(
                        name, "fallback", EvaluationContext(targeting_key=unit)
                    )
                    for unit in units
                ]
            evaluator.flush()
            # OpenFeature's tracking API: a business event for the targeting key.
            client.track(
                "purchase", EvaluationContext(targeting_key=UNITS[0]), TrackingEventDetails(19.5)
            )
            assert rampart.flush().accepted == 1

        # The hook recorded one exposure per unit in each experiment, and only those.
        def recorded() -> set[tuple[str, str, str]]:
            return set(Exposure.objects.values_list("experiment__key", "unit_id", "variant_key"))

        exposed = {
            (name, str(d.flag_metadata["unit"]), d.value)
            for name in EXPERIMENTS
            for d in evaluated[name]
            if d.flag_metadata["in_experiment"]
        }
        _wait_for(lambda: len(recorded()) >= len(exposed))
        assert recorded() == exposed

        # Each flag is the edge's decision (asked after, as the edge records exposures too).
        for name in EXPERIMENTS:
            edge_decisions = rampart.decide_many(name, units)
            for details, decision in zip(evaluated[name], edge_decisions, strict=True):
                assert details.error_code is None, details.error_message
                assert (details.value, details.variant) == (decision.variant,) * 2
                assert details.reason == REASONS[decision.reason], (name, decision)
                assert details.flag_metadata["in_experiment"] == decision.in_experiment
                assert details.flag_metadata["rampart_reason"] == decision.reason
            if name == "ab":
                assert {d.reason for d in edge_decisions} == {
                    "assigned",
                    "override",
                    "not_in_coverage",
                    "not_in_namespace",
                }
    assert len(exposed) > 1000
    event = Event.objects.get()
    assert (event.unit_id, event.name, event.value) == (UNITS[0], "purchase", 19.5)


def test_the_client_as_source_and_the_openfeature_errors(
    edge: ServedEdge, make_key: Callable[..., str], openfeature_api: None
) -> None:
    _create_experiments()
    key = make_key("decide", "ingest")
    _sync(edge.url, key)
    with Client(edge.url, key) as rampart:
        expected = rampart.decide_many("canary", UNITS[:100])
        api.set_provider(RampartProvider(rampart))
        client = api.get_client()
        for decision in expected:
            details = client.get_string_details(
                "canary", "fallback", EvaluationContext(targeting_key=decision.unit)
            )
            assert (details.value, details.reason) == (
                decision.variant,
                REASONS[decision.reason],
            )

        def evaluate(flag: str, context: EvaluationContext | None, kind: str = "string") -> Any:
            if kind == "boolean":
                return client.get_boolean_details(flag, False, context)
            return client.get_string_details(flag, "fallback", context)

        unknown = evaluate("no-such", EvaluationContext(targeting_key="u-1"))
        assert (unknown.value, unknown.error_code) == ("fallback", ErrorCode.FLAG_NOT_FOUND)
        missing = evaluate("canary", EvaluationContext())
        assert (missing.value, missing.error_code) == (
            "fallback",
            ErrorCode.TARGETING_KEY_MISSING,
        )
        too_long = evaluate("canary", EvaluationContext(targeting_key="u" * 201))
        assert too_long.error_code == ErrorCode.INVALID_CONTEXT
        boolean = evaluate("canary", EvaluationContext(targeting_key="u-1"), "boolean")
        assert (boolean.value, boolean.error_code) == (False, ErrorCode.TYPE_MISMATCH)

    # A local evaluator that could not load its config: not ready, the caller's default.
    evaluator = LocalEvaluator(edge.url, "rk_unknown_key")
    api.set_provider(RampartProvider(evaluator))
    details = api.get_client().get_string_details(
        "canary", "fallback", EvaluationContext(targeting_key="u-1")
    )
    assert details.value == "fallback" and details.error_code is not None
    evaluator.close()
