"""Seeded worlds of the prediction-drift test (bench/prediction_drift.py), at CI size.

A/A ramps with sticky users and a drifting mix stay at or below alpha on users' first
predictions, where the same bet on every request does not; the null's boundary (TV equal to
the tolerance) too; a class 10 points more frequent is found. Figures for more runs are in
the README (python -m bench.prediction_drift).
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from bench.prediction_drift import ALPHA, detection, false_alarms, fixed_horizon_users

RUNS = 60


def test_a_a_ramp_with_sticky_users_stays_under_alpha_only_with_the_user_as_the_unit() -> None:
    rates = false_alarms(RUNS, tolerance=0.0, seed=21)
    assert rates.users / RUNS <= ALPHA
    # The per-request bet fires far more often than alpha on the same worlds.
    lower, _ = proportion_confint(rates.requests, RUNS, alpha=0.1, method="wilson")
    assert lower > ALPHA


def test_at_the_null_s_boundary_the_tolerance_keeps_alpha() -> None:
    rates = false_alarms(RUNS, tolerance=0.05, shift=0.05, seed=22)
    assert rates.users / RUNS <= ALPHA


def test_a_class_ten_points_more_frequent_is_found() -> None:
    found = detection(30, share=0.5, tolerance=0.02, users=12_000, seed=23)
    assert np.isfinite(found).mean() >= 0.9
    # Median about 2,200 users (both arms) at 500 runs; the fixed-horizon chi-square test
    # with 80% power needs about 545 (statsmodels): anytime validity and an unknown
    # direction cost a factor of about 4 here.
    assert 1_000 <= np.median(found) <= 4_000
    assert 500 <= fixed_horizon_users() <= 600
