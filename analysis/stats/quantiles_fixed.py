"""Fixed-horizon inference on the difference of a latency quantile (p50/p95/p99) between two arms.

Works on bucket counts of a log-bucketed latency histogram
(``routing.observe.histogram.LogHistogram``, or anything with the same bucket interface, see
:class:`analysis.stats.quantiles.LatencyHistogram`),
never on raw request rows. STATS.md section 8 is the spec; the anytime-valid confidence sequences
and the guardrail are in :mod:`analysis.stats.quantiles`.

Fixed horizon (reporting only, invalid under peeking): Deng, Knoblich & Yu 2018, "Applying the
Delta Method in Metric Analytics: A Practical Guide with Novel Ideas", KDD (quantile
metrics), as GrowthBook's ``QuantileStatistic`` computes it (STATS.md 8.3): the standard error of
a sample quantile from the width of its order-statistic (binomial) confidence interval, Welch
t-interval for the difference, delta method for the relative difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from analysis.stats.quantile_boundaries import check_probability
from analysis.stats.quantiles import LatencyHistogram

# GrowthBook (and Deng, Knoblich & Yu) size the order-statistic interval at 95% whatever the
# reporting level, and turn its width into a standard error with the same 1.96.
_DKY_Z = float(stats.norm.ppf(0.975))


@dataclass(frozen=True, slots=True)
class QuantileDifferenceInterval:
    """Fixed-horizon (single look) CI for the difference of one quantile between two arms.

    Reporting only: repeated looks inflate its error rate (STATS.md 10.1). On degenerate input
    (too few observations for the order-statistic interval, or zero spread) every estimate and
    interval is 0 and ``error`` says why (STATS.md section 0 convention).
    """

    p: float
    alpha: float
    control_estimate: float
    treatment_estimate: float
    absolute_difference: float
    absolute_interval: tuple[float, float]
    relative_difference: float
    relative_interval: tuple[float, float]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _ArmQuantileSummary:
    n: int
    estimate: float
    unit_variance: float  # n * Var(sample quantile), Deng, Knoblich & Yu 2018


def interpolated_quantile(histogram: LatencyHistogram, level: float) -> float:
    """Quantile ``level`` of the histogram with the empirical CDF interpolated inside buckets.

    The CDF is taken as log-linear across each bucket (values spread evenly in log scale between
    its nominal edges ``gamma**(i-1)`` and ``gamma**i``), and the quantile is the value where it
    reaches ``level * n``. Unlike :meth:`quantile` this varies continuously with ``level``, which
    the Deng-Knoblich-Yu standard error needs: at large ``n`` the order-statistic interval it
    measures spans only one or two 2% buckets, and stepping from bucket to bucket would make the
    standard error wrong by up to a factor of two.
    """
    if histogram.count == 0:
        raise ValueError("quantile of an empty histogram")
    accuracy = histogram.relative_accuracy
    log_gamma = math.log((1.0 + accuracy) / (1.0 - accuracy))
    target = min(max(level, 0.0), 1.0) * histogram.count
    cumulative = 0
    for index, bucket_count in histogram:
        if cumulative + bucket_count >= target:
            fraction = max(target - cumulative, 0.0) / bucket_count
            nominal_lower = histogram.representative(index) / (1.0 + accuracy)
            return nominal_lower * math.exp(fraction * log_gamma)
        cumulative += bucket_count
    raise AssertionError("bucket counts do not add up to count")


def _dky_summary(histogram: LatencyHistogram, p: float) -> _ArmQuantileSummary | str:
    """Quantile and per-unit variance from the 95% order-statistic interval (DKY 2018)."""
    n = histogram.count
    half_width = _DKY_Z * math.sqrt(p * (1.0 - p) / n) if n > 0 else math.inf
    if not (p - half_width > 0.0 and p + half_width < 1.0):
        return "too few observations for the order-statistic interval"
    lower = interpolated_quantile(histogram, p - half_width)
    upper = interpolated_quantile(histogram, p + half_width)
    # GrowthBook's QuantileStatistic.variance_init: (n - 1) * ((Y_U - Y_L) / (2 z))^2.
    unit_variance = (n - 1) * ((upper - lower) / (2.0 * _DKY_Z)) ** 2
    if unit_variance <= 0.0:
        return "zero spread between the order statistics"
    return _ArmQuantileSummary(n=n, estimate=histogram.quantile(p), unit_variance=unit_variance)


def quantile_difference_ci(
    control: LatencyHistogram,
    treatment: LatencyHistogram,
    *,
    p: float,
    alpha: float,
) -> QuantileDifferenceInterval:
    """Fixed-horizon two-sided CI for ``Q_B(p) - Q_A(p)`` and ``Q_B(p)/Q_A(p) - 1``.

    Deng, Knoblich & Yu 2018 (KDD), quantile metrics: ``Var(q_hat) = ((Y_U - Y_L) / (2 z_0.975))^2``
    from the order statistics at ranks ``n (p -+ z_0.975 sqrt(p(1-p)/n))`` (read from the
    histogram with :func:`interpolated_quantile`); Welch t-interval
    with Welch-Satterthwaite degrees of freedom for the absolute difference, and the delta method
    ``Var(q_B/q_A) = V_B/(q_A^2 n_B) + V_A q_B^2/(q_A^4 n_A)`` for the relative one, exactly as
    gbstats' ``TwoSidedTTest`` on two ``QuantileStatistic`` (STATS.md 8.3).
    """
    check_probability("p", p)
    check_probability("alpha", alpha)
    control_summary = _dky_summary(control, p)
    treatment_summary = _dky_summary(treatment, p)
    for summary, arm in ((control_summary, "control"), (treatment_summary, "treatment")):
        if isinstance(summary, str):
            return _no_difference_result(p, alpha, f"{arm}: {summary}")
    assert isinstance(control_summary, _ArmQuantileSummary)
    assert isinstance(treatment_summary, _ArmQuantileSummary)
    if control_summary.estimate <= 0.0:
        return _no_difference_result(p, alpha, "control quantile is zero")
    a, b = control_summary, treatment_summary
    variance_a, variance_b = a.unit_variance / a.n, b.unit_variance / b.n
    degrees_of_freedom = (variance_a + variance_b) ** 2 / (
        variance_a**2 / (a.n - 1) + variance_b**2 / (b.n - 1)
    )
    critical = float(stats.t.ppf(1.0 - alpha / 2.0, degrees_of_freedom))
    absolute = b.estimate - a.estimate
    absolute_half_width = critical * math.sqrt(variance_a + variance_b)
    relative = absolute / a.estimate
    relative_variance = variance_b / a.estimate**2 + variance_a * b.estimate**2 / a.estimate**4
    relative_half_width = critical * math.sqrt(relative_variance)
    return QuantileDifferenceInterval(
        p=p,
        alpha=alpha,
        control_estimate=a.estimate,
        treatment_estimate=b.estimate,
        absolute_difference=absolute,
        absolute_interval=(absolute - absolute_half_width, absolute + absolute_half_width),
        relative_difference=relative,
        relative_interval=(relative - relative_half_width, relative + relative_half_width),
    )


def _no_difference_result(p: float, alpha: float, error: str) -> QuantileDifferenceInterval:
    return QuantileDifferenceInterval(
        p=p,
        alpha=alpha,
        control_estimate=0.0,
        treatment_estimate=0.0,
        absolute_difference=0.0,
        absolute_interval=(0.0, 0.0),
        relative_difference=0.0,
        relative_interval=(0.0, 0.0),
        error=error,
    )
