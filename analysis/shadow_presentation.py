"""The experiment page's shadow verdicts: one line per shadow, with its intervals in words."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from analysis.presentation import Tone, tone_for
from analysis.shadow_verdicts import shadow_analyses_list, tolerances
from experiments.contracts import ExperimentView

VERDICTS = {
    "ready": ("good", "✓", "Ready to canary"),
    "worse": ("bad", "✕", "Worse than control"),
    "collecting": ("neutral", "…", "Collecting"),
}


@dataclass(frozen=True)
class ShadowLine:
    key: str
    verdict: Tone
    reason: str
    pairs: str
    disagreement: str
    latency: str
    latency_ms: str
    p95: str
    abs_diff: str
    requests: str
    ready: bool
    # Per quality metric, paired on the same requests' labels: "Accuracy −0.5% (…), 600 users".
    quality: tuple[str, ...] = ()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _percent_interval(interval: Mapping[str, Any] | None, *, shift: float = 0.0) -> str:
    """``estimate (lower to upper)`` in percent, shifted (ratios: shift = -1 gives change)."""
    if not interval:
        return "–"
    estimate = _number(interval.get("estimate"))
    lower = _number(interval.get("lower"))
    upper = _number(interval.get("upper"))
    if estimate is None:
        return "–"

    def show(value: float | None, sign: bool) -> str:
        if value is None:
            return "∞"
        share = (value + shift) * 100
        return f"{share:+.1f}%" if sign else f"{share:.1f}%"

    signed = shift != 0.0
    return f"{show(estimate, signed)} ({show(lower, signed)} to {show(upper, signed)})"


def _ratio_interval(interval: Mapping[str, Any] | None) -> str:
    """``estimate× (lower× to upper×)``: the paired p95 latency ratio."""
    if not interval or _number(interval.get("estimate")) is None:
        return "–"
    lower, upper = _number(interval.get("lower")), _number(interval.get("upper"))
    low = "0" if lower is None else f"{lower:.2f}×"
    high = "∞" if upper is None else f"{upper:.2f}×"
    return f"{float(interval['estimate']):.2f}× ({low} to {high})"


def _ms_interval(interval: Mapping[str, Any] | None) -> str:
    if not interval or _number(interval.get("estimate")) is None:
        return "–"
    lower, upper = _number(interval.get("lower")), _number(interval.get("upper"))
    low = "−∞" if lower is None else f"{lower:+.2f}"
    high = "∞" if upper is None else f"{upper:+.2f}"
    return f"{float(interval['estimate']):+.2f} ms ({low} to {high})"


def shadow_lines(view: ExperimentView) -> list[ShadowLine]:
    """The shadows' verdicts and latest intervals, for ``templates/analysis/_shadows.html``."""
    lines = []
    for row in shadow_analyses_list(experiment_id=view.id):
        latest: Mapping[str, Any] = row["latest"] or {}
        requests = latest.get("requests") or {}
        compared = int(requests.get("compared", 0))
        differing = int(requests.get("disagreements", 0))
        lines.append(
            ShadowLine(
                key=row["variant"],
                verdict=tone_for(VERDICTS, row["verdict"]),
                reason=row["reason"] or str(latest.get("reason", "")),
                pairs=f"{int(latest.get('pairs', 0)):,}",
                disagreement=_percent_interval(latest.get("disagreement")),
                latency=_percent_interval(latest.get("latency_ratio"), shift=-1.0),
                latency_ms=_ms_interval(latest.get("latency_difference_ms")),
                p95=_ratio_interval(latest.get("p95_pair_ratio")),
                abs_diff=_ms_free(latest.get("abs_diff")),
                requests=f"{differing:,} of {compared:,} requests differed" if compared else "",
                ready=row["verdict"] == "ready",
                quality=tuple(
                    f"{q['name']} {_percent_interval(q['ratio'], shift=-1.0)} on "
                    f"{int(q['pairs']):,} users' labels"
                    for q in latest.get("quality") or []
                ),
            )
        )
    return lines


def _ms_free(interval: Mapping[str, Any] | None) -> str:
    """A numeric field's mean absolute difference with its interval (in the field's units)."""
    if not interval or _number(interval.get("estimate")) is None:
        return ""
    upper = _number(interval.get("upper"))
    high = "∞" if upper is None else f"{upper:.4g}"
    return f"{float(interval['estimate']):.4g} ({float(interval['lower']):.4g} to {high})"


def tolerance_text() -> str:
    limits = tolerances()
    return (
        f"Ready to canary when, with confidence, the answers differ on less than "
        f"{limits.disagreement:.0%} of users' requests, mean latency rises by less than "
        f"{limits.latency_increase:.0%} and the paired p95 latency ratio (per request, "
        f"shadow / control) is below {1.0 + limits.p95_increase:.2f}; "
        f"at least {limits.min_pairs:,} users' pairs first."
    )
