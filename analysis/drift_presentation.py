"""The experiment page's drift panels (predictions between arms, inputs over time)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class DriftCell:
    share: str
    width: int


@dataclass(frozen=True)
class DriftLine:
    key: str
    users: str
    cells: list[DriftCell]
    tv: str
    psi: str
    p: str
    status: str
    flagged: bool


@dataclass(frozen=True)
class DriftPanel:
    categories: list[str]
    lines: list[DriftLine]
    tolerance: str
    action: str
    calibrating: bool


def _label(text: str) -> str:
    """A class's JSON text shown as the value ("cat" for '"cat"')."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def _number(value: Any, digits: str = ".3f") -> str:
    return "—" if not isinstance(value, int | float) else format(value, digits)


def drift_panel(health: Mapping[str, Any]) -> DriftPanel | None:
    """The panel, or None when the experiment has no prediction-drift check."""
    report = health.get("prediction_drift")
    if not report:
        return None
    lines = []
    for key, entry in (report.get("arms") or {}).items():
        shares = entry.get("shares") or []
        is_control = key == report.get("control")
        flagged = bool(entry.get("flagged"))
        if is_control:
            status = "control"
        elif flagged:
            status = "drift beyond tolerance"
        else:
            status = "within tolerance so far"
        lines.append(
            DriftLine(
                key=key,
                users=f"{entry.get('users', 0):,}",
                cells=[DriftCell(f"{s:.1%}", round(100 * s)) for s in shares],
                tv=_number(entry.get("tv")),
                psi=_number(entry.get("psi")),
                p=_number(entry.get("p"), ".2g"),
                status=status,
                flagged=flagged,
            )
        )
    return DriftPanel(
        categories=[_label(c) for c in report.get("categories") or []],
        lines=lines,
        tolerance=f"{float(report.get('tolerance', 0.0)):g}",
        action=str(report.get("action", "")),
        calibrating=bool(report.get("calibrating")),
    )


@dataclass(frozen=True)
class InputLine:
    path: str
    kind: str
    psi: str
    threshold: str
    p: str
    recent_n: str
    status: str
    flagged: bool
    # An SVG polyline of the PSI over the last runs, scaled to 0..CHART_H, and the
    # threshold's height, for the sparkline with the threshold marked.
    points: str
    threshold_y: float


@dataclass(frozen=True)
class InputPanel:
    lines: list[InputLine]
    action: str
    reference: str
    window_min: str


CHART_W = 160.0
CHART_H = 40.0


def _sparkline(values: list[float | None], threshold: float) -> tuple[str, float]:
    top = max([threshold * 1.5, *(v for v in values if v is not None)])
    step = CHART_W / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{CHART_H - CHART_H * v / top:.1f}"
        for i, v in enumerate(values)
        if v is not None
    )
    return points, round(CHART_H - CHART_H * threshold / top, 1)


def input_panel(
    health: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> InputPanel | None:
    """The input-drift card: per field the latest PSI, the test, and the PSI over the runs in
    `history` (snapshots' health, oldest first) with the threshold; None when it is off."""
    report = health.get("input_drift")
    if not report:
        return None
    lines = []
    for entry in report.get("fields") or []:
        path = entry["path"]
        series: list[float | None] = []
        for past in history:
            found = next(
                (
                    f
                    for f in (past.get("input_drift") or {}).get("fields") or []
                    if f["path"] == path
                ),
                None,
            )
            series.append(None if found is None else found.get("psi"))
        points, threshold_y = _sparkline(series, float(entry["threshold"]))
        if report.get("collecting_reference"):
            status = "collecting the reference"
        elif entry.get("flagged"):
            status = "drifting beyond the threshold"
        else:
            status = "within the threshold"
        lines.append(
            InputLine(
                path=path,
                kind=entry["kind"],
                psi=_number(entry.get("psi")),
                threshold=f"{entry['threshold']:g}",
                p=_number(entry.get("p"), ".2g"),
                recent_n=f"{entry.get('recent_n', 0):,}",
                status=status,
                flagged=bool(entry.get("flagged")),
                points=points,
                threshold_y=threshold_y,
            )
        )
    reference = report.get("reference")
    if reference == "training":
        described = "the uploaded training distribution"
    else:
        described = "a pinned window of the experiment's traffic"
    return InputPanel(
        lines=lines,
        action=str(report.get("action", "")),
        reference=described,
        window_min=f"{float(report.get('window_s', 0)) / 60:g}",
    )
