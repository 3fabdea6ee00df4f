"""The traffic split an experiment aims for now: one definition for routing and analysis."""

from __future__ import annotations

import math

from experiments.contracts import ExperimentView


def canary_lanes(view: ExperimentView) -> list[float]:
    """Each canary's lane: its fraction of the canary share, by configured weight."""
    canaries = tuple(v for v in view.routed_variants if not v.is_control)
    total = math.fsum(v.weight for v in canaries)
    if total > 0:
        return [v.weight / total for v in canaries]
    return [1.0 / len(canaries)] * len(canaries) if canaries else []


def planned_split(view: ExperimentView) -> dict[str, float]:
    """Share of units each routed variant should get under the current weights or ramp step.

    A canary's current step gives `canary_share` to the non-control variants, split in
    proportion to their configured weights (`canary_lanes`); control keeps the rest. An A/B
    test uses the configured weights. Coverage and namespaces only take units out of the
    experiment, so they do not change the split among the units that are in it.
    """
    share = view.canary_share
    if share is None:
        total = math.fsum(v.weight for v in view.routed_variants)
        return {v.key: v.weight / total for v in view.routed_variants} if total > 0 else {}
    canaries = [v for v in view.routed_variants if not v.is_control]
    share = min(max(share, 0.0), 1.0)
    split = {view.control.key: 1.0 - share}
    for variant, lane in zip(canaries, canary_lanes(view), strict=True):
        split[variant.key] = share * lane
    return split
