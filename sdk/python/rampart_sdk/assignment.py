"""Sticky, stateless assignment of units to variants, following GrowthBook's bucketing rules.

A unit's variant depends only on (seed, unit id, hash version, bucket ranges), so every
process, edge replica and SDK agrees without stored state. ``build_assignment_spec`` (and
``rampart_sdk.canary.build_canary_spec`` for ramps) validate a configuration once and
precompute everything a decision needs; ``assign`` then costs one hash and one table lookup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from types import MappingProxyType
from typing import Final, Literal

from rampart_sdk.hashing import (
    BUCKET_GRID,
    HASH_VERSIONS,
    FixedSuffix,
    bucket_index,
    bucket_index_v1,
    bucket_index_v2,
    fixed_suffix,
    fnv1a32,
    fnv1a32_update_fixed,
)

BucketRange = tuple[float, float]
AssignmentReason = Literal["override", "assigned", "not_in_namespace", "not_in_coverage"]

WEIGHT_SUM_TOLERANCE: Final = 1e-9
# How far past 1.0 an interval may end: float rounding in GrowthBook's cumulative ranges.
RANGE_END_TOLERANCE: Final = 1e-9

# GrowthBook replaces a weight vector by equal weights when its sum falls outside
# [0.99, 1.01] (SDK spec, getBucketRanges); bucket_ranges mirrors that rule.
_GROWTHBOOK_WEIGHT_SUM_MIN: Final = 0.99
_GROWTHBOOK_WEIGHT_SUM_MAX: Final = 1.01

# The lookup table stores variant index + 1 in one byte, with 0 meaning "no variant".
_MAX_VARIANTS: Final = 255
_NO_VARIANT: Final = 0


@dataclass(frozen=True, slots=True)
class Namespace:
    """A slice [start, end) of a namespace; experiments on disjoint slices never share a unit."""

    namespace_id: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if not isinstance(self.namespace_id, str) or not self.namespace_id:
            raise ValueError("namespace.namespace_id: must be a non-empty string")
        if not (
            math.isfinite(self.start)
            and math.isfinite(self.end)
            and 0.0 <= self.start < self.end <= 1.0
        ):
            raise ValueError(
                f"namespace: need 0 <= start < end <= 1, got [{self.start}, {self.end})"
            )


@dataclass(frozen=True, slots=True)
class Assignment:
    """The outcome of one decision.

    ``variant_key`` is None when the unit is not in the experiment; the caller then serves
    the spec's ``control_key`` and records no exposure. ``in_experiment`` says whether an
    exposure counts for analysis. ``bucket`` is the GrowthBook hash in [0, 1) that decided
    the outcome: the namespace hash for "not_in_namespace", otherwise the unit's hash under
    the experiment's seed.
    """

    variant_key: str | None
    in_experiment: bool
    reason: AssignmentReason
    bucket: float


@dataclass(frozen=True, slots=True)
class AssignmentSpec:
    """A validated experiment configuration with everything a decision needs precomputed.

    ``ranges`` holds, per variant (in ``variant_keys`` order, control first), the bucket
    intervals [start, end) that select it. Specs built from weights have exactly one
    interval per variant, laid out as GrowthBook lays them out; canary ramps with three or
    more canaries split control into several intervals (see ``rampart_sdk.canary.canary_ranges``).
    ``weights`` are each variant's share of the namespace at full coverage.
    Build specs with ``build_assignment_spec`` or ``rampart_sdk.canary.build_canary_spec``.
    """

    experiment_key: str
    seed: str
    hash_version: int
    variant_keys: tuple[str, ...]
    weights: tuple[float, ...]
    coverage: float
    namespace: Namespace | None
    overrides: Mapping[str, str] = field(hash=False)
    ranges: tuple[tuple[BucketRange, ...], ...]
    control_key: str = field(init=False)
    # Derived once in __post_init__ so that assign() does no validation and no search.
    _variant_by_bucket: bytes = field(init=False, repr=False, compare=False, hash=False)
    _seed_state: int = field(init=False, repr=False, compare=False, hash=False)
    _seed_suffix: FixedSuffix = field(init=False, repr=False, compare=False, hash=False)
    _namespace_suffix: FixedSuffix = field(init=False, repr=False, compare=False, hash=False)
    _override_assignments: Mapping[str, Assignment] = field(
        init=False, repr=False, compare=False, hash=False
    )
    # Memo of the outcome per bucket index (and per namespace bucket for units outside
    # the namespace). A bucket has one outcome, so once every bucket has been seen a decision
    # allocates nothing. Entries are immutable; two threads racing on an empty slot store
    # equal objects, which is harmless.
    _outcome_by_bucket: list[Assignment | None] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _namespace_miss_by_bucket: list[Assignment | None] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _validate_spec(self)
        # Frozen dataclass: derived fields are set once, here, through object.__setattr__.
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "control_key", self.variant_keys[0])
        object.__setattr__(
            self,
            "_variant_by_bucket",
            _variant_lookup_table(self.ranges, BUCKET_GRID[self.hash_version]),
        )
        # Hash version 2 hashes seed + unit id, so the FNV state after the seed is shared
        # by every decision. Version 1 and namespaces hash unit id + seed; their seeds are
        # folded into a constant-time continuation instead.
        object.__setattr__(self, "_seed_state", fnv1a32(self.seed))
        seed_suffix = fixed_suffix(self.seed if self.hash_version == 1 else "")
        object.__setattr__(self, "_seed_suffix", seed_suffix)
        namespace_seed = "" if self.namespace is None else "__" + self.namespace.namespace_id
        object.__setattr__(self, "_namespace_suffix", fixed_suffix(namespace_seed))
        grid = BUCKET_GRID[self.hash_version]
        object.__setattr__(self, "_outcome_by_bucket", [None] * grid)
        # Namespaces always use hash version 1, whose grid has 1000 buckets.
        namespace_grid = 0 if self.namespace is None else BUCKET_GRID[1]
        object.__setattr__(self, "_namespace_miss_by_bucket", [None] * namespace_grid)
        object.__setattr__(
            self,
            "_override_assignments",
            # A plain dict: it is private, and dict.get is the cheapest lookup per decision.
            {
                unit_id: Assignment(
                    variant_key=variant_key,
                    # Allowlisted QA traffic must not count towards the statistics.
                    in_experiment=False,
                    reason="override",
                    bucket=bucket_index(seed=self.seed, unit_id=unit_id, version=self.hash_version)
                    / BUCKET_GRID[self.hash_version],
                )
                for unit_id, variant_key in self.overrides.items()
            },
        )

    def __reduce__(self) -> tuple[type[AssignmentSpec], tuple[object, ...]]:
        # Pickle the configuration only (the read-only overrides view cannot be pickled);
        # unpickling rebuilds and revalidates the derived fields.
        return (
            AssignmentSpec,
            (
                self.experiment_key,
                self.seed,
                self.hash_version,
                self.variant_keys,
                self.weights,
                self.coverage,
                self.namespace,
                dict(self.overrides),
                self.ranges,
            ),
        )


def equal_weights(num_variations: int) -> list[float]:
    """GrowthBook's ``getEqualWeights``: ``num_variations`` equal shares, empty below 1."""
    if num_variations < 1:
        return []
    return [1 / num_variations] * num_variations


def bucket_ranges(
    num_variations: int, coverage: float = 1.0, weights: Sequence[float] | None = None
) -> list[BucketRange]:
    """GrowthBook's ``getBucketRanges``: one [start, end) interval per variation.

    Each variation's interval starts where the previous variation's full weight ends and
    covers ``coverage`` of its weight, so starts stay fixed when coverage changes and
    raising coverage only adds units to their own variation. Like GrowthBook, coverage
    is clamped to [0, 1], and weights that do not match the number of variations, contain
    a negative or non-finite value, or sum outside [0.99, 1.01] are replaced by equal
    weights. The float operations are GrowthBook's, so the interval ends are bit-identical.
    """
    coverage = min(max(coverage, 0.0), 1.0)
    if weights is None or not _growthbook_accepts_weights(weights, num_variations):
        weights = equal_weights(num_variations)
    ranges: list[BucketRange] = []
    cumulative = 0.0
    for weight in weights:
        start = cumulative
        cumulative += weight
        ranges.append((start, start + coverage * weight))
    return ranges


def choose_variation(n: float, ranges: Sequence[BucketRange]) -> int:
    """GrowthBook's ``chooseVariation``: index of the first range holding ``n``, else -1."""
    for index, (start, end) in enumerate(ranges):
        if start <= n < end:
            return index
    return -1


def in_namespace(unit_id: str, namespace: Namespace) -> bool:
    """GrowthBook's ``inNamespace``: hash version 1 of ``unit_id`` with seed ``"__" + id``."""
    n = bucket_index_v1(unit_id, "__" + namespace.namespace_id) / 1000
    return namespace.start <= n < namespace.end


def assign(spec: AssignmentSpec, unit_id: str) -> Assignment:
    """Decide which variant ``unit_id`` gets, with GrowthBook's order of checks.

    Order: forced override, then namespace, then hash and bucket lookup (a bucket outside
    every range is outside coverage). GrowthBook skips units whose id is empty; an empty
    id here is a caller error and raises ValueError.
    """
    forced = spec._override_assignments.get(unit_id)
    if forced is not None:
        return forced
    if not unit_id:
        raise ValueError("unit_id: must be a non-empty string")
    namespace = spec.namespace
    version_1 = spec.hash_version == 1
    # Namespaces and hash version 1 both start from the hash of the unit id alone.
    unit_state = fnv1a32(unit_id) if version_1 or namespace is not None else 0
    if namespace is not None:
        namespace_index = fnv1a32_update_fixed(unit_state, spec._namespace_suffix) % 1000
        if not namespace.start <= namespace_index / 1000 < namespace.end:
            missed = spec._namespace_miss_by_bucket[namespace_index]
            if missed is None:
                missed = Assignment(None, False, "not_in_namespace", namespace_index / 1000)
                spec._namespace_miss_by_bucket[namespace_index] = missed
            return missed
    if version_1:
        index = fnv1a32_update_fixed(unit_state, spec._seed_suffix) % 1000
    else:
        index = bucket_index_v2(spec._seed_state, unit_id)
    outcome = spec._outcome_by_bucket[index]
    if outcome is None:
        outcome = _outcome_for_bucket(spec, index)
        spec._outcome_by_bucket[index] = outcome
    return outcome


def _bucket_value(spec: AssignmentSpec, index: int) -> float:
    # The same division GrowthBook performs, so the float is bit-identical to its bucket.
    return index / BUCKET_GRID[spec.hash_version]


def _outcome_for_bucket(spec: AssignmentSpec, index: int) -> Assignment:
    variant_number = spec._variant_by_bucket[index]
    if variant_number == _NO_VARIANT:
        return Assignment(None, False, "not_in_coverage", _bucket_value(spec, index))
    return Assignment(
        spec.variant_keys[variant_number - 1], True, "assigned", _bucket_value(spec, index)
    )


def build_assignment_spec(
    *,
    experiment_key: str,
    variant_keys: Sequence[str],
    weights: Sequence[float] | None = None,
    coverage: float = 1.0,
    seed: str | None = None,
    hash_version: int = 2,
    namespace: Namespace | None = None,
    overrides: Mapping[str, str] | None = None,
) -> AssignmentSpec:
    """A spec whose ranges GrowthBook derives from ``weights`` and ``coverage``.

    ``weights`` default to equal weights; ``seed`` defaults to the experiment key, as in
    GrowthBook (an empty seed also falls back to the key). Raises ValueError naming the
    offending field.
    """
    keys = tuple(variant_keys)
    weight_tuple = tuple(equal_weights(len(keys)) if weights is None else weights)
    _check_weights(weight_tuple, len(keys))
    _check_coverage(coverage)
    ranges = tuple((interval,) for interval in bucket_ranges(len(keys), coverage, weight_tuple))
    return AssignmentSpec(
        experiment_key=experiment_key,
        seed=seed or experiment_key,
        hash_version=hash_version,
        variant_keys=keys,
        weights=weight_tuple,
        coverage=coverage,
        namespace=namespace,
        overrides=overrides or {},
        ranges=ranges,
    )


def rolled_back_spec(spec: AssignmentSpec) -> AssignmentSpec:
    """The same experiment with all traffic on control and the overrides dropped.

    Seed, hash version, coverage and namespace are kept, so units keep their buckets and
    exactly the units that were in the experiment now get control. Overrides are dropped
    because a rollback must also take allowlisted units off a harmful variant.
    """
    control_only = tuple(1.0 if index == 0 else 0.0 for index in range(len(spec.variant_keys)))
    ranges = tuple(
        (interval,)
        for interval in bucket_ranges(len(spec.variant_keys), spec.coverage, control_only)
    )
    return replace(spec, weights=control_only, overrides={}, ranges=ranges)


def growthbook_ranges(spec: AssignmentSpec) -> tuple[BucketRange, ...] | None:
    """The spec's layout as GrowthBook's explicit per-variation ``ranges``, if it has one.

    Returns None when some variant owns several intervals (canary ramps with three or
    more canaries), which GrowthBook cannot express.
    """
    if any(len(intervals) != 1 for intervals in spec.ranges):
        return None
    return tuple(intervals[0] for intervals in spec.ranges)


def _growthbook_accepts_weights(weights: Sequence[float], num_variations: int) -> bool:
    if len(weights) != num_variations:
        return False
    if not all(math.isfinite(weight) and weight >= 0.0 for weight in weights):
        return False
    return _GROWTHBOOK_WEIGHT_SUM_MIN <= sum(weights) <= _GROWTHBOOK_WEIGHT_SUM_MAX


def _check_weights(weights: tuple[float, ...], num_variants: int) -> None:
    if len(weights) != num_variants:
        raise ValueError(
            f"weights: need one weight per variant ({num_variants}), got {len(weights)}"
        )
    if not all(math.isfinite(weight) and weight >= 0.0 for weight in weights):
        raise ValueError(f"weights: every weight must be finite and non-negative, got {weights}")
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"weights: must sum to 1 (within {WEIGHT_SUM_TOLERANCE}), got {total}")


def _check_coverage(coverage: float) -> None:
    if not (math.isfinite(coverage) and 0.0 <= coverage <= 1.0):
        raise ValueError(f"coverage: must lie in [0, 1], got {coverage}")


def _validate_spec(spec: AssignmentSpec) -> None:
    if not isinstance(spec.experiment_key, str) or not spec.experiment_key:
        raise ValueError("experiment_key: must be a non-empty string")
    if not isinstance(spec.seed, str) or not spec.seed:
        raise ValueError("seed: must be a non-empty string")
    if spec.hash_version not in HASH_VERSIONS:
        raise ValueError(f"hash_version: must be 1 or 2, got {spec.hash_version!r}")
    keys = spec.variant_keys
    if not 2 <= len(keys) <= _MAX_VARIANTS:
        raise ValueError(f"variant_keys: need 2 to {_MAX_VARIANTS} variants, got {len(keys)}")
    if not all(isinstance(key, str) and key for key in keys):
        raise ValueError("variant_keys: every key must be a non-empty string")
    if len(set(keys)) != len(keys):
        raise ValueError(f"variant_keys: keys must be unique, got {keys}")
    _check_weights(spec.weights, len(keys))
    _check_coverage(spec.coverage)
    for unit_id, variant_key in spec.overrides.items():
        if not isinstance(unit_id, str) or not unit_id:
            raise ValueError("overrides: every unit id must be a non-empty string")
        if variant_key not in keys:
            raise ValueError(
                f"overrides: unit {unit_id!r} forced to unknown variant {variant_key!r}"
            )
    _check_ranges(spec)


def _check_ranges(spec: AssignmentSpec) -> None:
    if len(spec.ranges) != len(spec.variant_keys):
        raise ValueError(
            f"ranges: need one entry per variant ({len(spec.variant_keys)}), got {len(spec.ranges)}"
        )
    all_intervals: list[BucketRange] = []
    for variant_key, weight, intervals in zip(
        spec.variant_keys, spec.weights, spec.ranges, strict=True
    ):
        if not intervals:
            raise ValueError(f"ranges: variant {variant_key!r} has no interval")
        for start, end in intervals:
            # GrowthBook accumulates weights in floats, so a last interval may end a rounding
            # error past 1.0 (1.0000000000000002); bucket values are below 1 either way.
            if not (
                math.isfinite(start)
                and math.isfinite(end)
                and 0.0 <= start <= end <= 1.0 + RANGE_END_TOLERANCE
            ):
                raise ValueError(
                    f"ranges: variant {variant_key!r} has invalid interval [{start}, {end})"
                )
        # The weights must describe the layout, or reported shares would be false.
        covered = math.fsum(end - start for start, end in intervals)
        if abs(covered - spec.coverage * weight) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(
                f"ranges: variant {variant_key!r} covers {covered}, "
                f"but coverage * weight is {spec.coverage * weight}"
            )
        all_intervals.extend(intervals)
    nonempty = sorted(interval for interval in all_intervals if interval[0] < interval[1])
    for (_, previous_end), (next_start, _) in pairwise(nonempty):
        if next_start < previous_end:
            raise ValueError("ranges: intervals of different variants overlap")


def _variant_lookup_table(ranges: tuple[tuple[BucketRange, ...], ...], grid: int) -> bytes:
    """Byte ``i`` is 1 + the variant that GrowthBook's chooseVariation picks for bucket i / grid.

    Buckets come only in steps of 1/grid, so a table of grid entries replaces the range
    search. Bounds are found with the same float comparison chooseVariation makes
    (start <= i / grid < end), so the table agrees with it bucket for bucket.
    """
    table = bytearray(grid)
    # Filled from the last variant to the first so that, as in chooseVariation, the first
    # variant whose range holds a bucket wins.
    for variant_index in range(len(ranges) - 1, -1, -1):
        for start, end in ranges[variant_index]:
            first = _first_bucket_at_or_above(start, grid)
            stop = _first_bucket_at_or_above(end, grid)
            if first < stop:
                table[first:stop] = bytes([variant_index + 1]) * (stop - first)
    return bytes(table)


def _first_bucket_at_or_above(bound: float, grid: int) -> int:
    """Smallest i in [0, grid] with i / grid >= bound, under float division."""
    index = min(max(math.ceil(bound * grid), 0), grid)
    while index > 0 and (index - 1) / grid >= bound:
        index -= 1
    while index < grid and index / grid < bound:
        index += 1
    return index
