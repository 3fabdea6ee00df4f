"""Seeded A/A ramps for the mean-latency guardrail (bench/ramp_latency.py): users, within steps.

The shipped guardrail (users as the unit, stratified by ramp step) keeps alpha where each
half alone fails: pooling over the ramp is biased by the shared slowdown, and requests as
units are anti-conservative with sticky users. Fewer runs than the benchmark (500 per world,
figures in the README).
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.latency_mean import comparison, user_latency_means
from analysis.stats.moments import RatioStats
from bench.ramp_latency import (
    ALPHA,
    MIN_UNITS,
    N_STAR,
    WORLDS,
    constant_slow,
    detection,
    false_rollbacks,
    fires,
    twenty_percent_slower,
)

RUNS = 60


def _exceeds_alpha(count: int) -> bool:
    lower, _ = proportion_confint(count, RUNS, alpha=0.1, method="wilson")
    return bool(lower > ALPHA)


def test_latency_doubling_over_the_ramp_rolls_back_only_the_pooled_analyses():
    counts = false_rollbacks(RUNS, WORLDS[0], seed=1)
    assert counts["users, stratified"] / RUNS <= ALPHA
    assert _exceeds_alpha(counts["requests, pooled"])  # the previous guardrail
    assert _exceeds_alpha(counts["users, pooled"])


def test_sticky_users_and_a_shared_slowdown_need_both_users_and_strata():
    counts = false_rollbacks(RUNS, WORLDS[2], seed=2)
    assert counts["users, stratified"] / RUNS <= ALPHA
    assert _exceeds_alpha(counts["requests, pooled"])
    assert _exceeds_alpha(counts["requests, stratified"])
    assert _exceeds_alpha(counts["users, pooled"])


def test_a_constant_slow_canary_and_a_twenty_percent_slower_one_are_rolled_back():
    for canary in (constant_slow, twenty_percent_slower):
        found = detection(5, WORLDS[0], canary=canary, seed=3)
        assert np.isfinite(found[:, 0]).all(), canary.__name__


def test_the_benchmark_decides_as_evaluate_guardrails_does():
    rng = np.random.default_rng(4)
    spec = GuardrailSpec("latency-mean", "mean", "lower_is_better")
    settings = GuardrailSettings(alpha=ALPHA, n_star=N_STAR, min_units_per_arm=MIN_UNITS)
    for slowdown in np.linspace(1.0, 1.3, 13):
        strata = {}
        for arm, level in (("A", 100.0), ("B", 100.0 * slowdown)):
            d = np.minimum(np.floor(rng.pareto(1.2, 400) + 1), 30)
            m = d * level * np.exp(0.5 * rng.standard_normal(400))
            strata[arm] = {0: RatioStats.from_values(m[:150], d[:150])}
            strata[arm][1] = RatioStats.from_values(m[150:], d[150:])
        combined = user_latency_means(strata, arms=("A", "B"))
        means = comparison(combined, control="A", arm="B")
        snapshot = ExperimentSnapshot(
            control="A", treatments=("B",), metrics={"latency-mean": {"B": means}}
        )
        evidence = evaluate_guardrails([spec], snapshot, settings=settings).evaluations[0]
        assert means.control is not None and means.treatment is not None
        assert fires(means.control, means.treatment, alpha=ALPHA, margin=0.0) == (
            evidence.status is GuardrailStatus.HARM
        )
