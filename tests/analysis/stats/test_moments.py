"""Sufficient-statistics dataclasses: validation at construction and exact merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.stats.moments import CupedStats, MeanStats, ProportionStats, RatioStats, merge_all

small_ints = st.lists(st.integers(min_value=-1000, max_value=1000), min_size=0, max_size=40)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: ProportionStats(n=-1, sum=0), "n"),
        (lambda: ProportionStats(n=10, sum=11), "sum"),
        (lambda: ProportionStats(n=10.5, sum=1), "n"),  # type: ignore[arg-type]
        (lambda: ProportionStats(n=True, sum=1), "n"),
        (lambda: MeanStats(n=3, sum=math.nan, sum_squares=1), "sum"),
        (lambda: MeanStats(n=2, sum=10, sum_squares=1), "sum_squares"),
        (lambda: MeanStats(n=0, sum=1, sum_squares=1), "sum"),
        (lambda: MeanStats(n=2, sum=1, sum_squares=-1), "sum_squares"),
        (
            lambda: RatioStats(
                n=2,
                numerator_sum=2,
                numerator_sum_squares=2,
                denominator_sum=2,
                denominator_sum_squares=2,
                cross_sum=5,
            ),
            "cross_sum",
        ),
        (
            lambda: RatioStats(
                n=2,
                numerator_sum=2,
                numerator_sum_squares=2,
                denominator_sum=4,
                denominator_sum_squares=1,
                cross_sum=1,
            ),
            "denominator_sum_squares",
        ),
        (
            lambda: CupedStats(
                n=2, sum=2, sum_squares=2, pre_sum=2, pre_sum_squares=2, cross_sum=math.inf
            ),
            "cross_sum",
        ),
        (
            lambda: CupedStats(
                n=2, sum=2, sum_squares=2, pre_sum=4, pre_sum_squares=1, cross_sum=0
            ),
            "pre_sum_squares",
        ),
    ],
)
def test_invalid_statistics_name_the_bad_field(factory: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()  # type: ignore[operator]


def test_statistics_are_frozen() -> None:
    stats = MeanStats(n=2, sum=3.0, sum_squares=5.0)
    with pytest.raises(AttributeError):
        stats.n = 3  # type: ignore[misc]


def test_moments_match_numpy() -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(10, 3, size=500)
    stats = MeanStats.from_values(values)
    assert stats.mean == pytest.approx(values.mean(), rel=1e-12)
    assert stats.variance == pytest.approx(values.var(ddof=1), rel=1e-9)
    flags = rng.random(500) < 0.3
    proportion = ProportionStats.from_values(flags)
    # gbstats ProportionStatistic: population variance p(1 - p).
    assert proportion.variance == pytest.approx(flags.mean() * (1 - flags.mean()), rel=1e-12)
    pre = values + rng.normal(0, 2, size=500)
    cuped = CupedStats.from_values(values, pre)
    assert cuped.covariance == pytest.approx(np.cov(values, pre)[0, 1], rel=1e-9)


def test_ratio_variance_matches_gbstats() -> None:
    from gbstats.models.statistics import RatioStatistic, SampleMeanStatistic

    rng = np.random.default_rng(3)
    d = rng.poisson(3, size=400) + 1.0
    m = rng.binomial(d.astype(int), 0.4).astype(float)
    ours = RatioStats.from_values(m, d)
    theirs = RatioStatistic(
        n=400,
        m_statistic=SampleMeanStatistic(n=400, sum=m.sum(), sum_squares=(m * m).sum()),
        d_statistic=SampleMeanStatistic(n=400, sum=d.sum(), sum_squares=(d * d).sum()),
        m_d_sum_of_products=(m * d).sum(),
    )
    assert ours.mean == pytest.approx(theirs.mean, rel=1e-12)
    assert ours.variance == pytest.approx(theirs.variance, rel=1e-9)


def test_merge_all_requires_parts() -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge_all([])


def test_adding_different_kinds_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _ = MeanStats(n=1, sum=1, sum_squares=1) + ProportionStats(n=1, sum=1)  # type: ignore[operator]


@settings(max_examples=60, deadline=None)
@given(small_ints, small_ints)
def test_merging_buckets_equals_the_statistic_of_their_union(
    first: list[int], second: list[int]
) -> None:
    # Integer-valued data keep every sum exact in floating point, so equality must be exact.
    a = np.array(first, dtype=float)
    b = np.array(second, dtype=float)
    union = np.concatenate([a, b])
    assert MeanStats.from_values(a) + MeanStats.from_values(b) == MeanStats.from_values(union)
    assert merge_all([RatioStats.from_values(a, a * 2), RatioStats.from_values(b, b * 2)]) == (
        RatioStats.from_values(union, union * 2)
    )
    assert CupedStats.from_values(a, a - 3).merge(CupedStats.from_values(b, b - 3)) == (
        CupedStats.from_values(union, union - 3)
    )
    flags_a, flags_b = (a > 0).astype(float), (b > 0).astype(float)
    assert ProportionStats.from_values(flags_a) + ProportionStats.from_values(flags_b) == (
        ProportionStats.from_values(np.concatenate([flags_a, flags_b]))
    )
