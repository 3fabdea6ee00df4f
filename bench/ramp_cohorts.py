"""Simulation: false rollbacks of a conversion guardrail in an A/A ramp, pooled vs cohorts.

An A/A canary ramps 1 -> 5 -> 10 -> 25 -> 50% in five steps of equal length (one step = one
time unit, e.g. the default 10-minute window). Units arrive at a constant rate and are assigned
to the canary with the step's share; each unit converts with probability p after an
exponential delay with a mean of one step (STATS.md 12.4 world (iii)). The canary is identical
to control, so every rollback is false. A conversion guardrail (higher is better, margin 0,
alpha 0.05, N* 10,000: `evaluate_guardrails`, the worker's code) looks every quarter step.

Analyses, in the same runs:
  * pooled: today's before windows and cohorts: every exposed unit, every conversion so far.
    Control's units are older on average, so they have had longer to convert.
  * window, pooled: a one-step exposure window (STATS.md 12.3), units with an open window
    left out, all cohorts pooled.
  * window + cohorts: the same window, arms compared within the ramp step of first exposure
    and combined with Mantel-Haenszel weights (`analysis.stats.strata`): what Rampart does.
World "drift" adds a conversion probability that falls linearly from 0.4 to 0.2 over the run
(identical in both arms): the window alone then still compares early control units with late
canary units, and only the cohorts remove the bias (Simpson's paradox across ramp steps).

Reported: the false-rollback rate with its Wilson 95% upper bound (statsmodels
`proportion_confint`). Target: the Wilson upper bound of "window + cohorts" <= alpha.

Run from the repository root: `.venv/bin/python -m bench.ramp_cohorts` (1,000 runs per world,
under a minute) or `--runs 500`. Measured (1,000 runs, seed 20261204): pooled 100% in both
worlds; window, pooled 1.6% and 41.0%; window + cohorts 2.9% (Wilson <= 4.1%) and 2.7%
(Wilson <= 3.9%). tests/analysis/stats/test_ramp_cohorts_simulation.py runs 80 of them in CI.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.moments import MetricStats, ProportionStats
from analysis.stats.strata import POOLED, STRATIFIED, standardize

ALPHA = 0.05
SHARES = (0.01, 0.05, 0.10, 0.25, 0.50)
LOOKS_PER_STEP = 4
ANALYSES = ("pooled", "window, pooled", "window + cohorts")
SEED = 20261204


@dataclass(frozen=True)
class World:
    name: str
    units_per_step: int
    rate: Callable[[np.ndarray], np.ndarray]  # conversion probability at exposure time


WORLDS = (
    World("delay (iii)", 4_000, lambda t: np.full_like(t, 0.3)),
    World("delay + drift", 4_000, lambda t: 0.4 - 0.2 * t / len(SHARES)),
)


def _units(world: World, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Exposure times (sorted), canary flags, steps, and conversion times (inf: never)."""
    steps = len(SHARES)
    counts = rng.poisson(world.units_per_step, steps)
    step = np.repeat(np.arange(steps), counts)
    exposed = np.sort(step + rng.random(step.size))
    step = np.floor(exposed).astype(int)
    canary = rng.random(step.size) < np.asarray(SHARES)[step]
    converts = rng.random(step.size) < world.rate(exposed)
    converted_at = np.where(converts, exposed + rng.exponential(1.0, step.size), np.inf)
    return exposed, canary, step, converted_at


def _spec(kind: str) -> GuardrailSpec:
    return GuardrailSpec(metric_key="conversion", kind=kind, direction="higher_is_better")  # type: ignore[arg-type]


def _fires(stats: dict[str, MetricStats], kind: str, settings: GuardrailSettings) -> bool:
    if len(stats) < 2:
        return False
    snapshot = ExperimentSnapshot(
        control="control", treatments=("canary",), metrics={"conversion": stats}
    )
    decision = evaluate_guardrails([_spec(kind)], snapshot, settings=settings)
    return decision.evaluations[0].status is GuardrailStatus.HARM


def one_run(world: World, rng: np.random.Generator, settings: GuardrailSettings) -> list[bool]:
    """Whether each analysis ever rolls the A/A canary back over the ramp's looks."""
    exposed, canary, step, converted_at = _units(world, rng)
    fired = [False] * len(ANALYSES)
    arms = ("control", "canary")
    for look in range(1, len(SHARES) * LOOKS_PER_STEP + 1):
        now = look / LOOKS_PER_STEP
        seen = np.searchsorted(exposed, now)
        arm = canary[:seen].astype(int)
        if not fired[0]:
            hits = converted_at[:seen] <= now
            pooled = {
                arms[a]: ProportionStats(n=int(np.sum(arm == a)), sum=float(np.sum(hits[arm == a])))
                for a in (0, 1)
            }
            fired[0] = _fires(pooled, "proportion", settings)
        closed = np.searchsorted(exposed, now - 1.0)  # one-step window closed
        if closed == 0 or (fired[1] and fired[2]):
            continue
        arm, cohort = canary[:closed].astype(int), step[:closed]
        hits = (converted_at[:closed] - exposed[:closed]) < 1.0
        n = np.bincount(arm * len(SHARES) + cohort, minlength=2 * len(SHARES))
        x = np.bincount(arm * len(SHARES) + cohort, weights=hits, minlength=2 * len(SHARES))
        strata = {
            arms[a]: {
                s: ProportionStats(n=int(n[a * len(SHARES) + s]), sum=float(x[a * len(SHARES) + s]))
                for s in range(len(SHARES))
                if n[a * len(SHARES) + s] > 0
            }
            for a in (0, 1)
        }
        if not fired[1]:
            window = standardize(
                {a: {0: _merge(by.values())} for a, by in strata.items() if by},
                arms=arms,
                construction=POOLED,
            )
            fired[1] = _fires(dict(window.stats), "proportion", settings)
        if not fired[2]:
            cohorts = standardize(strata, arms=arms, construction=STRATIFIED)
            kind = "mean" if cohorts.standardized else "proportion"
            fired[2] = _fires(dict(cohorts.stats), kind, settings)
    return fired


def _merge(parts: Iterable[MetricStats]) -> ProportionStats:
    items = [p for p in parts if isinstance(p, ProportionStats)]
    return ProportionStats(n=sum(p.n for p in items), sum=sum(p.sum for p in items))


def simulate(world: World, *, runs: int, seed: int = SEED) -> list[int]:
    """False rollbacks of each analysis (ANALYSES order) over `runs` seeded A/A ramps."""
    rng = np.random.default_rng([seed, WORLDS.index(world)])
    settings = GuardrailSettings(alpha=ALPHA, n_star=10_000.0)
    totals = [0] * len(ANALYSES)
    for _ in range(runs):
        for index, fired in enumerate(one_run(world, rng, settings)):
            totals[index] += int(fired)
    return totals


def wilson_upper(count: int, runs: int) -> float:
    return float(proportion_confint(count, runs, alpha=0.05, method="wilson")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    print(f"A/A ramp {' -> '.join(f'{s:.0%}' for s in SHARES)}, alpha {ALPHA}, {args.runs} runs")
    print(f"{'world':<16}" + "".join(f"{name:>28}" for name in ANALYSES))
    met = True
    for world in WORLDS:
        started = time.perf_counter()
        totals = simulate(world, runs=args.runs)
        cells = [
            f"{t / args.runs:6.1%} (Wilson <= {wilson_upper(t, args.runs):5.1%})" for t in totals
        ]
        met = met and wilson_upper(totals[-1], args.runs) <= ALPHA
        elapsed = time.perf_counter() - started
        print(f"{world.name:<16}" + "".join(f"{c:>28}" for c in cells) + f"   {elapsed:.0f}s")
    verdict = "met" if met else "not met"
    print(f"target: window + cohorts false rollbacks, Wilson upper bound <= {ALPHA}: {verdict}")


if __name__ == "__main__":
    main()
