"""SRM (chi-square and Dirichlet e-value), multiple exposure, and multiple-testing corrections."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gbstats.utils import check_srm
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from scipy.special import gammaln
from statsmodels.stats.multitest import multipletests

from analysis.stats.health import multiple_exposure_check, srm_chi_square, srm_sequential
from analysis.stats.multiple import adjust_p_values, bonferroni_alphas


@pytest.mark.parametrize(
    ("observed", "weights"),
    [
        ([3300, 3350, 3100], [1, 1, 1]),
        ([5000, 5120], [0.5, 0.5]),
        ([9000, 1100], [0.9, 0.1]),
        ([400, 0, 380], [0.5, 0.0, 0.5]),
    ],
)
def test_chi_square_matches_gbstats(observed: list[int], weights: list[float]) -> None:
    assert srm_chi_square(observed, weights).p_value == pytest.approx(
        check_srm(observed, weights), abs=1e-12
    )


def test_chi_square_matches_scipy() -> None:
    observed = [9000, 1100]
    expected = [0.9 * 10_100, 0.1 * 10_100]
    assert srm_chi_square(observed, [9, 1]).p_value == pytest.approx(
        scipy_stats.chisquare(observed, expected).pvalue, rel=1e-12
    )


def test_chi_square_flags_only_past_the_threshold_and_minimum() -> None:
    assert srm_chi_square([9000, 1300], [0.9, 0.1]).flagged
    assert not srm_chi_square([9000, 1050], [0.9, 0.1]).flagged
    # 60 vs 20 on 50/50 has p ~ 7e-6 but fewer than 100 units: no flag yet.
    small = srm_chi_square([60, 20], [1, 1])
    assert small.p_value < 0.001 and not small.enough_data and not small.flagged
    assert srm_chi_square([0, 0], [1, 1]).p_value == 1.0


def test_dirichlet_e_value_reference() -> None:
    # STATS.md 7.2 SRM-SEQ-DIRICHLET: [3300, 3350, 3100] on an equal split, kappa = 1000.
    result = srm_sequential([3300, 3350, 3100], [1, 1, 1], concentration=1000)
    assert result.log_e_value == pytest.approx(2.539, abs=5e-4)
    assert not result.flagged


def test_dirichlet_e_value_against_a_direct_bayes_factor() -> None:
    # Two arms: the Dirichlet-multinomial is a beta-binomial; the Bayes factor against the
    # point null is B(a + o1, b + o2) / B(a, b) / (pi1^o1 pi2^o2) (binomial coefficients cancel).
    o1, o2, pi1, kappa = 5200, 4800, 0.5, 400.0
    a, b = kappa * pi1, kappa * (1 - pi1)
    log_beta = gammaln(a + o1) + gammaln(b + o2) - gammaln(a + b + o1 + o2)
    expected = log_beta - (gammaln(a) + gammaln(b) - gammaln(a + b)) - (o1 + o2) * math.log(0.5)
    result = srm_sequential([o1, o2], [1, 1], concentration=kappa)
    assert result.log_e_value == pytest.approx(expected, rel=1e-12)


def test_dirichlet_flags_a_real_mismatch_and_keeps_the_running_max() -> None:
    flagged = srm_sequential([9000, 1400], [0.9, 0.1])
    assert flagged.flagged and flagged.p_value < 0.001
    later = srm_sequential(
        [9000, 1000], [0.9, 0.1], previous_max_log_e_value=flagged.max_log_e_value
    )
    assert later.log_e_value < flagged.log_e_value
    assert later.flagged and later.max_log_e_value == flagged.max_log_e_value
    assert srm_sequential([10, 1], [1, 0]).flagged


def test_dirichlet_srm_is_anytime_valid_under_the_null() -> None:
    # A/A: 2,000 experiments, 90/10 split, 40 looks of 250 units; the chance that the e-value
    # ever reaches 1/alpha (alpha = 0.05 here to make the rate measurable) stays below alpha.
    rng = np.random.default_rng(99)
    treatment = rng.binomial(250, 0.1, size=(2000, 40)).cumsum(axis=1)
    total = 250 * np.arange(1, 41)
    fired = 0
    for row in treatment:
        best = 0.0
        for n_b, n in zip(row, total, strict=True):
            best = srm_sequential(
                [int(n - n_b), int(n_b)], [0.9, 0.1], alpha=0.05, previous_max_log_e_value=best
            ).max_log_e_value
        fired += best >= math.log(20)
    assert fired / 2000 <= 0.05


def test_multiple_exposure() -> None:
    assert multiple_exposure_check(units_exposed=10_000, units_multiple=150).flagged
    ok = multiple_exposure_check(units_exposed=10_000, units_multiple=50)
    assert ok.share == pytest.approx(0.005) and not ok.flagged
    assert not multiple_exposure_check(units_exposed=0, units_multiple=0).flagged
    assert multiple_exposure_check(units_exposed=100, units_multiple=3, threshold=0.02).flagged
    with pytest.raises(ValueError, match="units_multiple"):
        multiple_exposure_check(units_exposed=10, units_multiple=11)


def test_invalid_srm_inputs() -> None:
    with pytest.raises(ValueError, match="observed"):
        srm_chi_square([1, -1], [1, 1])
    with pytest.raises(ValueError, match="expected_weights"):
        srm_sequential([1, 1], [0, 0])
    with pytest.raises(ValueError, match="same length"):
        srm_chi_square([1, 1], [1])


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=30),
    st.sampled_from(["bh", "holm", "bonferroni"]),
)
# p exactly at a procedure's threshold, where m * p rounds above alpha: 11 * (0.05 / 11)
# gives 0.05000000000000001, and BH's 4 * p / 3 at p = (3 / 4) * 0.05 does too.
@example([0.05 / 11] + [0.5] * 10, "bonferroni")
@example([0.05 / 11] + [0.5] * 10, "holm")
@example([0.01, 0.02, 3 / 4 * 0.05, 0.9], "bh")
def test_corrections_match_statsmodels(p_values: list[float], method: str) -> None:
    name = {"bh": "fdr_bh", "holm": "holm", "bonferroni": "bonferroni"}[method]
    rejected, adjusted, _, _ = multipletests(p_values, alpha=0.05, method=name)
    ours = adjust_p_values(p_values, method=method, alpha=0.05)  # type: ignore[arg-type]
    assert ours.adjusted == pytest.approx(list(adjusted), abs=1e-12)
    assert list(ours.rejected) == list(rejected)


def test_bonferroni_split() -> None:
    alphas = bonferroni_alphas([2, 1, 1], alpha=0.05)
    assert alphas == pytest.approx((0.025, 0.0125, 0.0125))
    assert math.fsum(alphas) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="weights"):
        bonferroni_alphas([1, 0], alpha=0.05)
    with pytest.raises(ValueError, match="p-values"):
        adjust_p_values([0.5, 1.2])
