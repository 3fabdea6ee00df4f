"""Decisions per second of rampart_sdk.assignment.assign() against GrowthBook's Python SDK.

Both sides evaluate the same experiment for the same 100,000 unit ids in this run. The
GrowthBook baseline is timed two ways: a new ``GrowthBook(attributes=...)`` per decision
(the per-request pattern of its server-side docs) and one instance reused with
``set_attributes``, which is its fastest use and the stricter comparison. Each timing is
the best of several passes, alternating between the evaluators. Rampart's spec is rebuilt
before every pass, so its per-bucket outcome memo starts empty each time. Target: at
least 3x the reused instance.

Run from the repository root: .venv/bin/python -m bench.local_eval
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from growthbook import Experiment, GrowthBook

from rampart_sdk.assignment import AssignmentSpec, Namespace, assign, build_assignment_spec

UNIT_COUNT = 100_000
PASSES = 2
TARGET_RATIO = 3.0


@dataclass(frozen=True)
class Case:
    """One experiment, described once and built for both evaluators."""

    label: str
    variant_keys: tuple[str, ...]
    weights: tuple[float, ...]
    coverage: float
    hash_version: int
    namespace: tuple[str, float, float] | None

    def rampart_spec(self) -> AssignmentSpec:
        return build_assignment_spec(
            experiment_key="checkout-ranker",
            variant_keys=self.variant_keys,
            weights=self.weights,
            coverage=self.coverage,
            seed="checkout-ranker-2024",
            hash_version=self.hash_version,
            namespace=None if self.namespace is None else Namespace(*self.namespace),
        )

    def growthbook_experiment(self) -> Experiment[str]:
        return Experiment(
            key="checkout-ranker",
            variations=list(self.variant_keys),
            weights=list(self.weights),
            coverage=self.coverage,
            seed="checkout-ranker-2024",
            hashVersion=self.hash_version,
            hashAttribute="id",
            namespace=self.namespace,
        )


CASES = (
    Case(
        "3 arms, 90% coverage, hash v2",
        ("control", "candidate-a", "candidate-b"),
        (0.5, 0.25, 0.25),
        0.9,
        2,
        None,
    ),
    Case("canary 5%, hash v2", ("control", "canary"), (0.95, 0.05), 1.0, 2, None),
    Case(
        "2 arms, namespace [0.2, 0.7), hash v2",
        ("control", "treatment"),
        (0.5, 0.5),
        1.0,
        2,
        ("ranker", 0.2, 0.7),
    ),
    Case("2 arms, hash v1", ("control", "treatment"), (0.5, 0.5), 1.0, 1, None),
)


Evaluator = Callable[[], list[str | None]]


def best_seconds(evaluators: list[Evaluator]) -> list[tuple[float, list[str | None]]]:
    """The fastest of PASSES timed passes of each evaluator, and the arms it chose.

    Passes alternate between the evaluators, so a burst of load from other processes
    slows all of them rather than only one, and the ratios stay comparable.
    """
    timings: list[list[float]] = [[] for _ in evaluators]
    arms: list[list[str | None]] = [[] for _ in evaluators]
    for _ in range(PASSES):
        for position, evaluator in enumerate(evaluators):
            started = time.perf_counter()
            arms[position] = evaluator()
            timings[position].append(time.perf_counter() - started)
    return [(min(times), chosen) for times, chosen in zip(timings, arms, strict=True)]


def rampart_pass(case: Case, unit_ids: list[str]) -> list[str | None]:
    spec = case.rampart_spec()
    return [assign(spec, unit_id).variant_key for unit_id in unit_ids]


def growthbook_reused_pass(experiment: Experiment[str], unit_ids: list[str]) -> list[str | None]:
    growthbook = GrowthBook(attributes={})
    arms: list[str | None] = []
    for unit_id in unit_ids:
        growthbook.set_attributes({"id": unit_id})
        result = growthbook.run(experiment)
        arms.append(result.value if result.inExperiment else None)
    return arms


def growthbook_per_decision_pass(
    experiment: Experiment[str], unit_ids: list[str]
) -> list[str | None]:
    arms: list[str | None] = []
    for unit_id in unit_ids:
        result = GrowthBook(attributes={"id": unit_id}).run(experiment)
        arms.append(result.value if result.inExperiment else None)
    return arms


def main() -> None:
    unit_ids = [f"user-{number:07d}" for number in range(UNIT_COUNT)]
    print(f"{UNIT_COUNT:,} unit ids, best of {PASSES} passes, decisions per second")
    header = (
        f"{'experiment':<40}{'rampart':>12}{'gb reused':>12}{'gb new':>12}"
        f"{'x reused':>10}{'x new':>8}  same arms"
    )
    print(header)
    worst_ratio = float("inf")
    for case in CASES:
        experiment = case.growthbook_experiment()
        (rampart, rampart_arms), (reused, growthbook_arms), (per_decision, _) = best_seconds(
            [
                partial(rampart_pass, case, unit_ids),
                partial(growthbook_reused_pass, experiment, unit_ids),
                partial(growthbook_per_decision_pass, experiment, unit_ids),
            ]
        )
        same_arms = rampart_arms == growthbook_arms
        worst_ratio = min(worst_ratio, reused / rampart)
        print(
            f"{case.label:<40}{UNIT_COUNT / rampart:>12,.0f}{UNIT_COUNT / reused:>12,.0f}"
            f"{UNIT_COUNT / per_decision:>12,.0f}{reused / rampart:>9.1f}x"
            f"{per_decision / rampart:>7.1f}x  {'yes' if same_arms else 'NO'}"
        )
    verdict = "meets" if worst_ratio >= TARGET_RATIO else "misses"
    print(
        f"ratio vs reused GrowthBook instance: {worst_ratio:.1f}x at worst, "
        f"{verdict} the {TARGET_RATIO:.0f}x target"
    )


if __name__ == "__main__":
    main()
