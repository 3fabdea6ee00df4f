"""Effects and fixed-horizon tests against gbstats 0.8.0, scipy, statsmodels and STATS.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gbstats.frequentist.tests import (
    FrequentistConfig,
    OneSidedTreatmentGreaterTTest,
    TwoSidedTTest,
)
from gbstats.models.statistics import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)
from scipy import stats as scipy_stats
from statsmodels.stats import proportion as sm_proportion

from analysis.stats.effects import EffectError, cuped_theta, estimate_effect
from analysis.stats.fixed import fixed_horizon_test
from analysis.stats.moments import CupedStats, MeanStats, ProportionStats, RatioStats

RNG_SEED = 20240601


def _mean_stats(n: int, mean: float, sd: float) -> MeanStats:
    total = n * mean
    return MeanStats(n=n, sum=total, sum_squares=(n - 1) * sd * sd + total * total / n)


def _gb_mean(stats: MeanStats) -> SampleMeanStatistic:
    return SampleMeanStatistic(n=stats.n, sum=stats.sum, sum_squares=stats.sum_squares)


def _gb_ratio(stats: RatioStats) -> RatioStatistic:
    return RatioStatistic(
        n=stats.n,
        m_statistic=SampleMeanStatistic(
            n=stats.n, sum=stats.numerator_sum, sum_squares=stats.numerator_sum_squares
        ),
        d_statistic=SampleMeanStatistic(
            n=stats.n, sum=stats.denominator_sum, sum_squares=stats.denominator_sum_squares
        ),
        m_d_sum_of_products=stats.cross_sum,
    )


def _gb_cuped(stats: CupedStats) -> RegressionAdjustedStatistic:
    return RegressionAdjustedStatistic(
        n=stats.n,
        post_statistic=SampleMeanStatistic(n=stats.n, sum=stats.sum, sum_squares=stats.sum_squares),
        pre_statistic=SampleMeanStatistic(
            n=stats.n, sum=stats.pre_sum, sum_squares=stats.pre_sum_squares
        ),
        post_pre_sum_of_products=stats.cross_sum,
        theta=0,
    )


def _cases() -> list[tuple[str, object, object, object, object]]:
    rng = np.random.default_rng(RNG_SEED)
    d_a, d_b = rng.poisson(3, 3000) + 1.0, rng.poisson(3, 3100) + 1.0
    m_a, m_b = rng.binomial(d_a.astype(int), 0.30) * 1.0, rng.binomial(d_b.astype(int), 0.32) * 1.0
    ratio_a, ratio_b = RatioStats.from_values(m_a, d_a), RatioStats.from_values(m_b, d_b)
    mean_a, mean_b = _mean_stats(5000, 120.0, 40.0), _mean_stats(4800, 123.0, 42.0)
    return [
        (
            "proportion",
            ProportionStats(n=10_000, sum=1000),
            ProportionStats(n=10_000, sum=1080),
            ProportionStatistic(n=10_000, sum=1000),
            ProportionStatistic(n=10_000, sum=1080),
        ),
        ("mean", mean_a, mean_b, _gb_mean(mean_a), _gb_mean(mean_b)),
        ("ratio", ratio_a, ratio_b, _gb_ratio(ratio_a), _gb_ratio(ratio_b)),
    ]


CASES = _cases()


@pytest.mark.parametrize(("name", "ours_a", "ours_b", "gb_a", "gb_b"), CASES)
@pytest.mark.parametrize("difference_type", ["absolute", "relative"])
def test_two_sided_welch_matches_gbstats(
    name: str, ours_a: object, ours_b: object, gb_a: object, gb_b: object, difference_type: str
) -> None:
    effect = estimate_effect(ours_a, ours_b, relative=difference_type == "relative")  # type: ignore[arg-type]
    ours = fixed_horizon_test(effect, alpha=0.05)
    gb = TwoSidedTTest(gb_a, gb_b, FrequentistConfig(difference_type=difference_type))
    theirs = gb.compute_result()
    assert ours.estimate == pytest.approx(theirs.expected, abs=1e-9)
    assert ours.ci_lower == pytest.approx(theirs.ci[0], abs=1e-6)
    assert ours.ci_upper == pytest.approx(theirs.ci[1], abs=1e-6)
    assert ours.p_value == pytest.approx(theirs.p_value, abs=1e-6)
    assert ours.df == pytest.approx(gb.dof, rel=1e-9)


@pytest.mark.parametrize(("name", "ours_a", "ours_b", "gb_a", "gb_b"), CASES)
def test_one_sided_greater_matches_gbstats(
    name: str, ours_a: object, ours_b: object, gb_a: object, gb_b: object
) -> None:
    effect = estimate_effect(ours_a, ours_b, relative=True)  # type: ignore[arg-type]
    ours = fixed_horizon_test(effect, alpha=0.05, alternative="greater")
    theirs = OneSidedTreatmentGreaterTTest(gb_a, gb_b).compute_result()
    assert ours.p_value == pytest.approx(theirs.p_value, abs=1e-6)
    assert ours.ci_lower == pytest.approx(theirs.ci[0], abs=1e-6)
    assert ours.ci_upper == math.inf


def test_published_binomial_case() -> None:
    # STATS.md GB-BINOM-FIX (gbstats 0.8.0): 1,000 / 10,000 vs 1,080 / 10,000.
    a, b = ProportionStats(n=10_000, sum=1000), ProportionStats(n=10_000, sum=1080)
    absolute = fixed_horizon_test(estimate_effect(a, b, relative=False))
    assert absolute.p_value == pytest.approx(0.063857, abs=1e-6)
    relative = fixed_horizon_test(estimate_effect(a, b, relative=True))
    # GB-BINOM-FIX-REL: CI [-0.00794, 0.16794] (spotify's ZTest without the delta term gives
    # [-0.00461, 0.16461]).
    assert relative.ci_lower == pytest.approx(-0.00794, abs=1e-5)
    assert relative.ci_upper == pytest.approx(0.16794, abs=1e-5)


def test_welch_matches_scipy_from_raw_data() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.lognormal(4, 0.5, 700), rng.lognormal(4.05, 0.6, 650)
    ours = fixed_horizon_test(
        estimate_effect(MeanStats.from_values(a), MeanStats.from_values(b), relative=False)
    )
    theirs = scipy_stats.ttest_ind(b, a, equal_var=False)
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-7)
    low, high = theirs.confidence_interval(0.95)
    assert (ours.ci_lower, ours.ci_upper) == pytest.approx((low, high), rel=1e-7)


def test_z_test_of_proportions_matches_statsmodels_wald() -> None:
    a, b = ProportionStats(n=8000, sum=400), ProportionStats(n=7900, sum=452)
    ours = fixed_horizon_test(estimate_effect(a, b, relative=False), distribution="z")
    # statsmodels' unpooled Wald test uses the same population variances p(1 - p) / n.
    theirs = sm_proportion.test_proportions_2indep(
        452, 7900, 400, 8000, method="wald", compare="diff"
    )
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


def test_one_sided_less_interval_is_an_upper_bound() -> None:
    effect = estimate_effect(_mean_stats(900, 10, 3), _mean_stats(900, 9.5, 3), relative=False)
    less = fixed_horizon_test(effect, alternative="less")
    two = fixed_horizon_test(effect, alpha=0.10)
    assert less.ci_lower == -math.inf
    # A one-sided 95% bound equals the upper end of the two-sided 90% interval.
    assert less.ci_upper == pytest.approx(two.ci_upper, rel=1e-12)
    assert less.p_value == pytest.approx(two.p_value / 2, rel=1e-9)


def test_ratio_published_case() -> None:
    # STATS.md GB-RATIO-FIX-REL gives R_A = 1.5, R_B = 1.5652174 (= 36/23), per-unit ratio
    # variances 0.4376094 / 0.5179862 and (from the SE) n = 4,000 per arm. Inputs are rebuilt
    # with those moments: D has mean 2 / 2.3 and variance 1, cov(M, D) = 1.5, and var(M) is
    # solved from the published per-unit ratio variance.
    def arm(mean_m: float, mean_d: float, ratio_variance: float) -> RatioStats:
        n, var_d, cov = 4000, 1.0, 1.5
        var_m = mean_d**2 * (
            ratio_variance + 2 * cov * mean_m / mean_d**3 - mean_m**2 * var_d / mean_d**4
        )
        s_m, s_d = n * mean_m, n * mean_d
        return RatioStats(
            n=n,
            numerator_sum=s_m,
            numerator_sum_squares=(n - 1) * var_m + s_m**2 / n,
            denominator_sum=s_d,
            denominator_sum_squares=(n - 1) * var_d + s_d**2 / n,
            cross_sum=(n - 1) * cov + s_m * s_d / n,
        )

    a, b = arm(3.0, 2.0, 0.4376094), arm(3.6, 2.3, 0.5179862)
    assert b.mean == pytest.approx(1.5652174, abs=1e-7)
    result = fixed_horizon_test(estimate_effect(a, b, relative=True))
    assert result.estimate == pytest.approx(0.0434783, abs=1e-7)
    assert result.se == pytest.approx(0.0105118, abs=1e-7)
    assert result.ci_lower == pytest.approx(0.0228724, abs=1e-7)
    assert result.ci_upper == pytest.approx(0.0640841, abs=1e-7)
    assert result.p_value == pytest.approx(3.568e-5, rel=1e-3)


Arrays = tuple[np.ndarray, np.ndarray]


def _cuped_pair(seed: int = 5) -> tuple[CupedStats, CupedStats, Arrays, Arrays]:
    rng = np.random.default_rng(seed)
    x_a, x_b = rng.gamma(4, 5, 2000), rng.gamma(4, 5, 2100)
    y_a = 5 + 0.8 * x_a + rng.normal(0, 8, 2000)
    y_b = 6 + 0.8 * x_b + rng.normal(0, 8, 2100)
    a, b = CupedStats.from_values(y_a, x_a), CupedStats.from_values(y_b, x_b)
    return a, b, (y_a, x_a), (y_b, x_b)


def test_cuped_absolute_matches_gbstats() -> None:
    a, b, _, _ = _cuped_pair()
    ours = fixed_horizon_test(estimate_effect(a, b, relative=False))
    theirs = TwoSidedTTest(
        _gb_cuped(a), _gb_cuped(b), FrequentistConfig(difference_type="absolute")
    ).compute_result()
    assert ours.estimate == pytest.approx(theirs.expected, abs=1e-9)
    assert (ours.ci_lower, ours.ci_upper) == pytest.approx(tuple(theirs.ci), abs=1e-6)
    assert ours.p_value == pytest.approx(theirs.p_value, abs=1e-6)


def test_cuped_relative_uses_the_corrected_delta_method() -> None:
    a, b, data_a, data_b = _cuped_pair()
    effect = estimate_effect(a, b, relative=True)
    theta = cuped_theta(a, b)
    # Independent check: the gradient of g = (Y_B - t X_B - Y_A + t X_A) / Y_A applied to each
    # arm's sample covariance matrix of (Y, X) means (numpy), with t held fixed.
    (y_a, x_a), (y_b, x_b) = data_a, data_b
    mean_y_a, mean_x_a, mean_y_b, mean_x_b = y_a.mean(), x_a.mean(), y_b.mean(), x_b.mean()
    adjusted_b = mean_y_b - theta * mean_x_b
    grad_b = np.array([1 / mean_y_a, -theta / mean_y_a])
    # Around X_A ~ X_B the control gradient is (-Y_B / Y_A^2, t / Y_A) (STATS.md 5 step 4).
    grad_a = np.array([-mean_y_b / mean_y_a**2, theta / mean_y_a])
    variance = grad_b @ np.cov(y_b, x_b) @ grad_b / y_b.size + (
        grad_a @ np.cov(y_a, x_a) @ grad_a / y_a.size
    )
    assert effect.estimate == pytest.approx(
        (adjusted_b - (mean_y_a - theta * mean_x_a)) / mean_y_a, rel=1e-9
    )
    assert effect.se == pytest.approx(math.sqrt(variance), rel=1e-9)
    # gbstats 0.8.0 (old formula) shares the point estimate but not the control variance term.
    theirs = TwoSidedTTest(_gb_cuped(a), _gb_cuped(b)).compute_result()
    assert effect.estimate == pytest.approx(theirs.expected, abs=1e-9)


def test_cuped_reduces_the_se_by_the_correlation() -> None:
    # STATS.md 5 reference: with corr(X, Y) = 0.7 the SE falls from 0.5101 to 0.3644 (the
    # reference data had a sample correlation of about 0.6998). Rebuilt here with exact
    # correlation 0.7 in both arms, var 1 pre-period, equal means, unadjusted SE 0.5101.
    n, corr = 1000, 0.7
    sd_y = 0.5101 * math.sqrt(n / 2)

    def arm(mean_y: float) -> CupedStats:
        s_y, s_x = n * mean_y, n * 10.0
        return CupedStats(
            n=n,
            sum=s_y,
            sum_squares=(n - 1) * sd_y**2 + s_y**2 / n,
            pre_sum=s_x,
            pre_sum_squares=(n - 1) * 1.0 + s_x**2 / n,
            cross_sum=(n - 1) * corr * sd_y + s_y * s_x / n,
        )

    a, b = arm(50.0), arm(50.0)
    unadjusted = estimate_effect(a.post, b.post, relative=False)
    adjusted = estimate_effect(a, b, relative=False)
    assert unadjusted.se == pytest.approx(0.5101, rel=1e-9)
    assert adjusted.se == pytest.approx(0.3644, rel=1e-3)
    assert adjusted.se == pytest.approx(0.5101 * math.sqrt(1 - corr**2), rel=1e-9)


def test_cuped_without_pre_period_variance_falls_back_to_the_raw_metric() -> None:
    y = np.arange(100, dtype=float)
    a = CupedStats.from_values(y, np.ones(100))
    b = CupedStats.from_values(y + 1, np.ones(100))
    effect = estimate_effect(a, b, relative=False)
    assert effect.cuped_theta is None
    assert effect.estimate == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("a", "b", "relative", "error"),
    [
        (ProportionStats(n=100, sum=0), ProportionStats(n=100, sum=5), True, "baseline_zero"),
        (ProportionStats(n=100, sum=0), ProportionStats(n=100, sum=5), False, "zero_variance"),
        (ProportionStats(n=1, sum=1), ProportionStats(n=100, sum=5), False, "insufficient_data"),
    ],
)
def test_degenerate_inputs_give_no_result(
    a: ProportionStats, b: ProportionStats, relative: bool, error: str
) -> None:
    effect = estimate_effect(a, b, relative=relative)
    assert effect.error == EffectError(error)
    result = fixed_horizon_test(effect)
    assert (result.estimate, result.ci_lower, result.ci_upper, result.p_value) == (0, 0, 0, 1)


def test_arms_of_different_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="same kind"):
        estimate_effect(
            ProportionStats(n=10, sum=1), MeanStats(n=1, sum=1, sum_squares=1), relative=False
        )
