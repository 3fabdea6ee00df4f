"""Input drift over time, window by window: watched request fields against their reference.

For an experiment with input drift on (`experiments.services.input_drift`) the user is the
unit (`experiments.input_windows`, `analysis.stats.input_drift`): the proxy counts a sampled
user at most once per window of INPUT_DRIFT_WINDOW_S seconds, the reference (a pinned window:
the configured one, else the experiment's first INPUT_DRIFT_REFERENCE_S seconds; its users are
a hash half of their own) or the uploaded training distribution. Each closed monitoring window
k is tested once, when it has closed (and its last buckets had time to be written, `grace_s`):
the PSI of its counts against the reference, and its e-value E_k; a field is flagged when the
PSI exceeds its threshold and E_k >= (number of fields) / (w_k alpha), w_k = 1 / (k (k + 1)).

The rollup (`InputDriftState`) keeps the reference's summed counts once it has closed and the
last tested window's counts, so a run reads the buckets of the windows closed since the last
run (at most `MAX_FOLD` of them; older unread ones are not tested) and, while a pinned
reference is open, the reference's buckets so far: the work does not grow with the
experiment's age. While the reference is open nothing is flagged.

Each flagged episode of a field alerts once (`InputDriftState`); the action decides the
rest: "warn" (the default: a monitor) only alerts, "hold" keeps a canary at its step,
"rollback" rolls back with the field as the evidence.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson
from django.conf import settings

from analysis import alerts
from analysis.drift_models import InputDriftState
from analysis.guardrails import Breach, ExperimentAnalysis
from analysis.stats.input_drift import field_drift, flagged, window_weight
from experiments.contracts import ExperimentView, InputFieldView
from experiments.input_cells import cell_order
from experiments.input_windows import InputWindows, windows_for
from routing.models import InputDriftBucket

KIND = "input_drift"
METHOD = (
    "exact conditional e-value of one window of users against the reference "
    "(Fisher-type splits, union bound over windows)"
)
MAX_FOLD = 3
Counts = dict[str, float]


def grace_s() -> float:
    """How long after a window ends its counts are taken as written (a bucket, two flushes)."""
    return float(settings.OBSERVATION_BUCKET_S) + 2 * float(settings.RECORDER_FLUSH_S)


def _add(target: Counts, cells: dict[str, float]) -> None:
    for cell, n in cells.items():
        target[cell] = target.get(cell, 0.0) + n


def _training(field: InputFieldView, distribution: dict[str, Any]) -> Counts:
    counts = distribution["counts"]
    if field.kind == "number":
        return {str(index): float(n) for index, n in enumerate(counts)}
    return {str(cell): float(n) for cell, n in counts.items()}


def _ordered(field: InputFieldView, *spans: Counts) -> list[str] | None:
    if field.kind != "number":
        return None
    cells = {cell for span in spans for cell in span}
    special = [cell for cell in cells if cell.startswith("(")]
    return sorted((c for c in cells if not c.startswith("(")), key=cell_order) + special


def _sums(
    view: ExperimentView, windows: InputWindows, start: float, end: float
) -> dict[int, dict[str, Counts]]:
    """Window -> field -> summed counts of the buckets starting in [start, end)."""
    assert view.input_drift is not None
    paths = [f.path for f in view.input_drift.fields]
    out: dict[int, dict[str, Counts]] = {}
    rows = InputDriftBucket.objects.filter(
        experiment_id=view.id, field_path__in=paths, bucket_start__gte=start, bucket_start__lt=end
    ).values_list("field_path", "bucket_start", "counts")
    for path, bucket, text in rows.iterator():
        slot = windows.slot(bucket)
        if slot is not None:
            _add(out.setdefault(slot, {}).setdefault(path, {}), orjson.loads(text))
    return out


def _states(view: ExperimentView, key: str) -> dict[str, InputDriftState]:
    assert view.input_drift is not None
    states = {}
    for field in view.input_drift.fields:
        state, _ = InputDriftState.objects.get_or_create(
            experiment_id=view.id, field_path=field.path
        )
        field_key = f"{key}|{field.kind}|{field.edges}"[:200]
        if state.windows_key != field_key:  # new windows or a changed field: a new rollup
            state.windows_key, state.reference_counts = field_key, ""
            state.last_window, state.window_counts, state.since_n = 0, "{}", 0
        states[field.path] = state
    return states


def input_drift_report(view: ExperimentView, *, now: datetime) -> dict[str, Any] | None:
    """Per watched field, the last closed window against the reference; None when off."""
    setting = view.input_drift
    if setting is None:
        return None
    windows = windows_for(
        setting.reference,
        view.started_at or now,
        reference_s=float(settings.INPUT_DRIFT_REFERENCE_S),
        window_s=float(settings.INPUT_DRIFT_WINDOW_S),
    )
    assert windows is not None
    now_s = now.timestamp()
    settled = now_s - grace_s()
    states = _states(view, repr(windows.key))
    training = windows.reference_start is None
    collecting = not training and settled < windows.origin
    reference: dict[str, Counts] = {}
    if training:
        distributions = (setting.reference or {}).get("distributions", {})
        reference = {f.path: _training(f, distributions[f.path]) for f in setting.fields}
    elif all(state.reference_counts for state in states.values()):
        reference = {path: orjson.loads(state.reference_counts) for path, state in states.items()}
    else:
        assert windows.reference_start is not None
        summed = _sums(view, windows, windows.reference_start, windows.origin)
        for field in setting.fields:
            reference[field.path] = {}
            for slot in summed.values():
                _add(reference[field.path], slot.get(field.path, {}))
            if not collecting:
                states[field.path].reference_counts = orjson.dumps(reference[field.path]).decode()
    last = 0 if collecting else windows.last_closed(settled)
    done = min(state.last_window for state in states.values())
    fresh: dict[int, dict[str, Counts]] = {}
    if last > done:
        first = max(done + 1, last - MAX_FOLD + 1)
        summed = _sums(view, windows, windows.bounds(first)[0], windows.bounds(last)[1])
        fresh = {k: summed.get(k, {}) for k in range(first, last + 1)}
    alpha = float(view.alpha) / len(setting.fields)
    fields = [
        _field(field, states[field.path], reference[field.path], fresh, alpha, collecting)
        for field in setting.fields
    ]
    for state in states.values():
        state.save()
    return {
        "input_drift": {
            "action": setting.action,
            "reference": "training"
            if training
            else {"start": windows.reference_start, "end": windows.origin},
            "collecting_reference": collecting,
            "window_s": windows.length,
            "alpha": alpha,
            "fields": fields,
            "drifting": [f["path"] for f in fields if f["flagged"]],
        }
    }


def _field(
    field: InputFieldView,
    state: InputDriftState,
    reference: Counts,
    fresh: dict[int, dict[str, Counts]],
    alpha: float,
    collecting: bool,
) -> dict[str, Any]:
    """One field's entry: the window flagged among those closed since the last run (the
    latest), else the latest closed window; the rollup moved on to the latest."""
    tested: list[tuple[int, Counts]] = []
    for index, by_field in sorted(fresh.items()):
        if index > state.last_window:
            counts = by_field.get(field.path, {})
            tested.append((index, counts))
            state.since_n += int(sum(counts.values()))
    if tested:
        state.last_window, latest = tested[-1]
        state.window_counts = orjson.dumps(latest).decode()
    elif state.last_window:
        tested = [(state.last_window, orjson.loads(state.window_counts))]
    entry: dict[str, Any] = {"window": None, "psi": None, "log_e": 0.0, "recent_n": 0}
    entry["flagged"] = False
    for index, counts in tested:
        drift = field_drift(reference, counts, ordered=_ordered(field, reference, counts))
        hit = not collecting and flagged(
            drift, threshold=field.threshold, alpha=alpha, window=index
        )
        if hit or not entry["flagged"]:
            entry = {
                "window": index,
                "psi": drift.psi,
                "log_e": drift.log_e,
                "recent_n": drift.recent_n,
                "flagged": hit,
            }
    index, log_e = entry["window"], entry.pop("log_e")
    # The always-valid p of the window, its share of alpha included: flagged iff p <= alpha.
    log_p = -(log_e + math.log(window_weight(index))) if index else 0.0
    return {
        "path": field.path,
        "kind": field.kind,
        "threshold": field.threshold,
        **entry,
        "p": math.exp(min(log_p, 0.0)),
        "e_value": math.exp(min(log_e, 700.0)),
        "e_threshold": 1.0 / (window_weight(index) * alpha) if index else None,
        "reference_n": int(sum(reference.values())),
        "since_n": state.since_n,
    }


def _summary(entry: dict[str, Any]) -> str:
    return (
        f"input drift: request field {entry['path']!r} has moved away from its reference "
        f"(PSI {entry['psi']:.3f} in window {entry['window']} of {entry['recent_n']:,} users, "
        f"threshold {entry['threshold']:g}; p = {entry['p']:.2g} with the window's share of "
        "alpha)"
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
