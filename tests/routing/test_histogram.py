"""Tests for the proxy's log-bucketed latency histogram (routing/observe/histogram.py)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.observe.histogram import (
    MAX_VALUE_MS,
    MIN_VALUE_MS,
    LogHistogram,
)

latencies = st.floats(min_value=MIN_VALUE_MS, max_value=MAX_VALUE_MS, allow_nan=False)
latency_lists = st.lists(latencies, min_size=1, max_size=300)
probabilities = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)

# Relative error of the DDSketch representative is at most a = 0.01 (Masson, Rim & Lee 2019,
# "DDSketch", PVLDB 12(12)); the slack covers floating-point rounding in log/exp only.
QUANTILE_TOLERANCE = 0.01 + 1e-12


def histogram_of(values: list[float]) -> LogHistogram:
    histogram = LogHistogram()
    histogram.add_many(values)
    return histogram


@settings(max_examples=200, deadline=None)
@given(values=latency_lists, p=probabilities)
def test_quantile_within_one_percent_of_numpy_inverted_cdf(values: list[float], p: float) -> None:
    # numpy's "inverted_cdf" is Hyndman & Fan type 1, the definition the module documents.
    exact = float(np.quantile(np.asarray(values), p, method="inverted_cdf"))
    approximate = histogram_of(values).quantile(p)
    assert abs(approximate - exact) <= QUANTILE_TOLERANCE * exact


@settings(max_examples=100, deadline=None)
@given(first=latency_lists, second=latency_lists)
def test_merge_equals_histogram_of_concatenated_data(
    first: list[float], second: list[float]
) -> None:
    merged = histogram_of(first) + histogram_of(second)
    combined = histogram_of(first + second)
    assert list(merged) == list(combined)
    assert merged.count == combined.count == len(first) + len(second)
    assert merged.sum == pytest.approx(combined.sum, rel=1e-12)
    assert merged.sum_of_squares == pytest.approx(combined.sum_of_squares, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(latencies, max_size=300))
def test_json_round_trip_is_exact(values: list[float]) -> None:
    histogram = histogram_of(values)
    restored = LogHistogram.from_json(histogram.to_json())
    assert restored == histogram
    assert restored.count == histogram.count
    assert list(restored) == list(histogram)


@settings(max_examples=100, deadline=None)
@given(value=latencies)
def test_bucket_edges_contain_the_value_and_the_representative(value: float) -> None:
    histogram = LogHistogram()
    index = histogram.bucket_index(value)
    lower, upper = histogram.lower_edge(index), histogram.upper_edge(index)
    rounding = 1e-12 * value
    assert lower - rounding < value <= upper + rounding
    assert lower <= histogram.representative(index) <= upper
    assert abs(histogram.representative(index) - value) <= QUANTILE_TOLERANCE * value


def test_bucket_boundaries_follow_ddsketch_definition() -> None:
    # gamma = (1 + a) / (1 - a) = 1.01 / 0.99; bucket i = (gamma^(i-1), gamma^i].
    histogram = LogHistogram()
    gamma = 1.01 / 0.99
    assert histogram.bucket_index(1.0) == 0
    assert histogram.bucket_index(1.0001) == 1
    assert histogram.bucket_index(gamma * 1.000001) == 2
    assert histogram.upper_edge(1) == pytest.approx(gamma, rel=1e-14)
    assert histogram.lower_edge(1) == pytest.approx(1.0, rel=1e-14)
    assert histogram.representative(0) == pytest.approx(2.0 / (gamma + 1.0), rel=1e-14)


def test_quantile_of_a_known_sample() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100 ms
    histogram = histogram_of(values)
    # Inverted-CDF order statistics: p=0.5 -> X(50)=50, p=0.95 -> X(95)=95, p=0 -> X(1)=1.
    for p, exact in [(0.0, 1.0), (0.5, 50.0), (0.95, 95.0), (0.951, 96.0), (1.0, 100.0)]:
        assert histogram.quantile(p) == pytest.approx(exact, rel=0.01)
    assert histogram.count == 100
    assert histogram.sum == pytest.approx(5050.0)
    assert histogram.sum_of_squares == pytest.approx(sum(v * v for v in values))


def test_tiny_and_huge_values_are_clamped_into_the_end_buckets() -> None:
    histogram = histogram_of([0.0, 1e-9, MIN_VALUE_MS, 5e7, MAX_VALUE_MS])
    buckets = dict(histogram)
    assert buckets == {histogram.min_index: 3, histogram.max_index: 2}
    assert histogram.lower_edge(histogram.min_index) == 0.0
    assert histogram.upper_edge(histogram.max_index) == math.inf
    assert histogram.sum == pytest.approx(3 * MIN_VALUE_MS + 2 * MAX_VALUE_MS)
    assert histogram.quantile(0.0) == pytest.approx(MIN_VALUE_MS, rel=0.01)
    assert histogram.quantile(1.0) == pytest.approx(MAX_VALUE_MS, rel=0.01)


@pytest.mark.parametrize("bad", [-1.0, -1e-12, math.nan, math.inf, -math.inf])
def test_invalid_latencies_are_rejected(bad: float) -> None:
    histogram = LogHistogram()
    with pytest.raises(ValueError, match="finite non-negative"):
        histogram.add(bad)
    assert histogram.count == 0


def test_json_is_compact_and_versioned() -> None:
    histogram = histogram_of([10.0, 10.0, 10.5, 200.0])
    text = histogram.to_json()
    assert " " not in text
    data = json.loads(text)
    assert data["v"] == 1
    assert data["a"] == 0.01
    assert data["n"] == 4
    ten, ten_and_a_half, two_hundred = (histogram.bucket_index(v) for v in (10.0, 10.5, 200.0))
    assert ten_and_a_half - ten == 2  # one empty bucket between them: kept inside the run
    assert data["b"] == [[ten, 2, 0, 1], [two_hundred, 1]]


def test_empty_histogram() -> None:
    histogram = LogHistogram()
    assert histogram.count == 0
    assert list(histogram) == []
    assert LogHistogram.from_json(histogram.to_json()) == histogram
    with pytest.raises(ValueError, match="empty"):
        histogram.quantile(0.5)


@pytest.mark.parametrize(
    "text",
    [
        '{"v":2,"a":0.01,"n":0,"s":0,"q":0,"b":[]}',
        '{"v":1,"a":0.01,"n":3,"s":0,"q":0,"b":[[5,1,1]]}',
        '{"v":1,"a":0.01,"n":2,"s":0,"q":0,"b":[[5,1],[5,1]]}',
        '{"v":1,"a":0.01,"n":1,"s":0,"q":0,"b":[[5,-1,2]]}',
        '{"v":1,"a":0.01,"n":1,"s":0,"q":0,"b":[[99999,1]]}',
        '{"v":1,"a":0.01,"n":1,"s":0,"q":0,"b":[[5,1.5]]}',
        '{"v":1,"a":0.01,"n":1,"s":0,"q":0}',
        "[1, 2]",
    ],
)
def test_malformed_json_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        LogHistogram.from_json(text)


def test_merge_rejects_different_accuracy() -> None:
    with pytest.raises(ValueError, match="relative accuracy"):
        LogHistogram(0.01).merge(LogHistogram(0.02))


def test_in_place_merge_and_copy_are_independent() -> None:
    first = histogram_of([1.0, 2.0])
    snapshot = first.copy()
    first += histogram_of([3.0])
    assert first.count == 3
    assert snapshot.count == 2
    assert snapshot != first


def test_bucket_at_rank_walks_cumulative_counts() -> None:
    histogram = histogram_of([5.0, 5.0, 50.0, 500.0])
    assert histogram.bucket_at_rank(1) == histogram.bucket_at_rank(2) == histogram.bucket_index(5.0)
    assert histogram.bucket_at_rank(3) == histogram.bucket_index(50.0)
    assert histogram.bucket_at_rank(4) == histogram.bucket_index(500.0)
    with pytest.raises(ValueError, match="rank"):
        histogram.bucket_at_rank(5)


def test_from_bucket_counts_matches_add() -> None:
    values = [1.0, 7.5, 7.6, 300.0]
    added = histogram_of(values)
    built = LogHistogram.from_bucket_counts(
        dict(added), sum_ms=added.sum, sum_of_squares=added.sum_of_squares
    )
    assert built == added
