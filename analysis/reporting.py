"""What a result row may show: "not enough data" below the report's minimum units per arm.

A row whose arms have fewer than `MIN_REPORT_UNITS_PER_ARM` units (100, the same minimum as
`analysis.stats.report.analyze_metric` and the guardrails' burn-in) shows no estimate, effect,
interval or p-value: its numbers are null, its status is "insufficient", and
`not_enough_data` says why ("v2 has 37 of the 100 units per arm a report needs"). Tiny samples
give intervals of thousands of percent, which read like results and are not. A guardrail that
has already fired keeps its evidence: a rollback is always shown with the numbers behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analysis.stats.report import MIN_REPORT_UNITS_PER_ARM

_WITHHELD = (
    "control_estimate",
    "treatment_estimate",
    "abs_effect",
    "rel_effect",
    "p_value",
    "p_always_valid",
    "harm_bound",
)


def not_enough_data_reason(row: dict[str, Any], minimum: int) -> str | None:
    """Why the row cannot be shown, or None when both arms have `minimum` units."""
    counts = (
        (str(row.get("control_arm", "control")), int(row.get("n_control") or 0)),
        (str(row.get("arm", "treatment")), int(row.get("n_treatment") or 0)),
    )
    short = [(arm, n) for arm, n in counts if n < minimum]
    if not short:
        return None
    return " and ".join(f"{arm} has {n:,}" for arm, n in short) + (
        f" of the {minimum:,} units per arm a report needs"
    )


def withhold_small_samples(
    rows: Sequence[dict[str, Any]], *, minimum: int = MIN_REPORT_UNITS_PER_ARM
) -> None:
    """Replace the numbers of rows below `minimum` units per arm by the reason (in place)."""
    for row in rows:
        reason = None if row.get("status") == "breach" else not_enough_data_reason(row, minimum)
        row["not_enough_data"] = reason
        if reason is None:
            continue
        for name in _WITHHELD:
            row[name] = None
        row["ci_fixed"] = [None, None]
        row["ci_always_valid"] = [None, None]
        row["status"] = "insufficient"
        row["summary"] = f"{row.get('name', row.get('metric', ''))} on {row.get('arm', '')}: " + (
            f"not enough data ({reason})"
        )
