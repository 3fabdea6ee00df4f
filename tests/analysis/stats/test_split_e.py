"""The exact conditional e-value of a window against the reference, against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import hypergeom, nchypergeom_fisher

from analysis.stats.split_e import _LOG_WEIGHTS, THETAS, split_log_e, splits, window_log_e


@pytest.mark.parametrize(("x_a", "n_x", "s", "total"), [(30, 100, 70, 250), (0, 12, 5, 40)])
def test_one_table_s_e_value_is_the_mixture_of_fisher_s_noncentral_over_the_central(
    x_a: int, n_x: int, s: int, total: int
) -> None:
    expected = logsumexp(
        [
            weight
            + nchypergeom_fisher.logpmf(x_a, total, s, n_x, math.exp(theta))
            - hypergeom.logpmf(x_a, total, s, n_x)
            for theta, weight in zip(THETAS, _LOG_WEIGHTS, strict=True)
        ]
    )
    assert split_log_e(x_a, n_x, s, total) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_its_expectation_under_the_hypergeometric_null_is_exactly_one() -> None:
    n_x, s, total = 80, 150, 400
    support = np.arange(max(0, n_x - (total - s)), min(s, n_x) + 1)
    mean = sum(
        hypergeom.pmf(x, total, s, n_x) * math.exp(split_log_e(int(x), n_x, s, total))
        for x in support
    )
    assert mean == pytest.approx(1.0, rel=1e-9)
    # Fixed margins leave no room: no evidence.
    assert split_log_e(5, 5, 10, 10) == 0.0 and split_log_e(0, 5, 0, 10) == 0.0


def test_the_splits_depend_on_the_pooled_counts_only() -> None:
    ordered = ["+1", "+2", "+3", "+4", "+5", "(missing)"]
    reference = {"+1": 10.0, "+2": 30.0, "+3": 20.0, "+4": 30.0, "+5": 10.0}
    window = {"+1": 40.0, "+2": 20.0, "+3": 20.0, "+4": 10.0, "+5": 10.0, "(missing)": 5.0}
    pooled = {c: reference.get(c, 0.0) + window.get(c, 0.0) for c in ordered}
    parts = splits(pooled, ordered=ordered, special=["(missing)"])
    # Pooled shares 0.24, 0.24, 0.19, 0.19, 0.095 (+ missing): below 0.2, 0.5, 0.8.
    assert parts == [
        frozenset({"+1"}),
        frozenset({"+1", "+2"}),
        frozenset({"+1", "+2", "+3"}),
        frozenset({"(missing)"}),
    ]
    assert splits({"b": 5.0, "a": 5.0, "c": 9.0, "d": 1.0}, ordered=None) == [
        frozenset({"c"}),
        frozenset({"a"}),
        frozenset({"b"}),
    ]
    # Swapping the samples' roles keeps the splits, so the e-values are of the same tables.
    swapped = window_log_e(window, reference, ordered=ordered, special=["(missing)"])
    assert np.isfinite(swapped) and swapped > 0


def test_a_window_like_the_reference_gives_no_evidence_and_a_shift_gives_much() -> None:
    reference = {"DE": 500.0, "FR": 300.0, "IT": 200.0}
    assert window_log_e(reference, {"DE": 250.0, "FR": 150.0, "IT": 100.0}, ordered=None) < 0
    assert window_log_e(reference, {"DE": 100.0, "FR": 50.0, "IT": 350.0}, ordered=None) > 20
    assert window_log_e(reference, {}, ordered=None) == 0.0
