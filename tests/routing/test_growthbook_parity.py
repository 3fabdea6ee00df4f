"""Rampart's assignment against GrowthBook's own Python SDK (the ``growthbook`` package)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from growthbook import Experiment, GrowthBook
from growthbook import core as growthbook_core

from rampart_sdk.assignment import (
    AssignmentSpec,
    Namespace,
    assign,
    build_assignment_spec,
    growthbook_ranges,
    rolled_back_spec,
)
from rampart_sdk.canary import build_canary_spec
from tests.routing.test_hashing import ASTRAL_IDS


def _parity_ids(count: int) -> list[str]:
    """Unit ids of the shapes real callers send, all inside the Basic Multilingual Plane."""
    rng = random.Random(20240611)
    makers = [
        lambda number: f"user-{number}",
        lambda number: f"{rng.getrandbits(128):032x}",
        lambda number: str(rng.randrange(10**12)),
        lambda number: f"person{number}@example.com",
        lambda number: f"J\u00f6rg-\u00c5sa-{number}",
        lambda number: f"\u7528\u6237{number}",
    ]
    return [makers[number % len(makers)](number) for number in range(count)]


PARITY_IDS = _parity_ids(10_000)


@dataclass(frozen=True)
class Setting:
    """One configuration, built both as a Rampart spec and as a GrowthBook experiment."""

    name: str
    spec: AssignmentSpec
    weights: Sequence[float] | None = None
    coverage: float = 1.0
    namespace: tuple[str, float, float] | None = None
    explicit_ranges: Sequence[tuple[float, float]] | None = None

    def growthbook_experiment(self) -> Experiment[str]:
        return Experiment(
            key=self.spec.experiment_key,
            variations=list(self.spec.variant_keys),
            weights=None if self.weights is None else list(self.weights),
            coverage=self.coverage,
            namespace=self.namespace,
            ranges=None if self.explicit_ranges is None else list(self.explicit_ranges),
            seed=self.spec.seed,
            hashVersion=self.spec.hash_version,
            hashAttribute="id",
        )


def _weighted(
    name: str,
    keys: list[str],
    weights: list[float],
    coverage: float,
    *,
    seed: str | None = None,
    hash_version: int = 2,
    namespace: tuple[str, float, float] | None = None,
) -> Setting:
    spec = build_assignment_spec(
        experiment_key=f"exp-{name}",
        variant_keys=keys,
        weights=weights,
        coverage=coverage,
        seed=seed,
        hash_version=hash_version,
        namespace=None if namespace is None else Namespace(*namespace),
    )
    return Setting(name, spec, weights=weights, coverage=coverage, namespace=namespace)


def _settings() -> list[Setting]:
    settings = [
        _weighted("even", ["control", "treatment"], [0.5, 0.5], 1.0, seed="s1"),
        _weighted("canary-10-half-coverage", ["control", "canary"], [0.9, 0.1], 0.5),
        _weighted(
            "three-uneven",
            ["control", "b", "c"],
            [0.2, 0.3, 0.5],
            0.85,
            seed="90850943850283058242805",
        ),
        _weighted("four-even-v1", ["a", "b", "c", "d"], [0.25] * 4, 1.0, hash_version=1),
        _weighted("uneven-v1", ["a", "b"], [0.37, 0.63], 0.4, seed="old", hash_version=1),
        _weighted(
            "namespaced", ["a", "b", "c"], [0.25, 0.25, 0.5], 0.9, namespace=("ranker", 0.3, 0.8)
        ),
    ]
    # One canary: GrowthBook reproduces the ramp from weights [1 - s, s].
    one_canary = build_canary_spec(
        experiment_key="ramp-one", variant_keys=["control", "canary"], canary_shares=[0.05]
    )
    settings.append(Setting("one-canary", one_canary, weights=list(one_canary.weights)))
    # Two canaries: GrowthBook reproduces the ramp only from explicit ranges.
    two_canaries = build_canary_spec(
        experiment_key="ramp-two", variant_keys=["control", "x", "y"], canary_shares=[0.15, 0.25]
    )
    settings.append(
        Setting("two-canaries", two_canaries, explicit_ranges=growthbook_ranges(two_canaries))
    )
    rolled_back = rolled_back_spec(settings[2].spec)
    settings.append(
        Setting("rolled-back", rolled_back, weights=list(rolled_back.weights), coverage=0.85)
    )
    return settings


def _growthbook_outcome(
    growthbook: GrowthBook, experiment: Experiment[str], unit_id: str
) -> tuple[str | None, float | None]:
    growthbook.set_attributes({"id": unit_id})
    result: Any = growthbook.run(experiment)
    if not result.inExperiment:
        return None, None
    return result.value, result.bucket


@pytest.mark.parametrize("setting", _settings(), ids=lambda setting: setting.name)
def test_same_arm_and_bucket_as_the_growthbook_sdk_for_10k_ids(setting: Setting) -> None:
    growthbook = GrowthBook(attributes={})
    experiment = setting.growthbook_experiment()
    mismatches = []
    for unit_id in PARITY_IDS:
        ours = assign(setting.spec, unit_id)
        theirs = _growthbook_outcome(growthbook, experiment, unit_id)
        mine = (ours.variant_key, ours.bucket if ours.in_experiment else None)
        if mine != theirs:
            mismatches.append((unit_id, mine, theirs))
    assert not mismatches[:5]
    # The setting must exercise both outcomes, or parity would be trivially true.
    in_experiment = sum(assign(setting.spec, unit).in_experiment for unit in PARITY_IDS)
    assert in_experiment > 0
    if setting.coverage < 1.0 or setting.namespace is not None:
        assert in_experiment < len(PARITY_IDS)


@pytest.mark.parametrize(("unit_id", "utf16_length", "expected_fnv", "v2", "v1"), ASTRAL_IDS)
def test_astral_ids_follow_the_javascript_sdk(
    unit_id: str, utf16_length: int, expected_fnv: int, v2: float, v1: float
) -> None:
    # Expected buckets are the JavaScript SDK's values (see ASTRAL_IDS in test_hashing).
    for version, expected in ((2, v2), (1, v1)):
        spec = build_assignment_spec(
            experiment_key="checkout-ranker", variant_keys=["a", "b"], hash_version=version
        )
        outcome = assign(spec, unit_id)
        assert outcome.bucket == expected
        assert outcome.variant_key == ("a" if expected < 0.5 else "b")


# Older releases of the Python SDK hashed code points, so emoji ids landed elsewhere than
# in the JavaScript SDK; 4.0.0 hashes UTF-16 code units. Compare only when it does.
_SDK_HASHES_CODE_UNITS = growthbook_core.fnv1a32("\U0001f600") == 0xCB31C4B8


@pytest.mark.skipif(
    not _SDK_HASHES_CODE_UNITS, reason="this growthbook release hashes code points, not UTF-16"
)
@pytest.mark.parametrize(("unit_id", "utf16_length", "expected_fnv", "v2", "v1"), ASTRAL_IDS)
def test_python_sdk_agrees_on_astral_ids(
    unit_id: str, utf16_length: int, expected_fnv: int, v2: float, v1: float
) -> None:
    spec = build_assignment_spec(experiment_key="checkout-ranker", variant_keys=["a", "b"])
    experiment = Setting("astral", spec, weights=[0.5, 0.5]).growthbook_experiment()
    ours = assign(spec, unit_id)
    assert _growthbook_outcome(GrowthBook(attributes={}), experiment, unit_id) == (
        ours.variant_key,
        ours.bucket,
    )
