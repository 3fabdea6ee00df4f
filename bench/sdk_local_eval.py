"""Decisions per second of the SDK's LocalEvaluator against GrowthBook's Python SDK.

The same experiments and unit ids as bench/local_eval.py, in the same run. Each experiment
is served to the evaluator as a /v1/config document (format 1, from a mock transport, so
no server runs), and every pass uses a fresh evaluator, whose specs begin with empty
per-bucket memos; fetching and compiling the config happens before the timer starts.
``LocalEvaluator.decide`` is timed whole: experiment lookup, unit id
check, ``rampart_sdk.assignment.assign`` and the ``Decision`` it returns. The baseline is one
reused ``GrowthBook`` instance with ``set_attributes`` (its fastest use). Passes are timed
in CPU seconds of this process. Target: at least 3x GrowthBook.

Run from the repository root: .venv/bin/python -m bench.sdk_local_eval
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import orjson

from bench.local_eval import CASES, UNIT_COUNT, Case, growthbook_reused_pass
from rampart_sdk import LocalEvaluator
from rampart_sdk.assignment import AssignmentSpec

TARGET_RATIO = 3.0
PASSES = 3
EXPERIMENT_KEY = "checkout-ranker"
Arms = list[str | None]


def config_document(spec: AssignmentSpec) -> dict[str, Any]:
    """The /v1/config document the edge would serve for a running A/B test with ``spec``."""
    namespace = spec.namespace
    return {
        "format": 1,
        "version": 1,
        "experiments": [
            {
                "id": 1,
                "key": spec.experiment_key,
                "kind": "ab",
                "status": "running",
                "seed": spec.seed,
                "hash_version": spec.hash_version,
                "unit_source": "header",
                "unit_attribute": "X-Rampart-Unit",
                "coverage": spec.coverage,
                "namespace": (
                    None
                    if namespace is None
                    else {
                        "id": namespace.namespace_id,
                        "start": namespace.start,
                        "end": namespace.end,
                    }
                ),
                "control": spec.variant_keys[0],
                "canary_share": None,
                "ramp_position": None,
                "winner": None,
                "variants": [
                    {
                        "key": key,
                        "weight": weight,
                        "is_control": position == 0,
                        "upstream": f"http://127.0.0.1:{9001 + position}",
                        "ranges": [list(interval) for interval in intervals],
                    }
                    for position, (key, weight, intervals) in enumerate(
                        zip(spec.variant_keys, spec.weights, spec.ranges, strict=True)
                    )
                ],
                "shadows": [],
                "overrides": dict(spec.overrides),
                "fixed": None,
            }
        ],
    }


class LocalPass:
    """Decisions of a fresh LocalEvaluator (empty memos), set up before the timer starts."""

    def __init__(self, document: dict[str, Any], unit_ids: list[str]) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/exposures":
                sent = len(orjson.loads(request.content)["exposures"])
                return httpx.Response(202, json={"accepted": sent, "ignored": 0})
            return httpx.Response(200, json=document, headers={"ETag": '"1"'})

        transport = httpx.MockTransport(answer)
        self.evaluator = LocalEvaluator("http://edge", "rk_bench_key", transport=transport)
        self.evaluator.refresh()
        self.unit_ids = unit_ids

    def __call__(self) -> Arms:
        # The same loop shape as the GrowthBook pass: each result is reduced to its arm at
        # once, so neither side keeps 100,000 result objects alive for the collector.
        decide = self.evaluator.decide
        arms: Arms = []
        for unit_id in self.unit_ids:
            decision = decide(EXPERIMENT_KEY, unit_id)
            arms.append(decision.variant if decision.in_experiment else None)
        return arms

    def close(self) -> None:
        self.evaluator.close()


class GrowthBookPass:
    """Decisions of one reused GrowthBook instance (bench.local_eval's baseline)."""

    def __init__(self, case: Case, unit_ids: list[str]) -> None:
        self.experiment = case.growthbook_experiment()
        self.unit_ids = unit_ids

    def __call__(self) -> Arms:
        return growthbook_reused_pass(self.experiment, self.unit_ids)

    def close(self) -> None:
        """Nothing to release."""


def best_seconds(
    setups: list[Callable[[], LocalPass | GrowthBookPass]],
) -> list[tuple[float, Arms]]:
    """The fastest of PASSES timed passes of each evaluator, and the arms it chose.

    Both evaluators are single-threaded and CPU-bound, so a pass is timed in CPU seconds
    of this process (``time.process_time``): time spent waiting for a core that other
    processes hold is not counted. Passes alternate between the evaluators.
    """
    timings: list[list[float]] = [[] for _ in setups]
    arms: list[Arms] = [[] for _ in setups]
    for _ in range(PASSES):
        for position, setup in enumerate(setups):
            run = setup()
            started = time.process_time()
            arms[position] = run()
            timings[position].append(time.process_time() - started)
            run.close()
    return [(min(times), chosen) for times, chosen in zip(timings, arms, strict=True)]


def main() -> None:
    unit_ids = [f"user-{number:07d}" for number in range(UNIT_COUNT)]
    print(f"{UNIT_COUNT:,} unit ids, best of {PASSES} alternating passes, decisions per CPU second")
    print(f"{'experiment':<40}{'local eval':>12}{'growthbook':>12}{'ratio':>8}  same arms")
    worst_ratio = float("inf")
    for case in CASES:
        document = config_document(Case.rampart_spec(case))
        (local, local_arms), (growthbook, growthbook_arms) = best_seconds(
            [
                partial(LocalPass, document, unit_ids),
                partial(GrowthBookPass, case, unit_ids),
            ]
        )
        worst_ratio = min(worst_ratio, growthbook / local)
        print(
            f"{case.label:<40}{UNIT_COUNT / local:>12,.0f}{UNIT_COUNT / growthbook:>12,.0f}"
            f"{growthbook / local:>7.1f}x  {'yes' if local_arms == growthbook_arms else 'NO'}"
        )
    verdict = "meets" if worst_ratio >= TARGET_RATIO else "misses"
    print(
        f"ratio LocalEvaluator.decide vs reused GrowthBook instance: {worst_ratio:.1f}x at "
        f"worst, {verdict} the {TARGET_RATIO:.0f}x target"
    )


if __name__ == "__main__":
    main()
