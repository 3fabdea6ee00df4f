"""Seeded simulations of the LLM guardrails with sticky users (bench/llm_sticky.py).

A/A ramps where users differ in TTFT and cost and send Pareto(1.2) numbers of answers: the
per-request tests the TTFT and cost guardrails used before roll back far more often than alpha,
the per-user ones (shipped) stay at or below it. A canary 50% slower to its first token and
twice as expensive is rolled back. Fewer runs than the benchmark (figures in the README).
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from bench.llm_sticky import ALPHA, detection, false_rollbacks

RUNS = 80


def _exceeds_alpha(count: int, runs: int) -> bool:
    lower, _ = proportion_confint(count, runs, alpha=0.1, method="wilson")
    return bool(lower > ALPHA)


def test_a_a_sticky_users_roll_back_only_the_per_request_llm_guardrails() -> None:
    rates = false_rollbacks(RUNS, seed=21)
    assert rates.ttft_users / RUNS <= ALPHA
    assert rates.cost_users / RUNS <= ALPHA
    assert _exceeds_alpha(rates.ttft_requests, RUNS)
    assert _exceeds_alpha(rates.cost_requests, RUNS)


def test_a_slow_expensive_canary_is_rolled_back_on_both_guardrails() -> None:
    found = detection(12, seed=22, ramp=(0.5,) * 5)
    for key in ("ttft", "cost"):
        caught = np.isfinite(found[key][:, 0])
        assert caught.mean() >= 0.75, key
        # Rolled back on a few hundred canary users, well before the end of the run.
        assert np.median(found[key][caught, 2]) < 2_000, key
