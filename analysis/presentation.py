"""How analysis results are shown in the web UI, with no request handling.

Number, p-value and interval formatting, the decision/status/alert labels (tone, icon,
label), the results table lines, health warnings in plain words, per-arm traffic and latency
lines, the chart time series, and the alert log lines. `analysis.views` reads through
selectors and hands these to the templates (and, for the charts, to JSON).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils.timesince import timesince

from analysis.models import ResultSnapshot
from experiments.contracts import ExperimentView, MetricView

LIVE_STATUSES = ("running", "paused")
# decision -> (tone, icon, label); the label carries the meaning, the tone only repeats it.
DECISIONS: Mapping[str, tuple[str, str, str]] = {
    "continue": ("ok", "✓", "Healthy: collecting data"),
    "advance": ("info", "↑", "Healthy: advancing the ramp"),
    "safe_to_promote": ("ok", "★", "Safe to promote"),
    "complete": ("info", "✓", "Complete"),
    "hold": ("warn", "❚❚", "Hold: the ramp waits"),
    "rollback": ("bad", "↩", "Rolled back"),
}
SHORT_DECISIONS: Mapping[str, str] = {
    "continue": "Healthy",
    "advance": "Advancing",
    "safe_to_promote": "Safe to promote",
    "complete": "Complete",
    "hold": "Hold",
    "rollback": "Rolled back",
}
# metric status -> (tone, icon, label)
METRIC_STATUSES: Mapping[str, tuple[str, str, str]] = {
    "breach": ("bad", "✕", "Guardrail breached"),
    "ok": ("ok", "✓", "Within margin"),
    "insufficient": ("neutral", "…", "Not enough data"),
    "win": ("ok", "▲", "Better"),
    "loss": ("bad", "▼", "Worse"),
    "inconclusive": ("neutral", "≈", "No clear difference yet"),
}
ALERT_STATUSES: Mapping[str, tuple[str, str, str]] = {
    "delivered": ("ok", "✓", "Delivered"),
    "pending": ("warn", "…", "Pending"),
    "dead": ("bad", "✕", "Gave up"),
}


def time_ago(moment: datetime, now: datetime) -> str:
    """“just now” under a minute (timesince would say “0 minutes”), else “3 hours ago”."""
    if (now - moment).total_seconds() < 60:
        return "just now"
    return f"{timesince(moment, now)} ago"


# --- formatting -------------------------------------------------------------------------


def _pct(value: float | None, *, signed: bool = False, digits: int = 1) -> str:
    if value is None:
        return "unbounded"
    text = f"{value * 100:+.{digits}f}%" if signed else f"{value * 100:.{digits}f}%"
    return text.replace("-", "−")


def format_value(value: float | None, metric: MetricView | None, kind: str) -> str:
    """An arm's estimate in the metric's own unit: a rate in %, latency in ms."""
    if value is None:
        return "—"
    if kind == "binomial":
        return _pct(value, digits=2)
    if metric is not None and metric.source == "latency_ms":
        return f"{value:,.0f} ms" if abs(value) >= 100 else f"{value:.1f} ms"
    return f"{value:,.4g}"


def format_p(p: float | None) -> str:
    if p is None:
        return "—"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3f}"


def _e_value(value: float | None) -> str:
    """An SRM e-value: evidence against the configured split (flagged at 1 / alpha)."""
    return "—" if value is None else f"{value:.3g}"


def _bounds(interval: Any) -> tuple[float | None, float | None]:
    """(lower, upper) of a stored [lo, hi] pair; None stands for an unbounded side."""
    lower, upper = [*list(interval or []), None, None][:2]
    return lower, upper


def format_interval(interval: Sequence[float | None] | None) -> str:
    lower, upper = _bounds(interval)
    if lower is None and upper is None:
        return "not yet bounded"
    return f"{_pct(lower, signed=True)} to {_pct(upper, signed=True)}"


@dataclass(frozen=True)
class Tone:
    tone: str
    icon: str
    label: str


def tone_for(table: Mapping[str, tuple[str, str, str]], key: str) -> Tone:
    tone, icon, label = table.get(key, ("neutral", "•", key.replace("_", " ").capitalize()))
    return Tone(tone, icon, label)


@dataclass(frozen=True)
class MetricLine:
    name: str
    role: str
    arm: str
    control_arm: str
    control: str
    treatment: str
    n_control: int | None
    n_treatment: int | None
    users: str
    lift: str
    lift_tone: str  # good | bad | "" (no estimate)
    interval: str
    p_value: str
    # "always-valid" normally; "fixed-horizon" when the test has no always-valid p-value
    # (quantile guardrails), so people know the number is only valid at a planned look.
    p_kind: str
    status: Tone
    summary: str
    margin_text: str
    # Why the row shows no numbers (analysis.reporting), or "".
    not_enough_data: str = ""
    # How per-unit metrics were compared (analysis.cohorts), or "" for proxy metrics.
    construction: str = ""
    # The test behind a guardrail ("" for other metrics).
    method: str = ""


def metric_lines(rows: Sequence[Mapping[str, Any]], view: ExperimentView) -> list[MetricLine]:
    catalogue = {use.metric.key: use.metric for use in view.metrics}
    lines = []
    for row in rows:
        metric = catalogue.get(str(row.get("metric", "")))
        kind = str(row.get("kind", metric.kind if metric else ""))
        rel = row.get("rel_effect")
        lower_is_better = row.get("direction", metric.direction if metric else "") == "lower"
        lift_tone = ""
        if isinstance(rel, int | float) and abs(rel) >= 0.0005:
            lift_tone = "bad" if (rel > 0) == lower_is_better else "good"
        margin = row.get("margin")
        margin_text = ""
        if row.get("role") == "guardrail" and isinstance(margin, int | float):
            verb = "rise" if lower_is_better else "fall"
            margin_text = (
                f"may {verb} at most {_pct(margin, digits=0)}" if margin > 0 else f"may not {verb}"
            )
        lines.append(
            MetricLine(
                name=str(row.get("name", row.get("metric", ""))),
                role=str(row.get("role", "")),
                arm=str(row.get("arm", "")),
                control_arm=str(row.get("control_arm", "")),
                control=format_value(row.get("control_estimate"), metric, kind),
                treatment=format_value(row.get("treatment_estimate"), metric, kind),
                n_control=row.get("n_control"),
                n_treatment=row.get("n_treatment"),
                users=f"{row.get('n_treatment') or 0:,} vs {row.get('n_control') or 0:,} users",
                lift=_pct(rel, signed=True) if isinstance(rel, int | float) else "—",
                lift_tone=lift_tone,
                interval=format_interval(row.get("ci_always_valid")),
                p_value=format_p(
                    row.get("p_always_valid")
                    if row.get("p_always_valid") is not None
                    else row.get("p_value")
                ),
                p_kind="always-valid"
                if row.get("p_always_valid") is not None
                else ("fixed-horizon" if row.get("p_value") is not None else ""),
                status=tone_for(METRIC_STATUSES, str(row.get("status", ""))),
                summary=str(row.get("summary", "")),
                margin_text=margin_text,
                not_enough_data=str(row.get("not_enough_data") or ""),
                construction=_construction_text(row.get("construction")),
                method=str(row.get("method") or ""),
            )
        )
    return lines


def _construction_text(construction: Any) -> str:
    """“stratified by ramp step, 3 cohorts” or “pooled”, from a row's `construction`."""
    if not isinstance(construction, Mapping):
        return ""
    if construction.get("method") == "stratified_by_ramp_step":
        used = construction.get("cohorts_used") or 0
        return f"stratified by ramp step, {used} cohort{'s' if used != 1 else ''} compared"
    return "pooled (never ramped)"


@dataclass(frozen=True)
class HealthWarning:
    title: str
    text: str


def label_warnings(health: Mapping[str, Any]) -> list[HealthWarning]:
    """Label-balance and label-delay warnings of quality guardrails (``analysis.label_health``)."""
    labels = health.get("labels") or {}
    found = []
    balance = labels.get("balance") or {}
    if balance.get("flagged"):
        shares = ", ".join(
            f"{arm} {_pct(entry.get('labelled_share'))}"
            for arm, entry in (labels.get("arms") or {}).items()
        )
        found.append(
            HealthWarning(
                "Arms get labels at different rates",
                f"Labelled share of predictions: {shares} (p = {format_p(balance.get('p'))}). "
                "Quality metrics compare labelled predictions only, so the comparison may be "
                "biased; check how labels are collected for each version.",
            )
        )
    delay = labels.get("delay") or {}
    if delay.get("flagged"):
        early = ", ".join(
            f"{arm} {_pct(share)}" for arm, share in (delay.get("early_shares") or {}).items()
        )
        found.append(
            HealthWarning(
                "Arms get labels at different speeds",
                f"Labels within half the window: {early} (p = {format_p(delay.get('p'))}). "
                "Late labels may be missed by the window, so the comparison may be biased.",
            )
        )
    return found


def health_warnings(health: Mapping[str, Any], status: str) -> list[HealthWarning]:
    found = []
    srm = health.get("srm") or {}
    if srm.get("flagged"):
        found.append(
            HealthWarning(
                "Sample ratio mismatch",
                f"The split of users between versions is not the configured one "
                f"(anytime-valid e-value {_e_value(srm.get('e_value'))}; chi-square "
                f"p = {format_p(srm.get('p'))}). Something drops or duplicates users on one "
                "arm (bots, caching, errors before exposure); results may be biased.",
            )
        )
    multiple = health.get("multiple_exposure") or {}
    if multiple.get("flagged"):
        found.append(
            HealthWarning(
                "Users saw more than one version",
                f"{_pct(multiple.get('share'))} of users ({multiple.get('units', 0)}) were "
                "served two versions, for example after a weight change; they are left out "
                "of the analysis.",
            )
        )
    found.extend(label_warnings(health))
    if health.get("no_traffic") and status in LIVE_STATUSES:
        found.append(
            HealthWarning(
                "No traffic",
                "A version receives no requests. Check that clients send the unit "
                "attribute and that the edge can reach the upstream.",
            )
        )
    return found


@dataclass(frozen=True)
class ArmLine:
    key: str
    is_control: bool
    css: str
    expected: str
    units: int
    units_text: str
    units_share: str
    requests: str
    p50: str
    p95: str
    p99: str
    error_rate: str


def expected_split(view: ExperimentView) -> dict[str, float]:
    """The split routing aims for now (see routing.snapshot: canaries by their weights)."""
    routed = view.routed_variants
    if view.status == "rolled_back":
        return {v.key: 1.0 if v.is_control else 0.0 for v in routed}
    if view.status == "completed" and view.winner_key:
        return {v.key: 1.0 if v.key == view.winner_key else 0.0 for v in routed}
    share = view.canary_share
    if share is None:
        return {v.key: v.weight for v in routed}
    canaries = [v for v in routed if not v.is_control]
    total = sum(v.weight for v in canaries)
    return {
        v.key: (1.0 - share)
        if v.is_control
        else share * (v.weight / total if total > 0 else 1.0 / len(canaries))
        for v in routed
    }


def _ms(value: Any) -> str:
    return "—" if value is None else (f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms")


def arm_lines(
    view: ExperimentView, exposures: Mapping[str, int], latency: Mapping[str, Any]
) -> list[ArmLine]:
    expected = expected_split(view)
    total = sum(exposures.get(v.key, 0) for v in view.routed_variants)
    lines = []
    for index, variant in enumerate(view.routed_variants):
        units = int(exposures.get(variant.key, 0))
        stats = latency.get(variant.key) or {}
        error_rate = stats.get("error_rate")
        lines.append(
            ArmLine(
                key=variant.key,
                is_control=variant.is_control,
                css=f"arm-{index % 6}",
                expected=_pct(expected.get(variant.key, 0.0)),
                units=units,
                units_text=f"{units:,}",
                units_share=_pct(units / total) if total else "—",
                requests=f"{stats['n']:,}" if stats.get("n") is not None else "—",
                p50=_ms(stats.get("p50")),
                p95=_ms(stats.get("p95")),
                p99=_ms(stats.get("p99")),
                error_rate=_pct(error_rate, digits=2) if error_rate is not None else "—",
            )
        )
    return lines


def _series_key(row: Mapping[str, Any]) -> str:
    return f"{row.get('metric')}:{row.get('arm')}"


def chart_series(view: ExperimentView, history: Sequence[ResultSnapshot]) -> dict[str, Any]:
    times = [s.created_at.isoformat() for s in history]
    arms = [v.key for v in view.routed_variants]
    lift: dict[str, dict[str, Any]] = {}
    for index, snapshot in enumerate(history):
        for row in snapshot.metrics or []:
            series = lift.get(_series_key(row))
            if series is None:
                lower_is_better = row.get("direction") == "lower"
                margin = row.get("margin") or 0.0
                series = {
                    "metric": row.get("metric"),
                    "name": row.get("name"),
                    "arm": row.get("arm"),
                    "control_arm": row.get("control_arm"),
                    "role": row.get("role"),
                    "direction": row.get("direction"),
                    # The harm threshold in lift terms: a rise of `margin` for a metric where
                    # lower is better, a fall of `margin` where higher is better.
                    "margin": (margin if lower_is_better else -margin)
                    if row.get("role") == "guardrail"
                    else None,
                    "lift": [None] * len(history),
                    "lower": [None] * len(history),
                    "upper": [None] * len(history),
                }
                lift[_series_key(row)] = series
            lower, upper = _bounds(row.get("ci_always_valid"))
            series["lift"][index] = row.get("rel_effect")
            series["lower"][index] = lower
            series["upper"][index] = upper
    latency = {
        arm: {
            quantile: [(s.latency or {}).get(arm, {}).get(quantile) for s in history]
            for quantile in ("p50", "p95", "p99")
        }
        for arm in arms
    }
    return {
        "experiment": view.key,
        "times": times,
        "arms": arms,
        "control": view.control.key,
        "lift": list(lift.values()),
        "latency": latency,
    }


@dataclass(frozen=True)
class AlertLine:
    at: datetime
    kind: str
    destination: str
    status: Tone
    attempts: int
    action: str
    reason: str
    error: str


def destination_name(destination: str, webhook_names: Mapping[int, str]) -> str:
    if destination == "slack":
        return "Slack"
    _, _, ident = destination.partition(":")
    name = webhook_names.get(int(ident)) if ident.isdigit() else None
    return f"Webhook “{name}”" if name else "Webhook (deleted)"


@dataclass(frozen=True)
class LabelLine:
    """Label coverage of one version for the quality guardrails (``analysis.label_health``)."""

    key: str
    predictions: str
    unreadable: str
    labelled_share: str
    waiting: str
    missing: str
    delay: str


def label_lines(health: Mapping[str, Any]) -> list[LabelLine]:
    """One line per version from the snapshot's ``health["labels"]``; [] without one."""
    arms = (health.get("labels") or {}).get("arms") or {}
    lines = []
    for key, entry in arms.items():
        delay = entry.get("mean_label_delay_s")
        lines.append(
            LabelLine(
                key=key,
                predictions=f"{entry.get('predictions', 0):,}",
                unreadable=f"{entry.get('unreadable', 0):,}",
                labelled_share=_pct(entry.get("labelled_share")),
                waiting=f"{entry.get('waiting', 0):,}",
                missing=f"{entry.get('missing', 0):,}",
                delay="—" if delay is None else f"{delay:,.1f} s",
            )
        )
    return lines
