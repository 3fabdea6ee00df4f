"""Per-arm sufficient statistics: frozen, validated at construction, exactly mergeable.

Every statistic in `analysis.stats` is computed from these sums, never from raw rows, so the
edge can pre-aggregate observations into time buckets and the worker can add the buckets up
(`a + b` or `a.merge(b)`): the sum of two buckets is exactly the statistic of their union.
Variances use the conventions of GrowthBook's gbstats (STATS.md 1.1): the population form
p(1-p) for proportions, the n-1 sample form for everything else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike

# Relative slack for the Cauchy-Schwarz checks: sums of squares accumulated in floating point
# may undershoot sum**2 / n by a few ulps when every value is equal.
_ROUNDING_SLACK = 1e-9


def _check_count(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{field} must be >= 0, got {value}")


def _check_finite(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{field} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")


def _check_square_sum(field: str, sum_squares: float, total: float, n: int) -> None:
    """Cauchy-Schwarz: n * sum(y**2) >= (sum y)**2, so the sample variance is never negative."""
    if sum_squares < 0:
        raise ValueError(f"{field} must be >= 0, got {sum_squares}")
    if n > 0 and n * sum_squares < total * total * (1 - _ROUNDING_SLACK) - _ROUNDING_SLACK:
        raise ValueError(f"{field} is smaller than sum**2 / n: the sums are inconsistent")


def _check_cross_product(field: str, cross: float, square_a: float, square_b: float) -> None:
    """Cauchy-Schwarz for a cross-product: (sum xy)**2 <= sum x**2 * sum y**2."""
    bound = math.sqrt(square_a * square_b)
    if abs(cross) > bound * (1 + _ROUNDING_SLACK) + _ROUNDING_SLACK:
        raise ValueError(f"{field} exceeds sqrt(sum x**2 * sum y**2): the sums are inconsistent")


def _check_empty(n: int, **sums: float) -> None:
    if n == 0:
        for field, value in sums.items():
            if value != 0:
                raise ValueError(f"{field} must be 0 when n is 0, got {value}")


def _sample_variance(n: int, total: float, sum_squares: float) -> float:
    if n <= 1:
        return 0.0
    return max((sum_squares - total * total / n) / (n - 1), 0.0)


def _sample_covariance(n: int, sum_a: float, sum_b: float, cross: float) -> float:
    if n <= 1:
        return 0.0
    return (cross - sum_a * sum_b / n) / (n - 1)


@dataclass(frozen=True, slots=True)
class ProportionStats:
    """A binary metric per arm (conversion, error rate): n units, `sum` of them with y = 1."""

    n: int
    sum: float

    def __post_init__(self) -> None:
        _check_count("n", self.n)
        _check_finite("sum", self.sum)
        if self.sum < 0 or self.sum > self.n:
            raise ValueError(f"sum must lie in [0, n] = [0, {self.n}], got {self.sum}")

    @property
    def sum_squares(self) -> float:
        """For 0/1 values y**2 = y."""
        return float(self.sum)

    @property
    def mean(self) -> float:
        return float(self.sum) / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Population variance p(1-p), as gbstats `ProportionStatistic` (STATS.md 1.1)."""
        return self.mean * (1.0 - self.mean)

    def __add__(self, other: ProportionStats) -> ProportionStats:
        if not isinstance(other, ProportionStats):
            return NotImplemented
        return ProportionStats(n=self.n + other.n, sum=self.sum + other.sum)

    def merge(self, other: ProportionStats) -> ProportionStats:
        return self + other

    @classmethod
    def from_values(cls, values: ArrayLike) -> ProportionStats:
        array = np.asarray(values, dtype=float)
        return cls(n=int(array.size), sum=float(array.sum()))


@dataclass(frozen=True, slots=True)
class MeanStats:
    """A count or continuous metric per arm (revenue, latency): n, sum y, sum y**2."""

    n: int
    sum: float
    sum_squares: float

    def __post_init__(self) -> None:
        _check_count("n", self.n)
        _check_finite("sum", self.sum)
        _check_finite("sum_squares", self.sum_squares)
        _check_empty(self.n, sum=self.sum, sum_squares=self.sum_squares)
        _check_square_sum("sum_squares", self.sum_squares, self.sum, self.n)

    @property
    def mean(self) -> float:
        return float(self.sum) / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Sample variance with n-1, as gbstats `SampleMeanStatistic`; 0 when n <= 1."""
        return _sample_variance(self.n, self.sum, self.sum_squares)

    def __add__(self, other: MeanStats) -> MeanStats:
        if not isinstance(other, MeanStats):
            return NotImplemented
        return MeanStats(
            n=self.n + other.n,
            sum=self.sum + other.sum,
            sum_squares=self.sum_squares + other.sum_squares,
        )

    def merge(self, other: MeanStats) -> MeanStats:
        return self + other

    @classmethod
    def from_values(cls, values: ArrayLike) -> MeanStats:
        array = np.asarray(values, dtype=float)
        return cls(n=int(array.size), sum=float(array.sum()), sum_squares=float(array @ array))


@dataclass(frozen=True, slots=True)
class RatioStats:
    """A ratio metric M/D per arm over n randomisation units (e.g. clicks per session).

    Sums run over units: numerator and denominator sums, their squares and the cross-product
    sum(M*D), which the delta method needs (STATS.md 6).
    """

    n: int
    numerator_sum: float
    numerator_sum_squares: float
    denominator_sum: float
    denominator_sum_squares: float
    cross_sum: float

    def __post_init__(self) -> None:
        _check_count("n", self.n)
        for field in (
            "numerator_sum",
            "numerator_sum_squares",
            "denominator_sum",
            "denominator_sum_squares",
            "cross_sum",
        ):
            _check_finite(field, getattr(self, field))
        _check_empty(
            self.n,
            numerator_sum=self.numerator_sum,
            numerator_sum_squares=self.numerator_sum_squares,
            denominator_sum=self.denominator_sum,
            denominator_sum_squares=self.denominator_sum_squares,
            cross_sum=self.cross_sum,
        )
        _check_square_sum(
            "numerator_sum_squares", self.numerator_sum_squares, self.numerator_sum, self.n
        )
        _check_square_sum(
            "denominator_sum_squares", self.denominator_sum_squares, self.denominator_sum, self.n
        )
        _check_cross_product(
            "cross_sum", self.cross_sum, self.numerator_sum_squares, self.denominator_sum_squares
        )

    @property
    def numerator_mean(self) -> float:
        return float(self.numerator_sum) / self.n if self.n else 0.0

    @property
    def denominator_mean(self) -> float:
        return float(self.denominator_sum) / self.n if self.n else 0.0

    @property
    def mean(self) -> float:
        """The ratio of sums S_M / S_D (0 when the denominator sum is 0, as gbstats)."""
        if self.denominator_sum == 0:
            return 0.0
        return float(self.numerator_sum) / float(self.denominator_sum)

    @property
    def variance(self) -> float:
        """Per-unit delta-method variance of the ratio (STATS.md 6; gbstats `RatioStatistic`).

        sigma_R^2 = s_M^2 / D^2 - 2 cov M / D^3 + M^2 s_D^2 / D^4 with the arm's means M, D.
        """
        mean_d = self.denominator_mean
        if mean_d == 0 or self.n <= 1:
            return 0.0
        mean_m = self.numerator_mean
        var_m = _sample_variance(self.n, self.numerator_sum, self.numerator_sum_squares)
        var_d = _sample_variance(self.n, self.denominator_sum, self.denominator_sum_squares)
        cov = _sample_covariance(self.n, self.numerator_sum, self.denominator_sum, self.cross_sum)
        return max(
            var_m / mean_d**2 - 2 * cov * mean_m / mean_d**3 + mean_m**2 * var_d / mean_d**4, 0.0
        )

    def __add__(self, other: RatioStats) -> RatioStats:
        if not isinstance(other, RatioStats):
            return NotImplemented
        return RatioStats(
            n=self.n + other.n,
            numerator_sum=self.numerator_sum + other.numerator_sum,
            numerator_sum_squares=self.numerator_sum_squares + other.numerator_sum_squares,
            denominator_sum=self.denominator_sum + other.denominator_sum,
            denominator_sum_squares=self.denominator_sum_squares + other.denominator_sum_squares,
            cross_sum=self.cross_sum + other.cross_sum,
        )

    def merge(self, other: RatioStats) -> RatioStats:
        return self + other

    @classmethod
    def from_values(cls, numerators: ArrayLike, denominators: ArrayLike) -> RatioStats:
        m = np.asarray(numerators, dtype=float)
        d = np.asarray(denominators, dtype=float)
        if m.shape != d.shape:
            raise ValueError("numerators and denominators must have the same length")
        return cls(
            n=int(m.size),
            numerator_sum=float(m.sum()),
            numerator_sum_squares=float(m @ m),
            denominator_sum=float(d.sum()),
            denominator_sum_squares=float(d @ d),
            cross_sum=float(m @ d),
        )


@dataclass(frozen=True, slots=True)
class CupedStats:
    """A metric with its pre-exposure covariate, for CUPED (STATS.md 5).

    `sum`, `sum_squares`: the metric Y in the experiment window; `pre_sum`, `pre_sum_squares`:
    the same metric X before exposure; `cross_sum` = sum(X*Y), all over the arm's n units.
    """

    n: int
    sum: float
    sum_squares: float
    pre_sum: float
    pre_sum_squares: float
    cross_sum: float

    def __post_init__(self) -> None:
        _check_count("n", self.n)
        for field in ("sum", "sum_squares", "pre_sum", "pre_sum_squares", "cross_sum"):
            _check_finite(field, getattr(self, field))
        _check_empty(
            self.n,
            sum=self.sum,
            sum_squares=self.sum_squares,
            pre_sum=self.pre_sum,
            pre_sum_squares=self.pre_sum_squares,
            cross_sum=self.cross_sum,
        )
        _check_square_sum("sum_squares", self.sum_squares, self.sum, self.n)
        _check_square_sum("pre_sum_squares", self.pre_sum_squares, self.pre_sum, self.n)
        _check_cross_product("cross_sum", self.cross_sum, self.sum_squares, self.pre_sum_squares)

    @property
    def post(self) -> MeanStats:
        """The unadjusted metric, as used when CUPED falls back (no pre-period variance)."""
        return MeanStats(n=self.n, sum=self.sum, sum_squares=self.sum_squares)

    @property
    def pre(self) -> MeanStats:
        return MeanStats(n=self.n, sum=self.pre_sum, sum_squares=self.pre_sum_squares)

    @property
    def mean(self) -> float:
        """The unadjusted mean of Y; the adjusted one needs the pooled theta of both arms."""
        return float(self.sum) / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        return _sample_variance(self.n, self.sum, self.sum_squares)

    @property
    def covariance(self) -> float:
        """Sample covariance of Y and X (n-1)."""
        return _sample_covariance(self.n, self.sum, self.pre_sum, self.cross_sum)

    def __add__(self, other: CupedStats) -> CupedStats:
        if not isinstance(other, CupedStats):
            return NotImplemented
        return CupedStats(
            n=self.n + other.n,
            sum=self.sum + other.sum,
            sum_squares=self.sum_squares + other.sum_squares,
            pre_sum=self.pre_sum + other.pre_sum,
            pre_sum_squares=self.pre_sum_squares + other.pre_sum_squares,
            cross_sum=self.cross_sum + other.cross_sum,
        )

    def merge(self, other: CupedStats) -> CupedStats:
        return self + other

    @classmethod
    def from_values(cls, values: ArrayLike, pre_values: ArrayLike) -> CupedStats:
        y = np.asarray(values, dtype=float)
        x = np.asarray(pre_values, dtype=float)
        if y.shape != x.shape:
            raise ValueError("values and pre_values must have the same length")
        return cls(
            n=int(y.size),
            sum=float(y.sum()),
            sum_squares=float(y @ y),
            pre_sum=float(x.sum()),
            pre_sum_squares=float(x @ x),
            cross_sum=float(x @ y),
        )


MetricStats = ProportionStats | MeanStats | RatioStats | CupedStats

_StatsT = TypeVar("_StatsT", ProportionStats, MeanStats, RatioStats, CupedStats)


def merge_all(parts: Iterable[_StatsT]) -> _StatsT:
    """Add up the statistics of several time buckets (at least one) of one arm and metric."""
    iterator = iter(parts)
    try:
        total = next(iterator)
    except StopIteration:
        raise ValueError("parts must contain at least one statistic") from None
    for part in iterator:
        total = total + part
    return total
