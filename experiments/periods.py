"""Selector of an experiment's traffic periods (ramp steps, pauses, the end) from its audit trail.

The audit log is the record of when the split changed: `start`, `advance` (with the new
`ramp_position` and `canary_share`), `pause`, `resume`, `rollback`, `complete`, and `update`
entries whose weights or ramp position differ before and after. Each of those starts a new
period; the analysis puts a unit in the period of its first exposure (STATS.md 12.2) and
compares arms within it. The ramp steps themselves give a step's share when an entry does not
record it. Entries are read in (created_at, id) order, so periods tile time without gaps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from experiments.contracts import StepPeriod
from experiments.models import AuditEntry, Experiment, ExperimentKind

RUNNING = "running"
PAUSED = "paused"
ENDED = "ended"
_ACTIONS = ("start", "advance", "pause", "resume", "rollback", "complete", "update")


def _split(
    *,
    kind: str,
    control: str,
    routed: Sequence[str],
    weights: Mapping[str, float],
    canary_share: float | None,
) -> dict[str, float]:
    """The planned split (the rule of `routing.split.planned_split`, from recorded values)."""
    if kind == ExperimentKind.CANARY and canary_share is not None:
        share = min(max(float(canary_share), 0.0), 1.0)
        canaries = [key for key in routed if key != control]
        total = math.fsum(float(weights.get(key, 0.0)) for key in canaries)
        split = {control: 1.0 - share}
        for key in canaries:
            lane = float(weights.get(key, 0.0)) / total if total > 0 else 1.0 / len(canaries)
            split[key] = share * lane
        return split
    total = math.fsum(float(weights.get(key, 0.0)) for key in routed)
    return {key: float(weights.get(key, 0.0)) / total for key in routed} if total > 0 else {}


def step_periods(*, experiment_id: int) -> tuple[StepPeriod, ...]:
    """The experiment's periods in time order; empty before it starts (or if it is unknown)."""
    experiment = Experiment.objects.filter(pk=experiment_id).first()
    if experiment is None:
        return ()
    variants = [v for v in experiment.variants.all() if not v.is_shadow]
    control = next((v.key for v in variants if v.is_control), "")
    routed = [v.key for v in variants]
    step_shares = [s.canary_share for s in experiment.ramp_steps.all()]
    entries = AuditEntry.objects.filter(experiment_id=experiment_id, action__in=_ACTIONS).order_by(
        "created_at", "id"
    )
    periods: list[tuple[datetime, str, int | None, dict[str, float]]] = []

    def split_of(after: Mapping[str, Any]) -> tuple[int | None, dict[str, float]]:
        position = after.get("ramp_position")
        share = after.get("canary_share")
        if share is None and isinstance(position, int) and 0 <= position < len(step_shares):
            share = step_shares[position]
        weights = after.get("weights") or {v.key: v.weight for v in variants}
        return position, _split(
            kind=experiment.kind,
            control=control,
            routed=routed,
            weights=weights,
            canary_share=share if experiment.kind == ExperimentKind.CANARY else None,
        )

    for entry in entries:
        after, before = entry.after or {}, entry.before or {}
        state = periods[-1][1] if periods else None
        if (
            entry.action == "start"
            or (entry.action == "resume" and state == PAUSED)
            or (entry.action == "advance" and state == RUNNING)
        ):
            periods.append((entry.created_at, RUNNING, *split_of(after)))
        elif entry.action == "update" and state == RUNNING:
            moved = after.get("weights") != before.get("weights") or after.get(
                "ramp_position"
            ) != before.get("ramp_position")
            if moved:
                periods.append((entry.created_at, RUNNING, *split_of(after)))
        elif entry.action == "pause" and state == RUNNING:
            periods.append((entry.created_at, PAUSED, None, {control: 1.0}))
        elif entry.action in ("rollback", "complete") and state in (RUNNING, PAUSED):
            winner = after.get("winner") if entry.action == "complete" else None
            periods.append((entry.created_at, ENDED, None, {winner or control: 1.0}))
    return tuple(
        StepPeriod(
            index=index,
            start=start,
            end=periods[index + 1][0] if index + 1 < len(periods) else None,
            state=state,
            step_position=position,
            shares=shares,
        )
        for index, (start, state, position, shares) in enumerate(periods)
    )
