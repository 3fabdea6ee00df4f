"""The SDK (through a real edge), local evaluation and GrowthBook's SDK pick the same arms.

For each experiment setting, 10,000 unit ids are decided four ways: by the edge through
``Client.decide_many``, by ``LocalEvaluator`` from /v1/config, and by GrowthBook's own
Python SDK (the ``growthbook`` package) from the experiment's definition, built as
tests/routing/test_growthbook_parity.py builds it. Emoji ids are left out of the GrowthBook
comparison: GrowthBook's Python SDK hashes code points where its JavaScript SDK, which
Rampart follows, hashes UTF-16 code units; they are compared SDK vs edge vs local only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from growthbook import Experiment, GrowthBook

from experiments import services
from rampart_sdk import Client, Decision, LocalEvaluator
from tests.routing.sdk.conftest import EdgeServer
from tests.routing.test_growthbook_parity import PARITY_IDS

EMOJI_IDS = [
    f"{prefix}{number}"
    for number in range(500)
    for prefix in ("\U0001f600-", "user-\U0001f98a-", "\U0001f469\u200d\U0001f4bb")
]


@dataclass(frozen=True)
class Setting:
    """An experiment as created through the services and as GrowthBook would run it."""

    key: str
    kind: str
    weights: tuple[float, ...]
    coverage: float = 1.0
    seed: str = ""
    hash_version: int = 2
    namespace: tuple[str, float, float] | None = None
    canary_share: float | None = None

    @property
    def variant_keys(self) -> list[str]:
        return ["control", *(f"arm-{n}" for n in range(1, len(self.weights)))]

    def create(self) -> None:
        variants = [
            services.VariantInput(
                key=key,
                upstream_url=f"http://127.0.0.1:{9001 + n}",
                weight=weight,
                is_control=n == 0,
            )
            for n, (key, weight) in enumerate(zip(self.variant_keys, self.weights, strict=True))
        ]
        extra: dict[str, Any] = {}
        if self.kind == "ab":
            extra["coverage"] = self.coverage
        else:
            extra["ramp_steps"] = [
                services.RampStepInput(canary_share=self.canary_share or 0.0),
                services.RampStepInput(canary_share=1.0),
            ]
        services.experiment_create(
            actor="test",
            key=self.key,
            name=self.key,
            kind=self.kind,
            variants=variants,
            seed=self.seed,
            hash_version=self.hash_version,
            namespace=self.namespace,
            **extra,
        )
        services.experiment_start(actor="test", key=self.key)

    def growthbook_experiment(self) -> Experiment[str]:
        weights = list(self.weights)
        if self.canary_share is not None:
            # One canary at share s is GrowthBook's [1 - s, s] at full coverage.
            weights = [1.0 - self.canary_share, self.canary_share]
        return Experiment(
            key=self.key,
            variations=self.variant_keys,
            weights=weights,
            coverage=self.coverage,
            seed=self.seed or self.key,
            hashVersion=self.hash_version,
            namespace=self.namespace,
            hashAttribute="id",
        )


SETTINGS = (
    Setting("even", "ab", (0.5, 0.5), seed="s1"),
    Setting("three-uneven", "ab", (0.2, 0.3, 0.5), coverage=0.85, seed="90850943850283058242805"),
    Setting("old-hash", "ab", (0.37, 0.63), coverage=0.4, seed="old", hash_version=1),
    Setting("four-v1", "ab", (0.25, 0.25, 0.25, 0.25), hash_version=1),
    Setting("namespaced", "ab", (0.25, 0.25, 0.5), coverage=0.9, namespace=("ranker", 0.3, 0.8)),
    Setting("canary-5", "canary", (0.5, 0.5), seed="ramp", canary_share=0.05),
)


def _growthbook_arms(setting: Setting, units: list[str]) -> list[tuple[str, bool]]:
    growthbook = GrowthBook(attributes={})
    experiment = setting.growthbook_experiment()
    arms = []
    for unit in units:
        growthbook.set_attributes({"id": unit})
        result: Any = growthbook.run(experiment)
        # Outside the experiment GrowthBook serves the first variation, i.e. control.
        arms.append((result.value if result.inExperiment else "control", result.inExperiment))
    return arms


def _arms(decisions: list[Decision]) -> list[tuple[str, bool]]:
    return [(d.variant, d.in_experiment) for d in decisions]


def test_sdk_edge_local_and_growthbook_agree_on_10k_ids(edge: EdgeServer) -> None:
    for setting in SETTINGS:
        setting.create()
    edge.sync()
    mismatches: dict[str, int] = {}
    with Client(edge.url, edge.key) as client, LocalEvaluator(edge.url, edge.key) as local:
        for setting in SETTINGS:
            served = client.decide_many(setting.key, PARITY_IDS)
            assert [d.unit for d in served] == PARITY_IDS
            local_decisions = [local.decide(setting.key, unit) for unit in PARITY_IDS]
            # Local decisions equal the edge's field for field (reason and upstream too).
            assert local_decisions == served, setting.key
            expected = _growthbook_arms(setting, PARITY_IDS)
            mismatches[setting.key] = sum(
                ours != theirs for ours, theirs in zip(_arms(served), expected, strict=True)
            )
            # Each setting must put some units in and, unless full, some out.
            assert any(d.in_experiment for d in served), setting.key

            emoji_served = client.decide_many(setting.key, EMOJI_IDS)
            assert [local.decide(setting.key, unit) for unit in EMOJI_IDS] == emoji_served
    assert mismatches == dict.fromkeys(mismatches, 0)


def test_overrides_and_fixed_experiments_agree_between_edge_and_local(edge: EdgeServer) -> None:
    Setting("with-override", "ab", (0.5, 0.5)).create()
    services.experiment_update(
        actor="test", key="with-override", overrides={"qa-anna": "arm-1", "qa-bob": "control"}
    )
    Setting("paused", "ab", (0.5, 0.5)).create()
    services.experiment_pause(actor="test", key="paused")
    edge.sync()
    units = ["qa-anna", "qa-bob", *PARITY_IDS[:500]]
    with Client(edge.url, edge.key) as client, LocalEvaluator(edge.url, edge.key) as local:
        for key in ("with-override", "paused"):
            served = client.decide_many(key, units)
            assert [local.decide(key, unit) for unit in units] == served
        anna = local.decide("with-override", "qa-anna")
        assert (anna.variant, anna.reason, anna.in_experiment) == ("arm-1", "override", False)
        assert {d.reason for d in client.decide_many("paused", units)} == {"not_running"}
