"""How experiments are shown in the web UI, with no request handling.

The values the experiment pages render: the planned traffic split per arm, the ramp steps
and the current step's clock, guardrails and audit entries in plain words, a list row per
experiment, and the table of lifecycle actions (label, confirmation text, when allowed).
`experiments.views` parses requests, calls services and hands these to the templates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils.timesince import timesince

from experiments.models import AuditEntry, Experiment, ExperimentKind, ExperimentStatus

S = ExperimentStatus
LIVE_STATUSES = (S.RUNNING, S.PAUSED)


@dataclass(frozen=True)
class ArmShare:
    key: str
    share: float
    is_control: bool
    css: str

    @property
    def percent(self) -> str:
        return format_percent(self.share)


def format_percent(share: float) -> str:
    """12.5% / 1% / 0.1%: as many digits as the value needs, no trailing zeros."""
    text = f"{share * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def planned_split(experiment: Experiment) -> list[ArmShare]:
    """How traffic is split between the routed variants now (or, for a draft, at start).

    A canary at step s sends s of the traffic to the canaries (divided by their weights,
    equally when those are all zero) and the rest to control; an A/B test follows its
    weights. A rolled-back experiment sends everything to control, a completed one to its
    winner.
    """
    variants = [v for v in experiment.variants.all() if not v.is_shadow]
    css = {v.key: f"arm-{i % 6}" for i, v in enumerate(variants)}
    shares: dict[str, float]
    if experiment.status == S.ROLLED_BACK:
        shares = {v.key: 1.0 if v.is_control else 0.0 for v in variants}
    elif experiment.status == S.COMPLETED and experiment.winner_id:
        shares = {v.key: 1.0 if v.pk == experiment.winner_id else 0.0 for v in variants}
    elif experiment.kind == ExperimentKind.CANARY:
        steps = list(experiment.ramp_steps.all())
        position = experiment.ramp_position or 0
        share = steps[min(position, len(steps) - 1)].canary_share if steps else 0.0
        canaries = [v for v in variants if not v.is_control]
        total_weight = sum(v.weight for v in canaries)
        shares = {}
        for v in variants:
            if v.is_control:
                shares[v.key] = 1.0 - share
            elif total_weight > 0:
                shares[v.key] = share * v.weight / total_weight
            else:
                shares[v.key] = share / len(canaries)
    else:
        shares = {v.key: v.weight for v in variants}
    return [ArmShare(v.key, shares[v.key], v.is_control, css[v.key]) for v in variants]


@dataclass(frozen=True)
class StepState:
    number: int
    share: str
    min_duration_s: int
    min_exposures_per_arm: int
    state: str  # done | current | stopped | next

    @property
    def duration_text(self) -> str:
        return _format_duration(self.min_duration_s)


def time_ago(moment: datetime | None, now: datetime) -> str:
    """“just now” under a minute (timesince would say “0 minutes”), else “3 hours ago”."""
    if moment is None:
        return ""
    if (now - moment).total_seconds() < 60:
        return "just now"
    return f"{timesince(moment, now)} ago"


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h" + (f" {rest // 60} min" if rest // 60 else "")


def ramp_states(experiment: Experiment) -> list[StepState]:
    steps = list(experiment.ramp_steps.all())
    position = experiment.ramp_position
    finished = experiment.status == S.COMPLETED
    states = []
    for step in steps:
        if finished or (position is not None and step.position < position):
            state = "done"
        elif position is not None and step.position == position and experiment.status != S.DRAFT:
            state = "stopped" if experiment.status == S.ROLLED_BACK else "current"
        else:
            state = "next"
        states.append(
            StepState(
                number=step.position + 1,
                share=format_percent(step.canary_share),
                min_duration_s=step.min_duration_s,
                min_exposures_per_arm=step.min_exposures_per_arm,
                state=state,
            )
        )
    return states


@dataclass(frozen=True)
class StepClock:
    """How long the current ramp step has run against its minimum duration."""

    elapsed_text: str
    minimum_text: str
    fraction: float


def step_clock(experiment: Experiment, now: datetime) -> StepClock | None:
    if experiment.kind != ExperimentKind.CANARY or experiment.status not in LIVE_STATUSES:
        return None
    steps = list(experiment.ramp_steps.all())
    if experiment.ramp_position is None or experiment.step_started_at is None or not steps:
        return None
    step = steps[min(experiment.ramp_position, len(steps) - 1)]
    elapsed = max(0.0, (now - experiment.step_started_at).total_seconds())
    fraction = 1.0 if step.min_duration_s == 0 else min(1.0, elapsed / step.min_duration_s)
    return StepClock(
        elapsed_text=_format_duration(elapsed),
        minimum_text=_format_duration(step.min_duration_s),
        fraction=fraction,
    )


def guardrail_phrase(name: str, direction: str, margin: float) -> str:
    """“p95 latency may rise at most 10%” for a lower-is-better metric with margin 0.1."""
    verb = "rise" if direction == "lower" else "fall"
    if margin <= 0:
        return f"{name} may not {verb} at all"
    return f"{name} may {verb} at most {format_percent(margin)}"


ACTION_LABELS = {
    "create": "Created the experiment",
    "update": "Edited the settings",
    "start": "Started",
    "pause": "Paused",
    "resume": "Resumed",
    "complete": "Completed",
    "rollback": "Rolled back",
    "advance": "Advanced the ramp",
}


@dataclass(frozen=True)
class AuditLine:
    at: datetime
    actor: str
    actor_role: str
    what: str
    reason: str
    evidence: dict[str, Any] | None
    tone: str  # ok | warn | bad | info | neutral


def audit_lines(entries: Sequence[AuditEntry]) -> list[AuditLine]:
    tones = {"rollback": "bad", "pause": "warn", "complete": "ok", "advance": "info"}
    lines = []
    for entry in entries:
        what = ACTION_LABELS.get(entry.action, entry.action)
        after = entry.after or {}
        if entry.action == "advance" and "canary_share" in after:
            what = f"Advanced the ramp to {format_percent(float(after['canary_share']))}"
        elif entry.action == "complete" and after.get("winner"):
            what = f"Completed, winner {after['winner']}"
        elif entry.action == "update" and after.get("fields"):
            what = f"Edited {', '.join(after['fields'])}"
        evidence = after.get("evidence")
        lines.append(
            AuditLine(
                at=entry.created_at,
                actor=entry.actor,
                actor_role=entry.actor_role,
                what=what,
                reason=entry.reason,
                evidence=evidence if isinstance(evidence, dict) else None,
                tone=tones.get(entry.action, "neutral"),
            )
        )
    return lines


@dataclass(frozen=True)
class ExperimentRow:
    experiment: Experiment
    split: list[ArmShare]
    step_text: str
    started_text: str


def ramp_text(experiment: Experiment) -> str:
    """Where a canary is on its ramp: “Step 2 of 6 · 5%”, “Stopped at step 2 of 6”."""
    steps = list(experiment.ramp_steps.all())
    if experiment.kind != ExperimentKind.CANARY or not steps:
        return ""
    if experiment.status == S.DRAFT or experiment.ramp_position is None:
        return f"{len(steps)} steps planned"
    position = min(experiment.ramp_position, len(steps) - 1)
    where = f"step {position + 1} of {len(steps)}"
    if experiment.status == S.ROLLED_BACK:
        return f"Stopped at {where}"
    if experiment.status == S.COMPLETED:
        return "All steps done" if position == len(steps) - 1 else f"Promoted at {where}"
    return f"Step {position + 1} of {len(steps)} · {format_percent(steps[position].canary_share)}"


@dataclass(frozen=True)
class ActionSpec:
    name: str
    label: str
    title: str
    explanation: str
    button_class: str
    reason: str  # none | optional | required: whether the service records a reason
    allowed: Callable[[Experiment], bool]


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "start",
            "Start",
            "Start this experiment?",
            "Traffic starts flowing to the variants at once; a canary starts at its first "
            "ramp step. Variants, metrics and the unit attribute are frozen from now on.",
            "btn-primary",
            "none",
            lambda e: e.status == S.DRAFT,
        ),
        ActionSpec(
            "pause",
            "Pause",
            "Pause this experiment?",
            "While paused every user gets control; assignments are kept and resume "
            "unchanged. A paused canary restarts its current step's minimum duration.",
            "",
            "optional",
            lambda e: e.status == S.RUNNING,
        ),
        ActionSpec(
            "resume",
            "Resume",
            "Resume this experiment?",
            "Users get their variants again, exactly as before the pause.",
            "btn-primary",
            "none",
            lambda e: e.status == S.PAUSED,
        ),
        ActionSpec(
            "advance",
            "Advance ramp",
            "Advance the canary to its next ramp step?",
            "More users move from control to the canary now, without waiting for the "
            "minimum duration or exposures. At the last step this completes the canary.",
            "",
            "optional",
            lambda e: e.status == S.RUNNING and e.kind == ExperimentKind.CANARY,
        ),
        ActionSpec(
            "rollback",
            "Roll back",
            "Roll back this experiment?",
            "Every user goes back to control at once and the experiment ends; it cannot be "
            "restarted. The reason goes into the audit log.",
            "btn-danger",
            "required",
            lambda e: e.status in LIVE_STATUSES,
        ),
        ActionSpec(
            "complete",
            "Complete",
            "Complete this experiment and ship a winner?",
            "Every user gets the winner from now on and the experiment ends.",
            "",
            "optional",
            lambda e: e.status in LIVE_STATUSES,
        ),
    )
}
