"""Multiple-testing corrections: Benjamini-Hochberg and Holm for reports, Bonferroni for gating.

BH (Benjamini & Hochberg 1995, step-up) controls the false discovery rate across secondary
metrics; Holm (1979, step-down) controls the family-wise error rate. Both return adjusted
p-values in the input order, as `statsmodels.stats.multitest.multipletests` ("fdr_bh",
"holm"). Rollback gating uses the (weighted) Bonferroni split in `bonferroni_alphas`, because
the rule "roll back on the first alarm" gains nothing from Holm (STATS.md 9.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Method = Literal["bh", "holm", "bonferroni"]


def _check_p_values(p_values: Sequence[float]) -> None:
    for value in p_values:
        if not (0 <= value <= 1):
            raise ValueError(f"p-values must lie in [0, 1], got {value!r}")


def benjamini_hochberg(p_values: Sequence[float]) -> tuple[float, ...]:
    """BH adjusted p-values: min over j >= i (in sorted order) of m p_(j) / j, capped at 1."""
    _check_p_values(p_values)
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        index = order[rank - 1]
        running = min(running, m * p_values[index] / rank)
        adjusted[index] = running
    return tuple(adjusted)


def holm(p_values: Sequence[float]) -> tuple[float, ...]:
    """Holm adjusted p-values: max over j <= i (sorted) of (m - j + 1) p_(j), capped at 1."""
    _check_p_values(p_values)
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return tuple(adjusted)


def bonferroni(p_values: Sequence[float]) -> tuple[float, ...]:
    _check_p_values(p_values)
    m = len(p_values)
    return tuple(min(1.0, m * value) for value in p_values)


@dataclass(frozen=True, slots=True)
class AdjustedPValues:
    """Adjusted p-values and the rejections at level alpha, in the input order."""

    method: Method
    alpha: float
    p_values: tuple[float, ...]
    adjusted: tuple[float, ...]
    rejected: tuple[bool, ...]


def adjust_p_values(
    p_values: Sequence[float], *, method: Method = "bh", alpha: float = 0.05
) -> AdjustedPValues:
    """Correct a family of p-values (e.g. the secondary metrics of one report)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if method == "bh":
        adjusted = benjamini_hochberg(p_values)
    elif method == "holm":
        adjusted = holm(p_values)
    elif method == "bonferroni":
        adjusted = bonferroni(p_values)
    else:
        raise ValueError(f"method must be 'bh', 'holm' or 'bonferroni', got {method!r}")
    return AdjustedPValues(
        method=method,
        alpha=alpha,
        p_values=tuple(float(p) for p in p_values),
        adjusted=adjusted,
        rejected=_rejected(p_values, method, alpha),
    )


def _rejected(p_values: Sequence[float], method: Method, alpha: float) -> tuple[bool, ...]:
    """Each procedure's own rule on the raw p-values (as statsmodels decides).

    Not "adjusted <= alpha": that is the same rule in exact arithmetic, but m * p rounds, so
    p = alpha / m exactly (0.025 of two tests at 0.05) came out just above alpha.
    Bonferroni: p_i <= alpha / m. Holm (step-down): the sorted p_(k) are rejected until the
    first with p_(k) > alpha / (m - k + 1). BH (step-up): every p_(k) up to the largest k
    with p_(k) <= (k / m) alpha.
    """
    m = len(p_values)
    if method == "bonferroni":
        return tuple(p <= alpha / m for p in p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    rejected = [False] * m
    if method == "holm":
        for rank, index in enumerate(order):
            if p_values[index] > alpha / (m - rank):
                break
            rejected[index] = True
        return tuple(rejected)
    last = max(
        (rank for rank in range(1, m + 1) if p_values[order[rank - 1]] <= rank / m * alpha),
        default=0,
    )
    for index in order[:last]:
        rejected[index] = True
    return tuple(rejected)


def bonferroni_alphas(weights: Sequence[float], *, alpha: float) -> tuple[float, ...]:
    """Weighted Bonferroni split: alpha_k = alpha * w_k / sum(w) (STATS.md 9.2).

    The levels sum to alpha, so the chance that any of the tests rejects falsely is at most
    alpha under any dependence (union bound).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not weights:
        raise ValueError("weights must not be empty")
    for weight in weights:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weights must be positive, got {weight!r}")
    total = math.fsum(weights)
    return tuple(alpha * weight / total for weight in weights)
