"""Canary ramps: control plus one or more canaries, each growing inside its own fixed lane.

Canary ramp property (the contract ``build_canary_spec`` keeps and the tests check):
    Raising any canary's share, with the other shares and the lanes unchanged, only ever
    moves units from control to that canary. No unit moves from a canary back to control,
    and no unit moves between two non-control variants. Lowering a share is the exact
    reverse. The property holds for every unit id because it holds for every bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rampart_sdk.assignment import (
    WEIGHT_SUM_TOLERANCE,
    AssignmentSpec,
    BucketRange,
    Namespace,
    equal_weights,
)


def canary_ranges(
    canary_shares: Sequence[float], *, lane_widths: Sequence[float] | None = None
) -> tuple[tuple[BucketRange, ...], ...]:
    """Ramp-safe bucket intervals for control plus one or more canaries.

    Returns one tuple of intervals per variant: control first, then one per entry of
    ``canary_shares``. The bucket line [0, 1) is cut into fixed lanes, one per canary
    (``lane_widths``, equal by default, summing to 1). Canary j owns ``canary_shares[j]``
    of its own lane, anchored at one fixed end of the lane: the top end for the last
    lane, the bottom end for every other lane. Control owns the rest of every lane.

    Why the ramp property holds: a canary's interval has one fixed end and grows or
    shrinks only at the other, inside its own lane, and everything in the lane that the
    canary does not own is control. So a larger share turns control buckets into that
    canary's buckets and touches no other lane. Lanes must stay the same across ramp
    steps; the default (equal lanes) depends only on the number of canaries.

    GrowthBook compatibility:
      * one canary: control [0, 1 - s), canary [1 - s, 1), exactly GrowthBook's ranges for
        weights [1 - s, s] at full coverage with the canary as the last variation;
      * two canaries: canary 1, control, canary 2 sit side by side, which GrowthBook
        reproduces only through explicit per-variation ``ranges`` (``growthbook_ranges``),
        not through weights, because its weight layout puts control first;
      * three or more canaries: control is split into several intervals. GrowthBook allows
        one interval per variation, so no GrowthBook configuration gives these
        assignments. None can keep the property either: every growing canary must border
        control, and one interval has only two ends.
    """
    shares = tuple(canary_shares)
    if not shares:
        raise ValueError("canary_shares: need at least one canary")
    widths = tuple(equal_weights(len(shares)) if lane_widths is None else lane_widths)
    if len(widths) != len(shares):
        raise ValueError(
            f"lane_widths: need one lane per canary ({len(shares)}), got {len(widths)}"
        )
    if not all(math.isfinite(width) and width > 0.0 for width in widths):
        raise ValueError("lane_widths: every lane must be finite and positive")
    if abs(math.fsum(widths) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"lane_widths: must sum to 1, got {math.fsum(widths)}")
    for share, width in zip(shares, widths, strict=True):
        if not (math.isfinite(share) and 0.0 <= share <= width + WEIGHT_SUM_TOLERANCE):
            raise ValueError(
                f"canary_shares: each share must lie in [0, its lane width {width}], got {share}"
            )

    control: list[BucketRange] = []
    canaries: list[tuple[BucketRange, ...]] = []
    lane_start = 0.0
    last = len(shares) - 1
    for position, (share, width) in enumerate(zip(shares, widths, strict=True)):
        lane_end = 1.0 if position == last else lane_start + width
        share = min(share, lane_end - lane_start)
        if position == last:
            # Written as GrowthBook computes a two-variation layout (start = 1 - s,
            # end = start + s) so the single-canary case is bit-identical to it.
            canary_start = lane_end - share
            canaries.append(((canary_start, canary_start + share),))
            control.append((lane_start, canary_start))
        else:
            canaries.append(((lane_start, lane_start + share),))
            control.append((lane_start + share, lane_end))
        lane_start = lane_end
    return (_merge_intervals(control), *canaries)


def build_canary_spec(
    *,
    experiment_key: str,
    variant_keys: Sequence[str],
    canary_shares: Sequence[float],
    lane_widths: Sequence[float] | None = None,
    seed: str | None = None,
    hash_version: int = 2,
    namespace: Namespace | None = None,
    overrides: Mapping[str, str] | None = None,
) -> AssignmentSpec:
    """A ramp step: control is ``variant_keys[0]``; canary j gets ``canary_shares[j]``.

    Coverage is always 1. GrowthBook shrinks a range towards its start when coverage
    drops, and a canary's start moves down as its share rises, so under partial coverage
    the top of the canary's range would fall out of the experiment when the share rises,
    breaking the ramp property. Limit exposure with the shares (or a namespace) instead.
    """
    keys = tuple(variant_keys)
    if len(keys) != len(canary_shares) + 1:
        raise ValueError(
            f"canary_shares: need one share per non-control variant ({len(keys) - 1}), "
            f"got {len(canary_shares)}"
        )
    ranges = canary_ranges(canary_shares, lane_widths=lane_widths)
    canary_weights = tuple(float(share) for share in canary_shares)
    return AssignmentSpec(
        experiment_key=experiment_key,
        seed=seed or experiment_key,
        hash_version=hash_version,
        variant_keys=keys,
        weights=(1.0 - math.fsum(canary_weights), *canary_weights),
        coverage=1.0,
        namespace=namespace,
        overrides=overrides or {},
        ranges=ranges,
    )


def _merge_intervals(intervals: Sequence[BucketRange]) -> tuple[BucketRange, ...]:
    """Drop empty intervals and join touching ones; keep one (empty) interval if none remain."""
    merged: list[BucketRange] = []
    for start, end in intervals:
        if start >= end:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    if not merged:
        return ((intervals[0][0], intervals[0][0]),)
    return tuple(merged)
