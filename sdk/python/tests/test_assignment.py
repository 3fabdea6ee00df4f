"""Tests for sticky assignment, GrowthBook bucketing and canary ramps (rampart_sdk.assignment)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rampart_sdk.assignment import (
    AssignmentSpec,
    BucketRange,
    Namespace,
    _variant_lookup_table,  # private: the table behind assign(), checked below
    assign,
    bucket_ranges,
    build_assignment_spec,
    choose_variation,
    equal_weights,
    growthbook_ranges,
    in_namespace,
    rolled_back_spec,
)
from rampart_sdk.canary import build_canary_spec, canary_ranges
from rampart_sdk.hashing import BUCKET_GRID

REPO_ROOT = Path(__file__).resolve().parents[3]
TESTS_DIR = Path(__file__).resolve().parent
# GrowthBook's SDK conformance vectors (packages/sdk-js/test/cases.json, specVersion 0.8.0).
CASES_PATH = REPO_ROOT / "../shared/reference/growthbook-cases.json"
CASES: dict[str, Any] = json.loads(CASES_PATH.read_text(encoding="utf-8"))

IDS_100K = [f"user-{number}" for number in range(100_000)]


def variant_at(spec: AssignmentSpec, n: float) -> str | None:
    """The variant whose intervals hold bucket n, read straight from the spec's ranges."""
    for variant_key, intervals in zip(spec.variant_keys, spec.ranges, strict=True):
        if any(start <= n < end for start, end in intervals):
            return variant_key
    return None


def grid_layout(spec: AssignmentSpec) -> list[str | None]:
    """The variant of every bucket on the spec's hash grid."""
    grid = BUCKET_GRID[spec.hash_version]
    return [variant_at(spec, index / grid) for index in range(grid)]


# --- GrowthBook conformance vectors --------------------------------------------------------


@pytest.mark.parametrize(("name", "arguments", "expected"), CASES["getBucketRange"])
def test_growthbook_bucket_range_vectors(
    name: str, arguments: list[Any], expected: list[list[float]]
) -> None:
    num_variations, coverage, weights = arguments
    ranges = bucket_ranges(num_variations, coverage, weights)
    assert len(ranges) == len(expected), name
    for (start, end), (expected_start, expected_end) in zip(ranges, expected, strict=True):
        # The JavaScript suite compares after rounding; 0.2 + 0.3 * 0.2 is 0.26 only to 1e-16.
        assert start == pytest.approx(expected_start, abs=1e-12), name
        assert end == pytest.approx(expected_end, abs=1e-12), name


@pytest.mark.parametrize(("name", "n", "ranges", "expected"), CASES["chooseVariation"])
def test_growthbook_choose_variation_vectors(
    name: str, n: float, ranges: list[list[float]], expected: int
) -> None:
    assert choose_variation(n, [(start, end) for start, end in ranges]) == expected, name


@pytest.mark.parametrize(("name", "unit_id", "namespace", "expected"), CASES["inNamespace"])
def test_growthbook_in_namespace_vectors(
    name: str, unit_id: str, namespace: list[Any], expected: bool
) -> None:
    namespace_id, start, end = namespace
    assert in_namespace(unit_id, Namespace(namespace_id, start, end)) is expected, name


@pytest.mark.parametrize(("num_variations", "expected"), CASES["getEqualWeights"])
def test_growthbook_equal_weights_vectors(num_variations: int, expected: list[float]) -> None:
    # The vectors print 1/3 to eight decimals.
    assert equal_weights(num_variations) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize(("name", "unit_id", "namespace", "expected"), CASES["inNamespace"])
def test_assign_respects_namespace_vectors(
    name: str, unit_id: str, namespace: list[Any], expected: bool
) -> None:
    spec = build_assignment_spec(
        experiment_key="exp",
        variant_keys=["control", "treatment"],
        namespace=Namespace(*namespace),
    )
    outcome = assign(spec, unit_id)
    assert (outcome.reason != "not_in_namespace") is expected, name
    assert outcome.in_experiment is expected, name


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"experiment_key": ""}, "experiment_key"),
        ({"variant_keys": ["only"], "weights": [1.0]}, "variant_keys"),
        ({"variant_keys": ["a", "a"]}, "variant_keys"),
        ({"variant_keys": ["a", ""]}, "variant_keys"),
        ({"weights": [0.5, 0.6]}, "weights"),
        ({"weights": [0.4, 0.5999]}, "weights"),
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.5, -0.5]}, "weights"),
        ({"weights": [math.nan, 1.0]}, "weights"),
        ({"coverage": 1.2}, "coverage"),
        ({"coverage": -0.1}, "coverage"),
        ({"coverage": math.inf}, "coverage"),
        ({"hash_version": 3}, "hash_version"),
        ({"overrides": {"qa-1": "nonexistent"}}, "overrides"),
        ({"overrides": {"": "control"}}, "overrides"),
    ],
)
def test_invalid_configuration_names_the_field(changes: dict[str, Any], field_name: str) -> None:
    arguments: dict[str, Any] = {
        "experiment_key": "exp",
        "variant_keys": ["control", "treatment"],
        "weights": [0.5, 0.5],
    }
    arguments.update(changes)
    with pytest.raises(ValueError, match=field_name):
        build_assignment_spec(**arguments)


@pytest.mark.parametrize(
    ("namespace_id", "start", "end"),
    [("", 0.0, 0.5), ("ns", 0.5, 0.5), ("ns", 0.6, 0.5), ("ns", -0.1, 0.5), ("ns", 0.0, 1.1)],
)
def test_invalid_namespace_names_the_field(namespace_id: str, start: float, end: float) -> None:
    with pytest.raises(ValueError, match="namespace"):
        Namespace(namespace_id, start, end)


def test_weights_within_tolerance_are_accepted() -> None:
    spec = build_assignment_spec(
        experiment_key="exp", variant_keys=["a", "b", "c"], weights=[0.1, 0.2, 0.7]
    )
    # 0.1 + 0.2 + 0.7 is 1.0000000000000002 in floats: inside the 1e-9 tolerance.
    assert spec.weights == (0.1, 0.2, 0.7)


def test_ranges_inconsistent_with_weights_are_rejected() -> None:
    spec = build_assignment_spec(experiment_key="exp", variant_keys=["a", "b"])
    with pytest.raises(ValueError, match="ranges"):
        dataclasses.replace(spec, ranges=(((0.0, 0.3),), ((0.3, 1.0),)))
    with pytest.raises(ValueError, match="ranges"):
        dataclasses.replace(spec, ranges=(((0.0, 0.5),), ((0.4, 0.9),)), coverage=1.0)


def test_empty_unit_id_raises() -> None:
    spec = build_assignment_spec(experiment_key="exp", variant_keys=["a", "b"])
    with pytest.raises(ValueError, match="unit_id"):
        assign(spec, "")


def test_spec_and_assignment_are_immutable() -> None:
    spec = build_assignment_spec(
        experiment_key="exp", variant_keys=["a", "b"], overrides={"qa": "b"}
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.coverage = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.overrides["other"] = "a"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        assign(spec, "u").bucket = 0.0  # type: ignore[misc]


def test_spec_survives_pickling_for_other_processes() -> None:
    spec = build_canary_spec(
        experiment_key="ramp",
        variant_keys=["control", "x", "y", "z"],
        canary_shares=[0.1, 0.2, 0.05],
        namespace=Namespace("ns", 0.0, 0.5),
        overrides={"qa": "z"},
    )
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec
    assert [assign(copy, unit) for unit in IDS_100K[:1000]] == [
        assign(spec, unit) for unit in IDS_100K[:1000]
    ]


# --- defaults, overrides, namespaces ------------------------------------------------------


def test_defaults_follow_growthbook() -> None:
    spec = build_assignment_spec(experiment_key="exp", variant_keys=["a", "b", "c", "d"])
    assert spec.seed == "exp"
    assert spec.hash_version == 2
    assert spec.control_key == "a"
    assert spec.weights == (0.25, 0.25, 0.25, 0.25)
    assert growthbook_ranges(spec) == ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def test_overrides_force_the_variant_and_record_no_exposure() -> None:
    spec = build_assignment_spec(
        experiment_key="exp",
        variant_keys=["control", "canary"],
        weights=[1.0, 0.0],
        coverage=0.0,
        namespace=Namespace("ns", 0.0, 0.001),
        overrides={"qa-alice": "canary", "qa-bob": "control"},
    )
    alice = assign(spec, "qa-alice")
    assert (alice.variant_key, alice.reason, alice.in_experiment) == ("canary", "override", False)
    assert assign(spec, "qa-bob").variant_key == "control"
    assert assign(spec, "someone-else").variant_key is None


def test_namespaces_keep_experiments_mutually_exclusive() -> None:
    left = build_assignment_spec(
        experiment_key="left", variant_keys=["a", "b"], namespace=Namespace("ranker", 0.0, 0.4)
    )
    right = build_assignment_spec(
        experiment_key="right", variant_keys=["a", "b"], namespace=Namespace("ranker", 0.4, 1.0)
    )
    in_left = {unit for unit in IDS_100K[:20_000] if assign(left, unit).in_experiment}
    in_right = {unit for unit in IDS_100K[:20_000] if assign(right, unit).in_experiment}
    assert not in_left & in_right
    assert len(in_left) + len(in_right) == 20_000
    assert all(assign(left, unit).reason == "not_in_namespace" for unit in in_right)


def test_outcomes_agree_with_the_ranges_they_were_built_from() -> None:
    spec = build_assignment_spec(
        experiment_key="exp",
        variant_keys=["a", "b", "c"],
        weights=[0.2, 0.3, 0.5],
        coverage=0.7,
        hash_version=1,
    )
    for unit in IDS_100K[:5000]:
        outcome = assign(spec, unit)
        assert outcome.variant_key == variant_at(spec, outcome.bucket)
        assert outcome.reason == ("assigned" if outcome.variant_key else "not_in_coverage")


@settings(max_examples=60)
@given(
    raw_weights=st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=6).filter(
        any
    ),
    coverage_tenths=st.integers(min_value=0, max_value=10),
    hash_version=st.sampled_from([1, 2]),
)
def test_bucket_table_matches_choose_variation_on_every_bucket(
    raw_weights: list[int], coverage_tenths: int, hash_version: int
) -> None:
    # Weights like 0.05 and coverages like 0.3 put range ends a few ulps off grid points,
    # where a table built with rounding instead of GrowthBook's comparison would differ.
    total = sum(raw_weights)
    weights = [weight / total for weight in raw_weights]
    weights[-1] = 1.0 - math.fsum(weights[:-1])
    ranges = bucket_ranges(len(weights), coverage_tenths / 10, weights)
    grid = BUCKET_GRID[hash_version]
    table = _variant_lookup_table(tuple((interval,) for interval in ranges), grid)
    for index in range(grid):
        assert table[index] - 1 == choose_variation(index / grid, ranges)


@pytest.mark.parametrize(
    ("boundary", "grid"),
    [
        # One ulp above a grid point: boundary * grid rounds down to the integer, yet the
        # grid point itself is below the boundary, so it still belongs to the lower range.
        (math.nextafter(0.043, 1.0), 1000),
        (math.nextafter(0.282, 1.0), 1000),
        (math.nextafter(0.3, 1.0), 10000),
        # One ulp below a grid point belongs to the upper range.
        (math.nextafter(0.5, 0.0), 10000),
    ],
)
def test_bucket_table_handles_boundaries_next_to_grid_points(boundary: float, grid: int) -> None:
    ranges = [(0.0, boundary), (boundary, 1.0)]
    table = _variant_lookup_table(tuple((interval,) for interval in ranges), grid)
    for index in range(grid):
        assert table[index] - 1 == choose_variation(index / grid, ranges)


def test_repeated_decisions_reuse_one_outcome_object() -> None:
    spec = build_assignment_spec(experiment_key="exp", variant_keys=["a", "b"])
    assert assign(spec, "user-1") is assign(spec, "user-1")


# --- determinism across processes ---------------------------------------------------------

# The child process imports this module and computes the same rows as the parent.
_CHILD_PROGRAM = """
import json, sys
from test_assignment import outcome_rows
print(json.dumps(outcome_rows(json.loads(sys.stdin.read()))))
"""


def outcome_rows(ids: list[str]) -> list[list[list[Any]]]:
    specs = [
        build_assignment_spec(
            experiment_key="exp",
            variant_keys=["a", "b", "c"],
            weights=[0.2, 0.3, 0.5],
            coverage=0.9,
        ),
        build_assignment_spec(
            experiment_key="exp",
            variant_keys=["a", "b"],
            hash_version=1,
            namespace=Namespace("ns", 0.1, 0.8),
        ),
        build_canary_spec(
            experiment_key="ramp", variant_keys=["c", "x", "y"], canary_shares=[0.05, 0.2]
        ),
    ]
    return [[list(dataclasses.astuple(assign(spec, unit))) for unit in ids] for spec in specs]


@settings(max_examples=3, deadline=None)
@given(
    ids=st.lists(
        st.text(alphabet=st.characters(codec=None, exclude_categories=()), min_size=1),
        min_size=1,
        max_size=50,
    ),
    hash_seed=st.integers(min_value=1, max_value=2**32 - 1),
)
def test_assignment_is_identical_in_another_process(ids: list[str], hash_seed: int) -> None:
    # Python's hash() changes with PYTHONHASHSEED; assignment must not depend on it.
    environment = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": str(TESTS_DIR)}
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD_PROGRAM],
        input=json.dumps(ids),
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        check=True,
        timeout=60,
    )
    assert json.loads(completed.stdout) == outcome_rows(ids)


# --- shares --------------------------------------------------------------------------------


def _assert_binomial_share(count: int, n: int, p: float, grid: int) -> None:
    """count ~ Binomial(n, p) within 5 standard deviations, plus the grid's rounding.

    A range boundary can fall anywhere between two grid points, so the share of grid
    points a range holds may differ from p by up to 1/grid at each of its two ends.
    """
    tolerance = 5.0 * math.sqrt(n * p * (1.0 - p)) + 2.0 * n / grid
    assert abs(count - n * p) <= tolerance, (count, n * p, tolerance)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    raw_weights=st.lists(st.floats(min_value=0.05, max_value=1.0), min_size=2, max_size=4),
    coverage=st.floats(min_value=0.2, max_value=1.0),
    seed=st.text(min_size=1, max_size=12),
    hash_version=st.sampled_from([1, 2]),
)
def test_arm_shares_are_binomial_over_100k_ids(
    raw_weights: list[float], coverage: float, seed: str, hash_version: int
) -> None:
    total = math.fsum(raw_weights)
    weights = [weight / total for weight in raw_weights]
    weights[-1] = 1.0 - math.fsum(weights[:-1])
    keys = [f"v{index}" for index in range(len(weights))]
    spec = build_assignment_spec(
        experiment_key="exp",
        variant_keys=keys,
        weights=weights,
        coverage=coverage,
        seed=seed,
        hash_version=hash_version,
    )
    counts = Counter(assign(spec, unit).variant_key for unit in IDS_100K)
    grid = BUCKET_GRID[hash_version]
    for key, weight in zip(keys, weights, strict=True):
        _assert_binomial_share(counts[key], len(IDS_100K), coverage * weight, grid)
    _assert_binomial_share(counts[None], len(IDS_100K), 1.0 - coverage, grid)


def test_canary_spec_shares_over_100k_ids() -> None:
    spec = build_canary_spec(
        experiment_key="ramp",
        variant_keys=["control", "a", "b", "c"],
        canary_shares=[0.05, 0.1, 0.2],
    )
    assert spec.weights == pytest.approx((0.65, 0.05, 0.1, 0.2))
    counts = Counter(assign(spec, unit).variant_key for unit in IDS_100K)
    for key, weight in zip(spec.variant_keys, spec.weights, strict=True):
        _assert_binomial_share(counts[key], len(IDS_100K), weight, BUCKET_GRID[2])


# --- coverage and ramp monotonicity --------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    raw_weights=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=5).filter(
        lambda weights: math.fsum(weights) > 0.1
    ),
    coverages=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    hash_version=st.sampled_from([1, 2]),
)
def test_raising_coverage_only_adds_units_to_their_own_arm(
    raw_weights: list[float], coverages: list[float], hash_version: int
) -> None:
    total = math.fsum(raw_weights)
    weights = [weight / total for weight in raw_weights]
    keys = [f"v{index}" for index in range(len(weights))]
    low, high = (
        build_assignment_spec(
            experiment_key="exp",
            variant_keys=keys,
            weights=weights,
            coverage=coverage,
            hash_version=hash_version,
        )
        for coverage in coverages
    )
    for before, after in zip(grid_layout(low), grid_layout(high), strict=True):
        assert before is None or before == after
    for unit in IDS_100K[:2000]:
        before_key = assign(low, unit).variant_key
        assert before_key is None or before_key == assign(high, unit).variant_key


canary_counts = st.integers(min_value=1, max_value=4)


@st.composite
def ramp_steps(draw: st.DrawFn) -> tuple[list[float], list[float], list[float] | None]:
    """Two ramp steps (shares before <= after, per canary) over the same lanes."""
    count = draw(canary_counts)
    lane_widths: list[float] | None = None
    if draw(st.booleans()):
        raw = draw(st.lists(st.floats(0.05, 1.0), min_size=count, max_size=count))
        lane_widths = [width / math.fsum(raw) for width in raw]
    widths = lane_widths or [1.0 / count] * count
    before: list[float] = []
    after: list[float] = []
    for width in widths:
        pair = sorted(draw(st.tuples(st.floats(0.0, width), st.floats(0.0, width))))
        before.append(pair[0])
        after.append(pair[1])
    return before, after, lane_widths


@settings(max_examples=40, deadline=None)
@given(step=ramp_steps(), hash_version=st.sampled_from([1, 2]))
def test_ramping_up_only_moves_units_from_control_to_a_canary(
    step: tuple[list[float], list[float], list[float] | None], hash_version: int
) -> None:
    before_shares, after_shares, lane_widths = step
    keys = ["control", *(f"canary-{index}" for index in range(len(before_shares)))]
    before, after = (
        build_canary_spec(
            experiment_key="ramp",
            variant_keys=keys,
            canary_shares=shares,
            lane_widths=lane_widths,
            hash_version=hash_version,
        )
        for shares in (before_shares, after_shares)
    )
    # Every bucket on the grid, so the property holds for every possible unit id.
    for old, new in zip(grid_layout(before), grid_layout(after), strict=True):
        assert old is not None and new is not None
        assert old == new or (old == "control" and new != "control")
    for unit in IDS_100K[:2000]:
        old_key = assign(before, unit).variant_key
        new_key = assign(after, unit).variant_key
        assert old_key == new_key or (old_key == "control" and new_key != "control")


@settings(max_examples=50)
@given(share=st.floats(min_value=0.0, max_value=1.0))
def test_single_canary_layout_is_growthbooks_two_variation_layout(share: float) -> None:
    spec = build_canary_spec(
        experiment_key="ramp", variant_keys=["control", "canary"], canary_shares=[share]
    )
    # Bit-identical, not approximately equal: GrowthBook SDKs must pick the same arm.
    expected: list[BucketRange] = bucket_ranges(2, 1.0, [1.0 - share, share])
    assert growthbook_ranges(spec) == tuple(expected)


def test_two_canaries_keep_one_interval_each_and_three_do_not() -> None:
    two = build_canary_spec(
        experiment_key="ramp", variant_keys=["c", "x", "y"], canary_shares=[0.1, 0.2]
    )
    assert growthbook_ranges(two) == ((0.1, 0.8), (0.0, 0.1), (0.8, 1.0))
    three = build_canary_spec(
        experiment_key="ramp", variant_keys=["c", "x", "y", "z"], canary_shares=[0.1, 0.1, 0.1]
    )
    assert growthbook_ranges(three) is None
    assert len(three.ranges[0]) == 2


@pytest.mark.parametrize(
    ("shares", "lane_widths", "field_name"),
    [
        ([], None, "canary_shares"),
        ([0.6, 0.1], None, "canary_shares"),
        ([-0.1], None, "canary_shares"),
        ([0.1, 0.1], [0.5], "lane_widths"),
        ([0.1, 0.1], [0.5, 0.6], "lane_widths"),
        ([0.1, 0.1], [1.0, 0.0], "lane_widths"),
    ],
)
def test_invalid_ramp_names_the_field(
    shares: list[float], lane_widths: list[float] | None, field_name: str
) -> None:
    with pytest.raises(ValueError, match=field_name):
        canary_ranges(shares, lane_widths=lane_widths)


def test_canary_spec_needs_one_share_per_canary() -> None:
    with pytest.raises(ValueError, match="canary_shares"):
        build_canary_spec(experiment_key="r", variant_keys=["c", "x", "y"], canary_shares=[0.1])


# --- rollback ------------------------------------------------------------------------------


def test_rolled_back_spec_sends_every_unit_in_the_experiment_to_control() -> None:
    spec = build_assignment_spec(
        experiment_key="exp",
        variant_keys=["control", "a", "b"],
        weights=[0.2, 0.3, 0.5],
        coverage=0.6,
        seed="fixed-seed",
        namespace=Namespace("ns", 0.0, 0.9),
        overrides={"qa": "b"},
    )
    rolled_back = rolled_back_spec(spec)
    assert rolled_back.weights == (1.0, 0.0, 0.0)
    assert rolled_back.overrides == {}
    assert (rolled_back.seed, rolled_back.coverage, rolled_back.namespace) == (
        spec.seed,
        spec.coverage,
        spec.namespace,
    )
    assert assign(rolled_back, "qa").variant_key in ("control", None)
    for unit in IDS_100K[:5000]:
        original = assign(spec, unit)
        after = assign(rolled_back, unit)
        assert after.variant_key in ("control", None)
        assert after.bucket == original.bucket
        if original.reason == "not_in_namespace":
            assert after.reason == "not_in_namespace"


def test_rolled_back_canary_has_no_canary_traffic() -> None:
    spec = build_canary_spec(
        experiment_key="ramp",
        variant_keys=["control", "x", "y", "z"],
        canary_shares=[0.2, 0.1, 0.3],
    )
    rolled_back = rolled_back_spec(spec)
    assert {assign(rolled_back, unit).variant_key for unit in IDS_100K[:5000]} == {"control"}


def test_a_last_range_that_rounds_past_one_is_accepted() -> None:
    # Found by hypothesis: GrowthBook's cumulative float sums end this layout at
    # 1.0000000000000002, which the spec check once refused as an invalid interval.
    weights = [
        0.1357504537539382,
        0.2684674920350294,
        0.17194743492308592,
        0.11303764512179212,
        0.3107969741661544,
    ]
    assert bucket_ranges(5, 1.0, weights)[-1][1] > 1.0
    spec = build_assignment_spec(
        experiment_key="exp",
        variant_keys=[f"v{index}" for index in range(5)],
        weights=weights,
        coverage=1.0,
    )
    assert {assign(spec, unit).variant_key for unit in IDS_100K[:500]} == {
        f"v{index}" for index in range(5)
    }
