"""An experiment's verdict for Kubernetes delivery tools: ``pass``, ``fail`` or ``running``.

Argo Rollouts (Web metric provider) and Flagger (webhooks) ask one question of an external
judge during a rollout: may the new version go on? ``verdict`` answers it from the
experiment's lifecycle status and its latest analysis decision (``analysis.guardrails``):

    fail     the experiment was rolled back; or it is running and its latest analysis
             decided ``rollback`` (a guardrail is breached with statistical confidence, or
             the health checks failed with ``on_health_failure: rollback``), the rollback
             being under way; or it was completed with control as the winner.
    pass     it was completed with a non-control winner; or its latest analysis decided
             ``safe_to_promote`` (every guardrail shown non-inferior), ``advance`` (the
             canary's current step is healthy and long enough) or ``complete``.
    running  anything else: not analysed yet, ``continue`` (not enough evidence either way),
             ``hold``, a paused or draft experiment.

Each rule reads evidence the pipeline already produced; nothing is recomputed here, so the
verdict can never disagree with the UI, the audit log or the rollback Rampart takes itself.
``verdict_document`` adds that evidence (the latest result's decision, reason, time, health,
exposures and guardrail rows) for the tool's logs. Pure: no database, no framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from experiments.contracts import ExperimentView

Verdict = Literal["pass", "fail", "running"]
PASS: Final = "pass"
FAIL: Final = "fail"
RUNNING: Final = "running"
VERDICTS: Final = (PASS, FAIL, RUNNING)

PASSING_DECISIONS: Final = frozenset({"safe_to_promote", "advance", "complete"})
FAILING_DECISIONS: Final = frozenset({"rollback"})
GUARDRAIL_ROLE: Final = "guardrail"


@dataclass(frozen=True)
class LatestResult:
    """The parts of the newest analysis result (``ResultSnapshot``) the verdict reads."""

    created_at: datetime
    decision: str
    reason: str
    health: Mapping[str, Any]
    exposures: Mapping[str, Any]
    metrics: Sequence[Mapping[str, Any]]


def verdict(experiment: ExperimentView, latest: LatestResult | None) -> tuple[Verdict, str]:
    """The verdict and a sentence saying why (see the module docstring)."""
    status = experiment.status
    control = experiment.control.key
    if status == "rolled_back":
        return FAIL, "the experiment was rolled back: all traffic is on control"
    if status == "completed":
        winner = experiment.winner_key
        if winner is None or winner == control:
            return FAIL, f"the experiment was completed with control ({control}) as the winner"
        return PASS, f"the experiment was completed with {winner} as the winner"
    if status != "running":
        return RUNNING, f"the experiment is {status}, not running"
    if latest is None:
        return RUNNING, "no analysis has run yet"
    if latest.decision in FAILING_DECISIONS:
        return FAIL, f"the latest analysis decided to roll back: {latest.reason}"
    if latest.decision in PASSING_DECISIONS:
        return PASS, f"the latest analysis decided {latest.decision}: {latest.reason}"
    return RUNNING, f"the latest analysis decided {latest.decision}: {latest.reason}"


def verdict_document(
    experiment: ExperimentView, latest: LatestResult | None, *, now: datetime
) -> dict[str, Any]:
    """The verdict with its evidence, as the verdict endpoint answers it."""
    outcome, reason = verdict(experiment, latest)
    evidence: dict[str, Any] | None = None
    if latest is not None:
        evidence = {
            "analysed_at": latest.created_at.isoformat(),
            "age_s": round(max((now - latest.created_at).total_seconds(), 0.0), 3),
            "decision": latest.decision,
            "reason": latest.reason,
            "health": dict(latest.health),
            "exposures": dict(latest.exposures),
            "guardrails": [
                dict(row) for row in latest.metrics if row.get("role") == GUARDRAIL_ROLE
            ],
        }
    return {
        "experiment": experiment.key,
        "verdict": outcome,
        "pass": outcome == PASS,
        "fail": outcome == FAIL,
        "reason": reason,
        "status": experiment.status,
        "kind": experiment.kind,
        "control": experiment.control.key,
        "winner": experiment.winner_key,
        "canary_share": experiment.canary_share,
        "ramp_position": experiment.ramp_position,
        "evidence": evidence,
    }
