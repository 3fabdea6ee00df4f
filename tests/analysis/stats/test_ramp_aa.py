"""Seeded A/A ramps with sticky users (bench/ramp_aa.py): the user guardrail keeps alpha.

The same populations break the per-request analyses: the pooled per-request harm test (the
previous error-rate guardrail) fires far more often than alpha, and fails the bound the user
guardrail meets. Fewer runs than the benchmark (500 per world, figures in the README).
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from bench.ramp_aa import ALPHA, detection, false_rollbacks

RUNS = 80


def test_a_a_ramp_false_rollbacks_stay_under_alpha_only_with_the_user_as_the_unit():
    rates = false_rollbacks(RUNS, shape=2.0, seed=1)
    user_rate = rates.users / RUNS
    assert user_rate <= ALPHA
    # The pooled per-request test exceeds alpha with confidence on the same data.
    pooled_lower, _ = proportion_confint(rates.pooled_harm, RUNS, alpha=0.1, method="wilson")
    assert pooled_lower > ALPHA
    assert rates.pooled_harm > rates.users


def test_an_error_free_control_against_a_ten_percent_canary_at_five_percent_is_caught():
    found = detection(10, canary_rate=0.10, ramp=(0.05,) * 5, seed=3)
    assert np.isfinite(found[:, 0]).all()


def test_a_canary_failing_every_request_is_caught_after_a_few_of_its_requests():
    found = detection(10, canary_rate=1.0, ramp=(0.05,) * 5, seed=4)
    assert np.isfinite(found[:, 0]).all()
    assert np.median(found[:, 1]) <= 24  # canary requests before the rollback
    assert found[:, 0].max() <= 10  # canary users
