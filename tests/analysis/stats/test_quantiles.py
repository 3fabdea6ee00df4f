"""Golden values and properties of the latency-quantile statistics (analysis/stats/quantiles.py,
analysis/stats/quantile_ab.py, analysis/stats/quantiles_fixed.py)."""

import math

import numpy as np
import pytest
from gbstats.frequentist.tests import FrequentistConfig, TwoSidedTTest
from gbstats.models.statistics import QuantileStatistic
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from analysis.stats.quantile_ab import quantile_ab_p_value, quantile_ab_p_value_from_samples
from analysis.stats.quantile_boundaries import (
    beta_binomial_log_mixture,
    beta_binomial_mixture_bound,
    double_stitching_bound,
)
from analysis.stats.quantiles import (
    QuantileGuardrailResult,
    quantile_cs,
    quantile_cs_ranks,
    quantile_difference_cs,
    quantile_guardrail,
    quantile_ratio_cs,
)
from analysis.stats.quantiles_fixed import interpolated_quantile, quantile_difference_ci
from routing.observe.histogram import LogHistogram

# The STATS.md 8.1/8.2 reference cases: "deterministic log-normal grid samples, 10,000 per arm".
# Reproduced with x_i = 100 * exp(0.5 * Phi^-1((i - 0.5) / n)), i = 1..n (median 100 ms,
# sigma 0.5); treatment = 1.1 * control ("10% slower"). The printed CSs are two-sided
# beta-binomial CSs at alpha/2 = 0.025 (STATS.md 8.1: "two-sided arm CSs at alpha_k/2, as in
# our reference cases") with t_opt = 10,000 and alpha_opt = alpha.
GRID_SIZE = 10_000
GRID_T_OPT = 10_000


def lognormal_grid(multiplier: float = 1.0) -> np.ndarray:
    probabilities = (np.arange(1, GRID_SIZE + 1) - 0.5) / GRID_SIZE
    return multiplier * 100.0 * np.exp(0.5 * stats.norm.ppf(probabilities))


def histogram_of(values: np.ndarray) -> LogHistogram:
    histogram = LogHistogram()
    histogram.add_many(values.tolist())
    return histogram


def exact_cs(values: np.ndarray, p: float, **kwargs: object) -> tuple[float, float]:
    ordered = np.sort(values)
    lower_rank, upper_rank = quantile_cs_ranks(len(ordered), p, **kwargs)  # type: ignore[arg-type]
    lower = ordered[lower_rank - 1] if lower_rank >= 1 else -math.inf
    upper = ordered[upper_rank - 1] if upper_rank <= len(ordered) else math.inf
    return float(lower), float(upper)


# --------------------------------------------------------------------------- golden values


@pytest.mark.parametrize(
    ("one_sided", "log_mixture", "bound"),
    [
        # confseq test/uniform_boundaries_unittest.cpp, Test{TwoSided,OneSided}BetaBinomialMixture:
        # BetaBinomialMixture(v_opt=100, alpha_opt=0.05, g=0.2, h=0.8); values from the
        # authors' reference implementation in R.
        (False, -0.6941012, 31.4308),
        (True, -0.07134019, 28.41238),
    ],
)
def test_beta_binomial_mixture_matches_confseq_reference(
    one_sided: bool, log_mixture: float, bound: float
) -> None:
    assert beta_binomial_log_mixture(
        10.0, 100.0, g=0.2, h=0.8, v_opt=100.0, alpha_opt=0.05, one_sided=one_sided
    ) == pytest.approx(log_mixture, abs=1e-6)
    assert beta_binomial_mixture_bound(
        100.0, alpha=0.05, g=0.2, h=0.8, v_opt=100.0, alpha_opt=0.05, one_sided=one_sided
    ) == pytest.approx(bound, abs=1e-5)


@pytest.mark.parametrize(
    ("p", "multiplier", "expected"),
    [
        # STATS.md 8.1, CS-QUANTILE-CS-P95 / CS-QUANTILE-CS-P99 (computed there with confseq).
        (0.95, 1.0, (220.06, 235.88)),
        (0.95, 1.1, (242.06, 259.47)),
        (0.99, 1.0, (302.37, 342.10)),
        (0.99, 1.1, (332.61, 376.30)),
    ],
)
def test_beta_binomial_cs_reproduces_stats_md_reference(
    p: float, multiplier: float, expected: tuple[float, float]
) -> None:
    lower, upper = exact_cs(lognormal_grid(multiplier), p, alpha=0.025, t_opt=GRID_T_OPT)
    assert (round(lower, 2), round(upper, 2)) == expected


def test_reference_guardrail_decisions_on_exact_order_statistics() -> None:
    # STATS.md 8.1: p95 rolls back at margin 0 but not at 5%; p99 does not roll back.
    control, treatment = lognormal_grid(), lognormal_grid(1.1)
    kwargs = {"alpha": 0.025, "t_opt": GRID_T_OPT}
    p95_treatment_lower = exact_cs(treatment, 0.95, **kwargs)[0]
    p95_control_upper = exact_cs(control, 0.95, **kwargs)[1]
    assert p95_treatment_lower > p95_control_upper
    assert not p95_treatment_lower > 1.05 * p95_control_upper
    assert not exact_cs(treatment, 0.99, **kwargs)[0] > exact_cs(control, 0.99, **kwargs)[1]


@pytest.mark.parametrize(("t", "radius"), [(1_000, 0.0082), (5_000, 0.0042), (10_000, 0.0031)])
def test_p99_upper_radius_matches_stats_md_8_4(t: int, radius: float) -> None:
    # STATS.md 8.4: alpha = 0.025, t_opt = t, two-sided. It prints 0.0082 at t = 1,000 where the
    # root is 0.00811 (0.0042 and 0.0031 agree to every printed digit), hence abs=1e-4.
    p = 0.99
    v = p * (1 - p) * t
    upper = beta_binomial_mixture_bound(
        v, alpha=0.025, g=p, h=1 - p, v_opt=v, alpha_opt=0.025, one_sided=False
    )
    assert upper / t == pytest.approx(radius, abs=1e-4)
    one_sided = beta_binomial_mixture_bound(
        v, alpha=0.025, g=p, h=1 - p, v_opt=v, alpha_opt=0.025, one_sided=True
    )
    # STATS.md 8.4: "The one-sided mixture is about 4-7% tighter".
    assert 0.93 <= one_sided / upper <= 0.965


@pytest.mark.parametrize("p", [0.95, 0.99])
def test_double_stitching_is_about_1_8_times_wider(p: float) -> None:
    # STATS.md 8.1: "Double-stitching CSs are about 1.7-1.8x wider" than the beta-binomial CS on
    # the reference grid. Our two-sided stitching CS spends alpha/2 per side, which makes it a
    # few percent wider still (1.81 and 1.84 here).
    control = lognormal_grid()
    mixture = exact_cs(control, p, alpha=0.025, t_opt=GRID_T_OPT)
    stitched = exact_cs(control, p, alpha=0.025, t_opt=GRID_T_OPT, method="stitching")
    ratio = (stitched[1] - stitched[0]) / (mixture[1] - mixture[0])
    assert 1.7 <= ratio <= 1.9


@pytest.mark.parametrize(
    ("multiplier", "p", "expected", "rel"),
    [
        # STATS.md 8.2 (confseq quantile_ab_p_value, t_opt = 10,000) on the reference grid.
        (1.0, 0.5, 1.0, 0.0),
        (1.0, 0.95, 1.0, 0.0),
        (1.03, 0.5, 0.0662, 1e-3),
        (1.03, 0.95, 1.0, 0.0),
        (1.03, 0.99, 1.0, 0.0),
        (1.1, 0.5, 5.1e-22, 1e-2),
        (1.1, 0.95, 2.07e-7, 5e-3),
        (1.1, 0.99, 0.0389, 2e-3),
    ],
)
def test_two_sample_p_value_reproduces_stats_md_reference(
    multiplier: float, p: float, expected: float, rel: float
) -> None:
    p_value = quantile_ab_p_value_from_samples(
        lognormal_grid(), lognormal_grid(multiplier), p=p, t_opt=GRID_T_OPT
    )
    assert p_value == pytest.approx(expected, rel=rel)


def test_histogram_p_value_is_conservative_against_exact() -> None:
    control, treatment = lognormal_grid(), lognormal_grid(1.1)
    for p in (0.5, 0.95, 0.99):
        exact = quantile_ab_p_value_from_samples(control, treatment, p=p, t_opt=GRID_T_OPT)
        binned = quantile_ab_p_value(
            histogram_of(control), histogram_of(treatment), p=p, t_opt=GRID_T_OPT
        )
        assert exact <= binned <= 1.0
    # Still decisive for a clear regression: 10% slower at p50.
    assert (
        quantile_ab_p_value(histogram_of(control), histogram_of(treatment), p=0.5, t_opt=1e4)
        < 1e-10
    )


# --------------------------------------------------------------------------- histogram CSs


def test_histogram_cs_contains_exact_cs_within_one_bucket() -> None:
    # STATS.md 8.4: bucket edges widen the CS; they never narrow it.
    for multiplier in (1.0, 1.1):
        values = lognormal_grid(multiplier)
        histogram = histogram_of(values)
        for p in (0.5, 0.95, 0.99):
            exact_lower, exact_upper = exact_cs(values, p, alpha=0.025, t_opt=GRID_T_OPT)
            lower, upper = quantile_cs(histogram, p, alpha=0.025, t_opt=GRID_T_OPT)
            gamma = histogram.upper_edge(1)  # bucket 1 is (1, gamma]
            assert lower <= exact_lower <= lower * gamma
            assert upper >= exact_upper >= upper / gamma


def test_cs_without_enough_data_is_unbounded() -> None:
    histogram = histogram_of(np.array([120.0]))
    assert quantile_cs(histogram, 0.5, alpha=0.05, t_opt=1000) == (0.0, math.inf)
    assert quantile_cs(LogHistogram(), 0.5, alpha=0.05, t_opt=1000) == (0.0, math.inf)
    # confseq would return the sample maximum when the boundary has no root; with one
    # observation that is below the median half the time, so the bound must be infinite.
    assert quantile_cs_ranks(1, 0.5, alpha=0.05, t_opt=1000) == (0, 2)


latency_samples = st.lists(
    st.floats(min_value=1.0, max_value=5_000.0, allow_nan=False), min_size=1, max_size=400
)
levels = st.floats(min_value=0.01, max_value=0.99)
alphas = st.floats(min_value=0.001, max_value=0.3)


@settings(max_examples=60, deadline=None)
@given(values=latency_samples, p=levels, alpha=alphas)
def test_cs_contains_the_sample_quantile(values: list[float], p: float, alpha: float) -> None:
    histogram = histogram_of(np.array(values))
    for method in ("beta_binomial", "stitching"):
        lower, upper = quantile_cs(histogram, p, alpha=alpha, t_opt=100, method=method)
        assert lower <= histogram.quantile(p) <= upper


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(min_value=1, max_value=20_000),
    p=levels,
    alphas=st.tuples(alphas, alphas),
    one_sided=st.booleans(),
    method=st.sampled_from(["beta_binomial", "stitching"]),
)
def test_cs_widens_as_alpha_shrinks(
    t: int, p: float, alphas: tuple[float, float], one_sided: bool, method: str
) -> None:
    small, large = sorted(alphas)
    wide = quantile_cs_ranks(t, p, alpha=small, t_opt=500, one_sided=one_sided, method=method)  # type: ignore[arg-type]
    narrow = quantile_cs_ranks(t, p, alpha=large, t_opt=500, one_sided=one_sided, method=method)  # type: ignore[arg-type]
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


@settings(max_examples=60, deadline=None)
@given(t=st.integers(min_value=1, max_value=20_000), levels=st.tuples(levels, levels))
def test_cs_ranks_are_monotone_in_p(t: int, levels: tuple[float, float]) -> None:
    low_p, high_p = sorted(levels)
    low = quantile_cs_ranks(t, low_p, alpha=0.05, t_opt=1_000)
    high = quantile_cs_ranks(t, high_p, alpha=0.05, t_opt=1_000)
    assert low[0] <= high[0]
    assert low[1] <= high[1]


@settings(max_examples=40, deadline=None)
@given(t=st.integers(min_value=10, max_value=50_000), p=levels)
def test_one_sided_mixture_is_tighter_than_two_sided(t: int, p: float) -> None:
    two_sided = quantile_cs_ranks(t, p, alpha=0.05, t_opt=1_000)
    one_sided = quantile_cs_ranks(t, p, alpha=0.05, t_opt=1_000, one_sided=True)
    assert two_sided[0] <= one_sided[0]
    assert one_sided[1] <= two_sided[1]


def test_stitching_bound_is_finite_and_grows_like_sqrt_t_log_log_t() -> None:
    small = double_stitching_bound(0.95, 10_000, alpha=0.05, t_opt=1_000)
    large = double_stitching_bound(0.95, 1_000_000, alpha=0.05, t_opt=1_000)
    assert 0 < small < large
    # 100x the samples: the deviation grows by about 10x (sqrt t) times a log-log factor.
    assert 10.0 < large / small < 13.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p": 0.0, "alpha": 0.05, "t_opt": 10.0},
        {"p": 1.0, "alpha": 0.05, "t_opt": 10.0},
        {"p": 0.5, "alpha": 0.0, "t_opt": 10.0},
        {"p": 0.5, "alpha": 0.05, "t_opt": 0.5},
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        quantile_cs(histogram_of(np.array([1.0, 2.0])), **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- between arms


def test_guardrail_on_reference_grid() -> None:
    control, treatment = histogram_of(lognormal_grid()), histogram_of(lognormal_grid(1.1))
    result = quantile_guardrail(control, treatment, p=0.95, alpha=0.05, t_opt=GRID_T_OPT)
    assert isinstance(result, QuantileGuardrailResult)
    assert (result.n_control, result.n_treatment) == (GRID_SIZE, GRID_SIZE)
    assert result.relative_effect == pytest.approx(0.1, abs=0.011)
    assert result.control_estimate == pytest.approx(100 * math.exp(0.5 * 1.6448536), rel=0.012)
    # The harm bounds are built from the per-arm intervals (L_B / U_A - 1, U_B / L_A - 1).
    assert result.harm_lower_bound == pytest.approx(
        result.treatment_interval[0] / result.control_interval[1] - 1
    )
    assert result.harm_upper_bound == pytest.approx(
        result.treatment_interval[1] / result.control_interval[0] - 1
    )
    assert result.harm_lower_bound <= result.relative_effect <= result.harm_upper_bound
    # With exact ranks the p95 reference rolls back at margin 0 (STATS.md 8.1); histogram edges
    # cost up to one 2% bucket per side, which puts this case right at the boundary.
    assert -0.005 <= result.harm_lower_bound <= 0.02
    # A 25% regression is caught at this size.
    slower = quantile_guardrail(
        control, histogram_of(lognormal_grid(1.25)), p=0.95, alpha=0.05, t_opt=GRID_T_OPT
    )
    assert slower.harm_lower_bound > 0.1


def test_guardrail_higher_is_better_mirrors_harm() -> None:
    control, treatment = histogram_of(lognormal_grid()), histogram_of(lognormal_grid(0.8))
    lower_better = quantile_guardrail(control, treatment, p=0.5, alpha=0.05, t_opt=GRID_T_OPT)
    higher_better = quantile_guardrail(
        control, treatment, p=0.5, alpha=0.05, t_opt=GRID_T_OPT, lower_is_better=False
    )
    assert lower_better.harm_upper_bound < 0  # 20% faster: proven not harmful for latency
    assert higher_better.harm_lower_bound > 0  # the same drop is harm for a higher-is-better metric
    assert higher_better.harm_lower_bound == pytest.approx(-lower_better.harm_upper_bound)
    assert higher_better.harm_upper_bound == pytest.approx(-lower_better.harm_lower_bound)
    assert higher_better.relative_effect == lower_better.relative_effect


def test_guardrail_with_empty_arms_is_uninformative() -> None:
    result = quantile_guardrail(
        LogHistogram(), histogram_of(np.array([10.0])), p=0.95, alpha=0.05, t_opt=1000
    )
    assert result.harm_lower_bound == -1.0
    assert result.harm_upper_bound == math.inf
    assert math.isnan(result.control_estimate)
    assert math.isnan(result.relative_effect)
    mirrored = quantile_guardrail(
        LogHistogram(), LogHistogram(), p=0.95, alpha=0.05, t_opt=1000, lower_is_better=False
    )
    assert mirrored.harm_lower_bound == -math.inf
    assert mirrored.harm_upper_bound == 1.0


def test_difference_and_ratio_cs_use_each_arm_at_half_alpha() -> None:
    control, treatment = histogram_of(lognormal_grid()), histogram_of(lognormal_grid(1.1))
    control_cs = quantile_cs(control, 0.95, alpha=0.025, t_opt=GRID_T_OPT)
    treatment_cs = quantile_cs(treatment, 0.95, alpha=0.025, t_opt=GRID_T_OPT)
    difference = quantile_difference_cs(control, treatment, p=0.95, alpha=0.05, t_opt=GRID_T_OPT)
    ratio = quantile_ratio_cs(control, treatment, p=0.95, alpha=0.05, t_opt=GRID_T_OPT)
    assert difference == (treatment_cs[0] - control_cs[1], treatment_cs[1] - control_cs[0])
    assert ratio == (treatment_cs[0] / control_cs[1], treatment_cs[1] / control_cs[0])
    assert difference[0] <= 0.1 * 228 <= difference[1]


# --------------------------------------------------------------------------- fixed horizon


def _growthbook_interval(
    control: LogHistogram, treatment: LogHistogram, p: float, alpha: float, relative: bool
) -> list[float]:
    """gbstats 0.8.0 TwoSidedTTest on QuantileStatistic built from the same order statistics."""
    z = stats.norm.ppf(0.975)

    def statistic(histogram: LogHistogram) -> QuantileStatistic:
        half_width = z * math.sqrt(p * (1 - p) / histogram.count)
        return QuantileStatistic(
            n=histogram.count,
            n_star=histogram.count,
            nu=p,
            quantile_hat=histogram.quantile(p),
            quantile_lower=interpolated_quantile(histogram, p - half_width),
            quantile_upper=interpolated_quantile(histogram, p + half_width),
        )

    config = FrequentistConfig(alpha=alpha, difference_type="relative" if relative else "absolute")
    return list(TwoSidedTTest(statistic(control), statistic(treatment), config).confidence_interval)


@pytest.mark.parametrize("p", [0.5, 0.95, 0.99])
def test_fixed_horizon_ci_matches_gbstats(p: float) -> None:
    rng = np.random.default_rng(20240601)
    control = histogram_of(rng.lognormal(math.log(100), 0.5, 3_000))
    treatment = histogram_of(rng.lognormal(math.log(108), 0.5, 2_000))
    result = quantile_difference_ci(control, treatment, p=p, alpha=0.05)
    assert result.error is None
    assert list(result.absolute_interval) == pytest.approx(
        _growthbook_interval(control, treatment, p, 0.05, relative=False), rel=1e-9
    )
    assert list(result.relative_interval) == pytest.approx(
        _growthbook_interval(control, treatment, p, 0.05, relative=True), rel=1e-9
    )
    assert result.absolute_difference == pytest.approx(
        result.treatment_estimate - result.control_estimate
    )


def test_fixed_horizon_ci_width_matches_asymptotic_quantile_variance() -> None:
    # Large-sample check of the Deng-Knoblich-Yu standard error: the asymptotic SD of a sample
    # quantile is sqrt(p(1-p)/n) / f(q) (Serfling 1980, section 2.3).
    rng = np.random.default_rng(7)
    n, p = 20_000, 0.95
    control = histogram_of(rng.lognormal(math.log(100), 0.5, n))
    treatment = histogram_of(rng.lognormal(math.log(100), 0.5, n))
    result = quantile_difference_ci(control, treatment, p=p, alpha=0.05)
    quantile = 100 * math.exp(0.5 * stats.norm.ppf(p))
    density = stats.lognorm.pdf(quantile, 0.5, scale=100)
    asymptotic_sd = math.sqrt(2 * p * (1 - p) / n) / density
    half_width = (result.absolute_interval[1] - result.absolute_interval[0]) / 2
    assert half_width == pytest.approx(1.96 * asymptotic_sd, rel=0.15)


def test_fixed_horizon_ci_degenerate_inputs() -> None:
    tiny = histogram_of(np.array([10.0, 11.0, 12.0]))
    result = quantile_difference_ci(tiny, tiny, p=0.95, alpha=0.05)
    assert result.error is not None and "too few" in result.error
    assert result.absolute_interval == (0.0, 0.0)
    # All values in one bucket: the within-bucket interpolation leaves a tiny, honest interval.
    constant = histogram_of(np.full(1_000, 50.0))
    flat = quantile_difference_ci(constant, constant, p=0.5, alpha=0.05)
    assert flat.error is None
    assert -0.5 < flat.absolute_interval[0] <= 0.0 <= flat.absolute_interval[1] < 0.5


@settings(max_examples=100, deadline=None)
@given(values=latency_samples, level=st.floats(min_value=0.0, max_value=1.0))
def test_interpolated_quantile_stays_within_the_bucket_of_the_order_statistic(
    values: list[float], level: float
) -> None:
    histogram = histogram_of(np.array(values))
    interpolated = interpolated_quantile(histogram, level)
    # The interpolated value lies in the bucket of order statistic max(1, ceil(level * n)), so
    # within 2% (one bucket) of numpy's inverted-CDF quantile.
    exact = float(np.quantile(np.array(values), level, method="inverted_cdf"))
    gamma = histogram.upper_edge(1)
    assert exact / gamma * (1 - 1e-12) <= interpolated <= exact * gamma * (1 + 1e-12)
