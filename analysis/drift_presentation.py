"""The experiment page's prediction-drift panel, from the snapshot's health entry."""

from __future__ import annotations

from collections.abc import Mapping
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
