"""What a prediction-drift alarm does to a run's decision, and its one alert.

`drift_decided` turns an alarm (a tested arm whose drift e-value reached its threshold,
`analysis.prediction_drift`) into the experiment's configured response: "rollback" makes
the run roll back with a `Breach` as evidence (the audit entry and the rollback alert carry
it), "hold" keeps a canary at its step (and an A/B test from being called safe), "warn"
only alerts. An earlier guardrail rollback keeps precedence. `drift_alert` queues the hold
or warning alert once per experiment and tolerance (a rollback sends its own).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from analysis import alerts
from analysis.drift_models import PredictionDriftState
from analysis.guardrails import Breach, ExperimentAnalysis
from experiments.contracts import ExperimentView

KIND = "prediction_drift"
METHOD = "betting on users' first predictions, known assignment shares"


def _summary(report: dict[str, Any], arm: str) -> str:
    entry = report["arms"][arm]
    tv = entry.get("tv")
    distance = f"total variation {tv:.3f}" if isinstance(tv, float) else "a distance"
    return (
        f"prediction drift: {arm}'s predictions differ from {report['control']}'s by more than "
        f"the tolerated total variation {report['tolerance']:g} ({distance} estimated, "
        f"always-valid p = {entry['p']:.2g})"
    )


def _breach(report: dict[str, Any], arm: str) -> Breach:
    entry = report["arms"][arm]
    return Breach(
        metric=KIND,
        name="Prediction drift",
        arm=arm,
        control_arm=report["control"],
        rel_effect=None,
        interval=(None, None),
        interval_level=None,
        harm_bound=entry.get("tv"),
        margin=float(report["tolerance"]),
        n={arm: entry["bet_users"]["arm"], report["control"]: entry["bet_users"]["control"]},
        summary=_summary(report, arm),
        p_value=entry["p"],
        method=METHOD,
    )


def drift_decided(
    view: ExperimentView, result: ExperimentAnalysis, report: dict[str, Any] | None
) -> ExperimentAnalysis:
    """`result` with the drift alarm's response applied (unchanged without an alarm)."""
    if report is None or not report["flagged"] or result.decision == "rollback":
        return result
    arm = report["flagged"][0]
    action = report["action"]
    summary = _summary(report, arm)
    if action == "rollback":
        return replace(result, decision="rollback", reason=summary, breach=_breach(report, arm))
    if action == "hold" and result.decision in ("advance", "continue", "safe_to_promote"):
        return replace(result, decision="hold", reason=f"ramp held: {summary}")
    return replace(result, reason=f"{result.reason}; warning: {summary}")


def drift_alert(
    view: ExperimentView,
    state: PredictionDriftState,
    result: ExperimentAnalysis,
    report: dict[str, Any] | None,
) -> None:
    """Queue the hold or warning alert once (in the run's transaction)."""
    if report is None or not report["flagged"] or state.alerted or result.decision == "rollback":
        return
    arm = report["flagged"][0]
    held = result.decision == "hold"
    entry = report["arms"][arm]
    payload = alerts.alert_payload(
        kind=KIND,
        experiment_key=view.key,
        experiment_name=view.name,
        action="ramp held, no rollback" if held else "alert only (prediction drift: warn)",
        reason=_summary(report, arm),
        details={
            "metric": KIND,
            "metric_name": "Prediction drift",
            "arm": arm,
            "control_arm": report["control"],
            "p_value": entry["p"],
            "method": METHOD,
            "n": {arm: entry["bet_users"]["arm"], report["control"]: entry["bet_users"]["control"]},
            "tolerance": report["tolerance"],
            "total_variation": entry.get("tv"),
        },
    )
    alerts.alert_enqueue(
        experiment_id=view.id,
        kind=KIND,
        payload=payload,
        dedupe=f"{KIND}:{view.id}:{state.tolerance:g}:{arm}",
    )
    state.alerted = True
    state.save(update_fields=["alerted"])
