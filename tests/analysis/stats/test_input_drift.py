"""Input drift statistics: the e-values against scipy, grouping, windows, seeded sticky worlds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln
from scipy.stats import dirichlet_multinomial, multinomial

from analysis.stats.input_drift import (
    GROUPS,
    SPECIAL_CELLS,
    dm_log_marginal,
    field_drift,
    flagged,
    homogeneity_log_e,
    max_log_likelihood,
    merge_groups,
    window_log_threshold,
    window_weight,
)
from bench.input_drift_sticky import ALPHA, _counted, detection, false_alarms, wilson_upper
from experiments.input_cells import cell_order, log_cell


def _log_coefficient(counts: np.ndarray) -> float:
    return float(gammaln(counts.sum() + 1) - gammaln(counts + 1).sum())


def test_the_dirichlet_multinomial_marginal_matches_scipy_without_the_coefficient() -> None:
    counts = np.array([12, 0, 7, 30])
    # scipy's pmf is of the unordered counts: it carries the multinomial coefficient.
    reference = dirichlet_multinomial.logpmf(counts, alpha=[0.5] * 4, n=counts.sum())
    assert dm_log_marginal(counts) == pytest.approx(reference - _log_coefficient(counts), rel=1e-10)


def test_the_maximised_likelihood_matches_scipy_s_multinomial_at_the_mle() -> None:
    counts = np.array([12, 0, 7, 30])
    mle = counts / counts.sum()
    reference = multinomial.logpmf(counts, n=counts.sum(), p=mle)
    assert max_log_likelihood(counts) == pytest.approx(reference - _log_coefficient(counts))


def test_the_e_value_grows_with_a_shift_and_not_without() -> None:
    reference = np.array([400, 300, 200, 100])
    assert homogeneity_log_e(reference, [400, 300, 200, 100]) < 0
    assert homogeneity_log_e(reference, [250, 450, 200, 100]) > math.log(1 / ALPHA)


def test_numbers_merge_into_groups_of_equal_reference_mass_and_keep_special_cells_apart() -> None:
    reference = {log_cell(float(v)): 1.0 for v in range(1, 1001)}
    reference = {cell: 0.0 for cell in reference}
    for v in range(1, 1001):
        reference[log_cell(float(v))] += 1.0
    ordered = sorted(reference, key=cell_order)
    mapping = merge_groups(reference, ordered=ordered)
    assert max(mapping[c] for c in ordered) == GROUPS - 1
    assert [mapping[c] for c in SPECIAL_CELLS] == list(range(GROUPS, GROUPS + len(SPECIAL_CELLS)))
    # Categories: the most frequent alone, the rest together.
    mapping = merge_groups({f"c{i}": float(20 - i) for i in range(20)}, ordered=None)
    assert mapping["c0"] == 0 and mapping[""] == GROUPS - 1 and "c15" not in mapping


def test_a_missing_field_surge_is_flagged_for_a_number() -> None:
    reference = {"+4": 500.0, "+5": 500.0}
    recent = {"+4": 200.0, "+5": 200.0, "(missing)": 400.0}
    drift = field_drift(reference, recent, ordered=["+4", "+5", "(missing)"])
    assert drift.psi is not None and drift.psi > 1.0
    assert flagged(drift, threshold=0.2, alpha=ALPHA, window=1)
    # The same window far later must clear a higher bar: 1 / (w_k alpha) grows as k^2.
    late = int(math.exp(drift.log_e / 2)) + 1
    assert not flagged(drift, threshold=0.2, alpha=ALPHA, window=late)


def test_window_weights_spend_alpha_once_over_all_windows() -> None:
    assert sum(window_weight(k) for k in range(1, 10_001)) == pytest.approx(1 - 1 / 10_001)
    assert window_log_threshold(1, 0.025) == pytest.approx(math.log(80))
    assert window_log_threshold(24, 0.025) == pytest.approx(math.log(24 * 25 / 0.025))
    with pytest.raises(ValueError):
        window_weight(0)


def test_log_cells_are_fixed_and_ordered() -> None:
    assert [log_cell(v) for v in (0.0, 1.0, 1.7, 1.8, -1.0, 1e9)] == [
        "0",
        "+0",
        "+0",
        "+1",
        "-0",
        "+24",
    ]
    assert sorted(["+1", "-0", "0", "+0", "-3"], key=cell_order) == ["-3", "-0", "0", "+0", "+1"]


def test_a_a_with_sticky_heavy_users_stays_under_alpha_and_requests_as_draws_do_not() -> None:
    """The seeded world of bench.input_drift_sticky, fewer runs: 2 fields, 24 windows, PSI
    threshold 0 (the e-value alone decides). Per user and window: none flagged in 40 runs
    (Wilson upper bound under 0.1); requests as draws: false alarms above alpha."""
    users = false_alarms(40, seed=71)
    assert users == 0 and wilson_upper(users, 40) < 0.1
    requests = false_alarms(40, seed=73, construction="requests")
    assert requests / 40 > ALPHA


def test_the_simulation_s_claims_count_a_user_once_across_processes() -> None:
    """bench.input_drift_sticky's model of routing.observe.inputs' claims: with 4 edge
    processes a user with requests counts once (without the claims, once per process)."""
    rng = np.random.default_rng(76)
    requests = rng.poisson(rng.pareto(1.2, 5000) * 0.1)
    per_process = _counted(np.random.default_rng(77), requests, 4)
    claimed = _counted(np.random.default_rng(77), requests, 4, claims=True)
    assert (claimed == (requests > 0)).all()
    assert per_process.max() == 4 and (per_process >= claimed).all()


def test_a_shifted_field_is_detected_within_a_few_windows() -> None:
    """About 1,000 monitored users per window: found in the first window or two."""
    windows, seen = detection(10, seed=74, windows=6, category_shift=0.10)
    assert np.isfinite(windows).all() and np.median(windows) == 1
    windows, seen = detection(10, seed=75, windows=6, number_shift=0.3)
    assert np.isfinite(windows).all() and np.median(seen) < 2_000
