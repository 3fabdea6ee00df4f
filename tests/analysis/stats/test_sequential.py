"""Confidence sequences, e-values and mSPRT against gbstats, confseq's values and STATS.md."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from gbstats.frequentist.tests import SequentialConfig, SequentialTwoSidedTTest
from gbstats.models.statistics import ProportionStatistic, SampleMeanStatistic
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from analysis.stats.effects import estimate_effect
from analysis.stats.fixed import fixed_horizon_test
from analysis.stats.moments import MeanStats, ProportionStats, RatioStats
from analysis.stats.sequential import (
    RunningEvidence,
    asymptotic_confidence_sequence,
    asymptotic_one_sided_bound,
    asymptotic_rho,
    matched_tau2,
    msprt,
    normal_mixture_bound,
    normal_mixture_confidence_sequence,
    normal_mixture_log_e,
    normal_mixture_one_sided_bound,
    normal_mixture_rho,
)


def _mean_stats(n: int, mean: float, sd: float) -> MeanStats:
    total = n * mean
    return MeanStats(n=n, sum=total, sum_squares=(n - 1) * sd * sd + total * total / n)


BINOM_A = ProportionStats(n=10_000, sum=1000)
BINOM_B = ProportionStats(n=10_000, sum=1080)


def test_rho_reference_values() -> None:
    # STATS.md 2.1 and 2.2: alpha = 0.05, N* = 5000.
    assert asymptotic_rho(0.05, 5000) == pytest.approx(0.0398401, abs=1e-7)
    assert asymptotic_rho(0.05, 5000, one_sided=True) == pytest.approx(0.0355777, abs=1e-7)


@pytest.mark.parametrize("difference_type", ["absolute", "relative"])
@pytest.mark.parametrize("tuning", [5000.0, 20_000.0])
@pytest.mark.parametrize(
    ("ours", "gb"),
    [
        (
            (BINOM_A, BINOM_B),
            (ProportionStatistic(n=10_000, sum=1000), ProportionStatistic(n=10_000, sum=1080)),
        ),
        (
            (_mean_stats(3000, 50.0, 20.0), _mean_stats(2500, 52.0, 22.0)),
            (
                SampleMeanStatistic(
                    n=3000, sum=150_000.0, sum_squares=_mean_stats(3000, 50.0, 20.0).sum_squares
                ),
                SampleMeanStatistic(
                    n=2500, sum=130_000.0, sum_squares=_mean_stats(2500, 52.0, 22.0).sum_squares
                ),
            ),
        ),
    ],
)
def test_two_sided_cs_matches_gbstats(
    ours: tuple[object, object], gb: tuple[object, object], difference_type: str, tuning: float
) -> None:
    effect = estimate_effect(*ours, relative=difference_type == "relative")  # type: ignore[arg-type]
    result = asymptotic_confidence_sequence(effect, alpha=0.05, n_star=tuning)
    config = SequentialConfig(difference_type=difference_type, sequential_tuning_parameter=tuning)
    theirs = SequentialTwoSidedTTest(*gb, config).compute_result()  # type: ignore[arg-type]
    assert result.lower == pytest.approx(theirs.ci[0], abs=1e-6)
    assert result.upper == pytest.approx(theirs.ci[1], abs=1e-6)
    assert result.p_value == pytest.approx(theirs.p_value, abs=1e-6)


def test_published_sequential_binomial_case() -> None:
    # STATS.md GB-BINOM-SEQ: fixed p 0.064 but sequential p exactly 1; EQ-NORMAL-MIXTURE:
    # E = 0.923589 from GrowthBook, confseq and Johari, boundary on S = 442.2407 at N = 20,000.
    effect = estimate_effect(BINOM_A, BINOM_B, relative=False)
    assert fixed_horizon_test(effect).p_value == pytest.approx(0.0639, abs=1e-4)
    cs = asymptotic_confidence_sequence(effect, alpha=0.05, n_star=5000)
    assert cs.p_value == 1.0
    assert cs.e_value == pytest.approx(0.923589, abs=1e-6)
    z = effect.estimate / effect.se
    assert math.exp(normal_mixture_log_e(z * math.sqrt(20_000), 20_000, v_opt=5000)) == (
        pytest.approx(0.923589, abs=1e-6)
    )
    tau2 = matched_tau2(effect.variance * effect.total_n, alpha=0.05, n_star=5000)
    assert msprt(effect, alpha=0.05, tau2=tau2).e_value == pytest.approx(0.923589, abs=1e-6)
    assert normal_mixture_bound(20_000, alpha=0.05, v_opt=5000) == pytest.approx(442.2407, abs=1e-4)


def test_confseq_reference_values() -> None:
    # gostevehoward/confseq test suite (values from its reference R implementation),
    # v_opt = 100, alpha_opt = alpha = 0.05.
    assert normal_mixture_rho(100, 0.05) == pytest.approx(12.60056, abs=1e-5)
    assert normal_mixture_log_e(10, 100, v_opt=100) == pytest.approx(-0.6510052, abs=1e-6)
    assert normal_mixture_bound(100, alpha=0.05, v_opt=100) == pytest.approx(30.35209, abs=1e-5)
    assert normal_mixture_log_e(10, 100, v_opt=100, one_sided=True) == pytest.approx(
        -0.06502391, abs=1e-7
    )
    assert normal_mixture_bound(100, alpha=0.05, v_opt=100, one_sided=True) == pytest.approx(
        27.66071, abs=1e-5
    )


def test_howard_normal_mixture_cs_equals_growthbook() -> None:
    # STATS.md 2.3: the two-sided normal mixture on (z sqrt(N), N) is GrowthBook's CS.
    for n_star in (1000.0, 5000.0, 40_000.0):
        effect = estimate_effect(BINOM_A, BINOM_B, relative=True)
        gb = asymptotic_confidence_sequence(effect, alpha=0.05, n_star=n_star)
        howard = normal_mixture_confidence_sequence(effect, alpha=0.05, n_star=n_star)
        assert (howard.lower, howard.upper) == pytest.approx((gb.lower, gb.upper), rel=1e-12)
        assert howard.log_e_value == pytest.approx(gb.log_e_value, rel=1e-9, abs=1e-12)


def test_one_sided_normal_mixture_is_between_the_two_sided_bounds() -> None:
    effect = estimate_effect(BINOM_A, BINOM_B, relative=False)
    one = normal_mixture_one_sided_bound(effect, alpha=0.05, n_star=5000)
    two_05 = normal_mixture_confidence_sequence(effect, alpha=0.05, n_star=5000)
    assert two_05.lower < one.bound < effect.estimate
    upper = normal_mixture_one_sided_bound(effect, alpha=0.05, n_star=5000, side="upper")
    assert upper.bound - effect.estimate == pytest.approx(effect.estimate - one.bound, rel=1e-12)


def test_one_sided_guardrail_reference_values() -> None:
    # STATS.md 9.1 GBH-GUARDRAIL-LATENCY-MEAN-ABS: 120 -> 122 ms, 20k per arm (sd 40 / 41,
    # rebuilt from the published bound): lower bound 0.802 ms, p = 2.3084e-5 (gbstats
    # bisection 2.3086e-5).
    latency = estimate_effect(
        _mean_stats(20_000, 120.0, 40.0), _mean_stats(20_000, 122.0, 41.0), relative=False
    )
    bound = asymptotic_one_sided_bound(latency, alpha=0.05, n_star=5000)
    assert bound.bound == pytest.approx(0.802, abs=1e-3)
    assert bound.p_value == pytest.approx(2.3084e-5, rel=5e-3)
    # GBH-GUARDRAIL-ERROR-RATE: 1.0% -> 1.3% at 20k per arm: fixed one-sided p = 0.0024, but
    # the sequential lower bound -0.000153 < 0: no rollback yet.
    errors = estimate_effect(
        ProportionStats(n=20_000, sum=200), ProportionStats(n=20_000, sum=260), relative=False
    )
    assert fixed_horizon_test(errors, alternative="greater").p_value == pytest.approx(
        0.0024, abs=1e-4
    )
    assert asymptotic_one_sided_bound(errors, alpha=0.05, n_star=5000).bound == pytest.approx(
        -0.000153, abs=1e-6
    )


def test_one_sided_p_value_is_the_level_where_the_bound_touches_zero() -> None:
    effect = estimate_effect(
        _mean_stats(20_000, 120.0, 40.0), _mean_stats(20_000, 121.0, 41.0), relative=False
    )
    first = asymptotic_one_sided_bound(effect, alpha=0.05, n_star=5000)
    # Holding rho at the design alpha (as gbstats), the bound at alpha' = p is exactly 0.
    rho2 = asymptotic_rho(0.05, 5000, one_sided=True) ** 2
    k = effect.total_n * rho2 + 1
    width = effect.se * math.sqrt(
        2 * k / (effect.total_n * rho2) * math.log(1 + math.sqrt(k) / (2 * first.p_value))
    )
    assert effect.estimate - width == pytest.approx(0.0, abs=1e-9)


def test_width_inflation_over_the_fixed_interval() -> None:
    # STATS.md 2.1: at alpha = 0.05 the CS is 1.55x the fixed z interval at N = N* (minimum).
    effect = estimate_effect(
        _mean_stats(2500, 10.0, 3.0), _mean_stats(2500, 10.2, 3.0), relative=False
    )
    cs = asymptotic_confidence_sequence(effect, alpha=0.05, n_star=5000)
    ratio = (cs.upper - cs.estimate) / (effect.se * scipy_stats.norm.isf(0.025))
    assert ratio == pytest.approx(1.55, abs=0.005)


def test_msprt_with_matched_tau_equals_growthbook_at_unequal_allocation() -> None:
    # STATS.md 3 rule (ii): tau^2 = rho^2 sigma^2 reproduces GrowthBook with the same N*.
    a, b = ProportionStats(n=18_000, sum=180), ProportionStats(n=2000, sum=31)
    effect = estimate_effect(a, b, relative=False)
    tau2 = matched_tau2(effect.variance * effect.total_n, alpha=0.05, n_star=20_000)
    mixture = msprt(effect, alpha=0.05, tau2=tau2)
    gb = asymptotic_confidence_sequence(effect, alpha=0.05, n_star=20_000)
    assert (mixture.lower, mixture.upper) == pytest.approx((gb.lower, gb.upper), rel=1e-12)
    assert mixture.p_value == pytest.approx(gb.p_value, rel=1e-12)


def test_msprt_matches_johari_paper_form() -> None:
    # Johari et al. 2017 for normal data with known variance: V = 2 sigma^2, n per arm.
    sigma, tau, n, d = 2.0, 0.3, 400, 0.25
    paper = math.sqrt(2 * sigma**2 / (2 * sigma**2 + n * tau**2)) * math.exp(
        n**2 * tau**2 * d**2 / (4 * sigma**2 * (2 * sigma**2 + n * tau**2))
    )
    effect = estimate_effect(
        _mean_stats(n, 0.0 + 5, sigma), _mean_stats(n, d + 5, sigma), relative=False
    )
    assert effect.variance == pytest.approx(2 * sigma**2 / n, rel=1e-12)
    assert msprt(effect, tau2=tau**2).e_value == pytest.approx(paper, rel=1e-12)


def test_running_evidence_is_monotone() -> None:
    evidence = RunningEvidence()
    p_values, lowers, uppers = [], [], []
    rng = np.random.default_rng(1)
    a, b = MeanStats(n=0, sum=0, sum_squares=0), MeanStats(n=0, sum=0, sum_squares=0)
    for _ in range(30):
        a = a + MeanStats.from_values(rng.normal(10, 2, 200))
        b = b + MeanStats.from_values(rng.normal(10.1, 2, 200))
        look = asymptotic_confidence_sequence(estimate_effect(a, b, relative=True), n_star=4000)
        evidence = evidence.update(look)
        p_values.append(evidence.p_value)
        lowers.append(evidence.lower)
        uppers.append(evidence.upper)
        assert evidence.p_value <= look.p_value
    assert evidence.looks == 30
    assert all(x >= y for x, y in itertools.pairwise(p_values))
    assert all(x <= y for x, y in itertools.pairwise(lowers))
    assert all(x >= y for x, y in itertools.pairwise(uppers))


def test_no_result_looks_do_not_move_the_running_evidence() -> None:
    failed = asymptotic_confidence_sequence(
        estimate_effect(ProportionStats(n=100, sum=0), ProportionStats(n=100, sum=3), relative=True)
    )
    assert (failed.lower, failed.upper, failed.p_value) == (0.0, 0.0, 1.0)
    evidence = RunningEvidence().update(failed)
    assert evidence.looks == 1 and evidence.lower == -math.inf and evidence.p_value == 1.0


def test_invalid_parameters_are_refused() -> None:
    effect = estimate_effect(BINOM_A, BINOM_B, relative=False)
    with pytest.raises(ValueError, match="alpha"):
        asymptotic_confidence_sequence(effect, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        asymptotic_one_sided_bound(effect, alpha=0.6)
    with pytest.raises(ValueError, match="n_star"):
        asymptotic_confidence_sequence(effect, n_star=0)
    with pytest.raises(ValueError, match="tau2"):
        msprt(effect, tau2=-1)


mean_arms = st.tuples(
    st.integers(min_value=50, max_value=50_000),
    st.floats(min_value=1, max_value=100),
    st.floats(min_value=0.5, max_value=30),
)


@settings(max_examples=80, deadline=None)
@given(mean_arms, mean_arms, st.sampled_from([0.01, 0.05, 0.2]), st.booleans())
def test_cs_properties(
    arm_a: tuple[int, float, float],
    arm_b: tuple[int, float, float],
    alpha: float,
    relative: bool,
) -> None:
    a, b = _mean_stats(*arm_a), _mean_stats(*arm_b)
    effect = estimate_effect(a, b, relative=relative)
    cs = asymptotic_confidence_sequence(effect, alpha=alpha, n_star=5000)
    # Contains the estimate and is wider than the fixed-horizon z interval.
    assert cs.lower < effect.estimate < cs.upper
    fixed = fixed_horizon_test(effect, alpha=alpha, distribution="z")
    assert cs.lower < fixed.ci_lower and fixed.ci_upper < cs.upper
    # Smaller alpha, wider sequence.
    wider = asymptotic_confidence_sequence(effect, alpha=alpha / 2, n_star=5000)
    assert wider.lower < cs.lower and cs.upper < wider.upper
    # p <= alpha exactly when 0 is outside the CS (same boundary, STATS.md 2.1).
    assert (cs.p_value <= alpha) == (not cs.lower <= 0 <= cs.upper)
    one = asymptotic_one_sided_bound(effect, alpha=alpha / 2 if alpha > 0.1 else alpha, n_star=5000)
    assert one.bound < effect.estimate
    if not relative:
        # Swapping the arms mirrors the absolute effect and its CS.
        swapped = asymptotic_confidence_sequence(
            estimate_effect(b, a, relative=False), alpha=alpha, n_star=5000
        )
        assert swapped.lower == pytest.approx(-cs.upper, rel=1e-9, abs=1e-12)
        assert swapped.upper == pytest.approx(-cs.lower, rel=1e-9, abs=1e-12)
        assert swapped.p_value == pytest.approx(cs.p_value, rel=1e-9)


def test_cs_works_for_ratio_metrics() -> None:
    rng = np.random.default_rng(4)
    d_a, d_b = rng.poisson(4, 3000) + 1.0, rng.poisson(4, 3000) + 1.0
    a = RatioStats.from_values(rng.binomial(d_a.astype(int), 0.2), d_a)
    b = RatioStats.from_values(rng.binomial(d_b.astype(int), 0.25), d_b)
    cs = asymptotic_confidence_sequence(estimate_effect(a, b, relative=True), n_star=6000)
    assert cs.lower > 0 and cs.p_value < 0.05


def test_cs_for_ratio_and_cuped_matches_gbstats() -> None:
    from gbstats.models.statistics import RatioStatistic, RegressionAdjustedStatistic

    from analysis.stats.moments import CupedStats

    rng = np.random.default_rng(31)
    d_a, d_b = rng.poisson(3, 2500) + 1.0, rng.poisson(3, 2600) + 1.0
    m_a, m_b = rng.binomial(d_a.astype(int), 0.3) * 1.0, rng.binomial(d_b.astype(int), 0.33) * 1.0
    ratio_a, ratio_b = RatioStats.from_values(m_a, d_a), RatioStats.from_values(m_b, d_b)

    def gb_mean(n: int, total: float, squares: float) -> SampleMeanStatistic:
        return SampleMeanStatistic(n=n, sum=total, sum_squares=squares)

    def gb_ratio(s: RatioStats) -> RatioStatistic:
        return RatioStatistic(
            n=s.n,
            m_statistic=gb_mean(s.n, s.numerator_sum, s.numerator_sum_squares),
            d_statistic=gb_mean(s.n, s.denominator_sum, s.denominator_sum_squares),
            m_d_sum_of_products=s.cross_sum,
        )

    x_a, x_b = rng.gamma(3, 4, 2500), rng.gamma(3, 4, 2600)
    cuped_a = CupedStats.from_values(x_a + rng.normal(0, 4, 2500), x_a)
    cuped_b = CupedStats.from_values(x_b + 0.5 + rng.normal(0, 4, 2600), x_b)

    def gb_cuped(s: CupedStats) -> RegressionAdjustedStatistic:
        return RegressionAdjustedStatistic(
            n=s.n,
            post_statistic=gb_mean(s.n, s.sum, s.sum_squares),
            pre_statistic=gb_mean(s.n, s.pre_sum, s.pre_sum_squares),
            post_pre_sum_of_products=s.cross_sum,
            theta=0,
        )

    cases = [
        ((ratio_a, ratio_b), (gb_ratio(ratio_a), gb_ratio(ratio_b)), "relative"),
        ((ratio_a, ratio_b), (gb_ratio(ratio_a), gb_ratio(ratio_b)), "absolute"),
        ((cuped_a, cuped_b), (gb_cuped(cuped_a), gb_cuped(cuped_b)), "absolute"),
    ]
    for ours, gb, difference_type in cases:
        effect = estimate_effect(*ours, relative=difference_type == "relative")
        result = asymptotic_confidence_sequence(effect, alpha=0.05, n_star=8000)
        config = SequentialConfig(difference_type=difference_type, sequential_tuning_parameter=8000)
        theirs = SequentialTwoSidedTTest(*gb, config).compute_result()
        assert (result.lower, result.upper) == pytest.approx(tuple(theirs.ci), abs=1e-6)
        assert result.p_value == pytest.approx(theirs.p_value, abs=1e-6)
