"""Input drift over time, run by run: watched request fields against their reference.

For an experiment with input drift on (`experiments.services.input_drift`), each analysis run
sums the proxy's per-bucket counts (`routing.models.InputDriftBucket`) of every watched field
over three spans: the reference (a pinned window: the configured one, else the experiment's
first INPUT_DRIFT_REFERENCE_S seconds; or the uploaded training distribution), everything
since the reference ended, and the recent window (the last INPUT_DRIFT_WINDOW_S seconds after
the reference). `analysis.stats.input_drift` gives the recent window's PSI and the
anytime-valid e-value of everything since; a field is flagged when its PSI exceeds its
threshold and the e-value reaches (number of fields) / alpha. While a pinned reference is
still open nothing is flagged.

Each flagged episode of a field alerts once (`InputDriftState`); the action decides the
rest: "warn" (the default: a monitor) only alerts, "hold" keeps a canary at its step,
"rollback" rolls back with the field as the evidence.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from django.conf import settings

from analysis import alerts
from analysis.drift_models import InputDriftState
from analysis.guardrails import Breach, ExperimentAnalysis
from analysis.stats.input_drift import field_drift, flagged
from experiments.contracts import ExperimentView, InputFieldView
from experiments.input_cells import cell_order
from routing.models import InputDriftBucket

KIND = "input_drift"
METHOD = "Dirichlet-multinomial e-value against the reference (universal inference)"


def _span(view: ExperimentView, now: datetime) -> tuple[float, float] | None:
    """The pinned reference window [start, end) in epoch seconds; None for training."""
    setting = view.input_drift
    assert setting is not None
    reference = setting.reference
    if reference is not None and reference.get("type") == "training":
        return None
    if reference is not None and reference.get("type") == "window":
        start = datetime.fromisoformat(str(reference["start"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(reference["end"]).replace("Z", "+00:00"))
        return start.timestamp(), end.timestamp()
    started = view.started_at or now
    end = started + timedelta(seconds=float(settings.INPUT_DRIFT_REFERENCE_S))
    return started.timestamp(), end.timestamp()


def _add(target: dict[str, float], cells: dict[str, int]) -> None:
    for cell, n in cells.items():
        target[cell] = target.get(cell, 0.0) + n


def _training(field: InputFieldView, distribution: dict[str, Any]) -> dict[str, float]:
    counts = distribution["counts"]
    if field.kind == "number":
        return {str(index): float(n) for index, n in enumerate(counts)}
    return {str(cell): float(n) for cell, n in counts.items()}


def _ordered(field: InputFieldView, *spans: dict[str, float]) -> list[str] | None:
    if field.kind != "number":
        return None
    cells = {cell for span in spans for cell in span}
    special = [cell for cell in cells if cell.startswith("(")]
    return sorted((c for c in cells if not c.startswith("(")), key=cell_order) + special


def input_drift_report(view: ExperimentView, *, now: datetime) -> dict[str, Any] | None:
    """Per watched field, the recent PSI and the test since the reference; None when off."""
    setting = view.input_drift
    if setting is None:
        return None
    now_s = now.timestamp()
    span = _span(view, now)
    ref_start, ref_end = span if span is not None else (-math.inf, -math.inf)
    since_start = ref_end if span is not None else (view.started_at or now).timestamp()
    recent_start = max(since_start, now_s - float(settings.INPUT_DRIFT_WINDOW_S))
    reference: dict[str, dict[str, float]] = {f.path: {} for f in setting.fields}
    since: dict[str, dict[str, float]] = {f.path: {} for f in setting.fields}
    recent: dict[str, dict[str, float]] = {f.path: {} for f in setting.fields}
    rows = InputDriftBucket.objects.filter(
        experiment_id=view.id, bucket_start__gte=min(ref_start, since_start)
    ).values_list("field_path", "bucket_start", "counts")
    for path, bucket, text in rows.iterator():
        if path not in reference:
            continue
        cells = orjson.loads(text)
        if ref_start <= bucket < ref_end:
            _add(reference[path], cells)
        elif bucket >= since_start:
            _add(since[path], cells)
            if bucket >= recent_start:
                _add(recent[path], cells)
    if span is None:
        distributions = (setting.reference or {}).get("distributions", {})
        for field in setting.fields:
            reference[field.path] = _training(field, distributions[field.path])
    collecting = span is not None and now_s < ref_end
    alpha = float(view.alpha) / len(setting.fields)
    fields = []
    for field in setting.fields:
        ordered = _ordered(field, reference[field.path], since[field.path])
        drift = field_drift(
            reference[field.path], recent[field.path], since[field.path], ordered=ordered
        )
        fields.append(
            {
                "path": field.path,
                "kind": field.kind,
                "threshold": field.threshold,
                "psi": drift.psi,
                "p": min(1.0, math.exp(-drift.log_e)) if drift.log_e > 0 else 1.0,
                "e_value": math.exp(min(drift.log_e, 700.0)),
                "reference_n": drift.reference_n,
                "recent_n": drift.recent_n,
                "since_n": drift.since_n,
                "flagged": not collecting
                and flagged(drift, threshold=field.threshold, alpha=alpha),
            }
        )
    return {
        "input_drift": {
            "action": setting.action,
            "reference": "training" if span is None else {"start": ref_start, "end": ref_end},
            "collecting_reference": collecting,
            "window_s": float(settings.INPUT_DRIFT_WINDOW_S),
            "alpha": alpha,
            "fields": fields,
            "drifting": [f["path"] for f in fields if f["flagged"]],
        }
    }


def _summary(entry: dict[str, Any]) -> str:
    return (
        f"input drift: request field {entry['path']!r} has moved away from its reference "
        f"(PSI {entry['psi']:.3f} over the recent window, threshold {entry['threshold']:g}; "
        f"always-valid p = {entry['p']:.2g})"
    )


def input_drift_decided(
    result: ExperimentAnalysis, report: dict[str, Any] | None
) -> ExperimentAnalysis:
    """`result` with the configured response to a drifting field applied (warn: a note)."""
    if report is None or not report["drifting"] or result.decision == "rollback":
        return result
    entry = next(f for f in report["fields"] if f["flagged"])
    summary = _summary(entry)
    action = report["action"]
    if action == "rollback":
        breach = Breach(
            metric=f"{KIND}:{entry['path']}",
            name=f"Input drift of {entry['path']}",
            arm="",
            control_arm="",
            rel_effect=None,
            interval=(None, None),
            interval_level=None,
            harm_bound=entry["psi"],
            margin=float(entry["threshold"]),
            n={"reference": entry["reference_n"], "recent": entry["recent_n"]},
            summary=summary,
            p_value=entry["p"],
            method=METHOD,
        )
        return replace(result, decision="rollback", reason=summary, breach=breach)
    if action == "hold" and result.decision in ("advance", "continue", "safe_to_promote"):
        return replace(result, decision="hold", reason=f"ramp held: {summary}")
    return replace(result, reason=f"{result.reason}; warning: {summary}")


def input_drift_alerts(
    view: ExperimentView, result: ExperimentAnalysis, report: dict[str, Any] | None
) -> None:
    """Alert once per episode of each drifting field (in the run's transaction)."""
    if report is None:
        return
    for entry in report["fields"]:
        state, _ = InputDriftState.objects.get_or_create(
            experiment_id=view.id, field_path=entry["path"]
        )
        if entry["flagged"] and not state.drifting:
            state.episodes += 1
            rolled_back = (
                result.decision == "rollback"
                and result.breach is not None
                and (result.breach.metric == f"{KIND}:{entry['path']}")
            )
            if not rolled_back:  # a rollback sends its own alert
                _alert(view, state, entry, held=result.decision == "hold")
        if state.drifting != entry["flagged"] or entry["flagged"]:
            state.drifting = entry["flagged"]
            state.save(update_fields=["drifting", "episodes"])


def _alert(
    view: ExperimentView, state: InputDriftState, entry: dict[str, Any], *, held: bool
) -> None:
    payload = alerts.alert_payload(
        kind=KIND,
        experiment_key=view.key,
        experiment_name=view.name,
        action="ramp held, no rollback" if held else "alert only (input drift is a monitor)",
        reason=_summary(entry),
        details={
            "metric": f"{KIND}:{entry['path']}",
            "metric_name": f"Input drift of {entry['path']}",
            "p_value": entry["p"],
            "method": METHOD,
            "psi": entry["psi"],
            "threshold": entry["threshold"],
            "n": {"reference": entry["reference_n"], "recent": entry["recent_n"]},
        },
    )
    alerts.alert_enqueue(
        experiment_id=view.id,
        kind=KIND,
        payload=payload,
        dedupe=f"{KIND}:{view.id}:{entry['path']}:{state.episodes}",
    )
