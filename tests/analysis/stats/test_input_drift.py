"""Input drift statistics: the e-value's pieces against scipy, grouping, seeded worlds."""

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
)
from bench.input_drift import ALPHA, detection, false_alarms
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
    drift = field_drift(reference, recent, recent, ordered=["+4", "+5", "(missing)"])
    assert drift.psi is not None and drift.psi > 1.0
    assert flagged(drift, threshold=0.2, alpha=ALPHA)


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


def test_a_a_stationary_inputs_stay_under_alpha() -> None:
    # PSI threshold 0: the e-value alone decides, the worst case for validity (60 runs each).
    assert false_alarms(60, kind="number", seed=41) / 60 <= ALPHA
    assert false_alarms(60, kind="category", seed=42) / 60 <= ALPHA


def test_a_shifted_field_is_detected() -> None:
    found = detection(20, kind="category", shift=0.10, threshold=0.05, seed=43)
    assert np.isfinite(found).all() and np.median(found) <= 5_000
    found = detection(20, kind="number", shift=0.3, threshold=0.1, seed=44)
    assert np.isfinite(found).mean() >= 0.9
