"""Input drift over time: PSI of recent inputs against a reference, and an anytime-valid test.

Distance
    The population stability index PSI = sum (r - q) ln(r / q) of the recent window's shares r
    against the reference's q (`analysis.stats.prediction_drift.psi`; Yurdakul 2018,
    "Statistical properties of population stability index"; rule of thumb: below 0.1 stable,
    0.1-0.25 moderate, above 0.25 a shift). Fine cells are merged into at most
    `GROUPS` groups first (`merge_groups`): consecutive bins of a number with about equal
    reference mass, the reference's most frequent categories (the rest as one group), so the
    index does not grow with the number of empty or rare cells.

Test (anytime-valid, composite null of homogeneity)
    H0: the reference's observations and every later one are i.i.d. draws of one distribution
    q over the cells (unknown). The e-process, for counts x (reference) and y_t (observations
    since the reference, t growing), is

        E_t = DM(x; a) DM(y_t; a) / sup_q L(q; x + y_t),

    DM the Dirichlet-multinomial marginal likelihood of an ordered sequence with the
    Krichevsky-Trofimov prior a_i = 1/2 (Lindon & Malek 2022, "Anytime-valid inference for
    multinomial count data", NeurIPS, eq. 5; the e-value of the SRM check, STATS.md 7.2), and
    L(q; n) = prod q_i^n_i. The numerator is a mixture over two distributions (one before, one
    after the reference ends); the denominator's supremum is at least the likelihood at the
    true q, so E_t is at most that mixture's likelihood ratio against the true q: a test
    martingale over the whole sequence (Wasserman, Ramdas & Balakrishnan 2020, "Universal
    inference", PNAS, section 7 on mixtures over a maximised null; the construction of
    `analysis.stats.label_balance`). By Ville's inequality P(sup_t E_t >= 1/alpha) <= alpha.
    It assumes independent observations: one request per draw. A client that repeats the
    same input inflates it, which the PSI threshold (an effect size) tempers; see the README.

Pure: numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import gammaln, xlogy

from analysis.stats.prediction_drift import psi, shares

GROUPS = 10
PRIOR = 0.5
# Cells of a number field that are not numbers (routing.proxy.inputs), each its own group.
SPECIAL_CELLS = ("(missing)", "(wrong_type)", "(not_json)", "(other)")


def dm_log_marginal(counts: ArrayLike, *, prior: float = PRIOR) -> float:
    """log DM(n; a): the Dirichlet(a)-mixture likelihood of an ordered sequence with counts n."""
    n = np.asarray(counts, dtype=float)
    a = np.full(n.size, prior)
    return float(
        gammaln(a.sum()) - gammaln(a.sum() + n.sum()) + (gammaln(a + n) - gammaln(a)).sum()
    )


def max_log_likelihood(counts: ArrayLike) -> float:
    """sup_q log prod q_i^n_i = sum n_i log(n_i / n)."""
    n = np.asarray(counts, dtype=float)
    total = n.sum()
    return float(xlogy(n, n).sum() - xlogy(total, total))


def homogeneity_log_e(reference: ArrayLike, recent: ArrayLike, *, prior: float = PRIOR) -> float:
    """log E of "the observations after the reference come from the reference's distribution"."""
    x = np.asarray(reference, dtype=float)
    y = np.asarray(recent, dtype=float)
    return (
        dm_log_marginal(x, prior=prior)
        + dm_log_marginal(y, prior=prior)
        - max_log_likelihood(x + y)
    )


def merge_groups(
    reference: Mapping[str, float], *, ordered: Sequence[str] | None, groups: int = GROUPS
) -> dict[str, int]:
    """Cell -> group. `ordered`: the cells of a number in order (groups of about equal
    reference mass); None: categories (the `groups - 1` most frequent each alone, the rest
    together). Cells the reference lacks join their neighbour (numbers) or the rest; the
    mapping depends only on the reference, so it is fixed before any later observation."""
    if ordered is None:
        top = sorted(reference, key=lambda c: (-reference[c], c))[: groups - 1]
        mapping = {cell: index for index, cell in enumerate(top)}
        return mapping | {"": len(top)}  # "" stands for every other cell
    mapping = {}
    before = 0.0
    numeric = sum(reference.get(cell, 0.0) for cell in ordered if cell not in SPECIAL_CELLS)
    for cell in ordered:
        if cell in SPECIAL_CELLS:
            continue
        share = before / numeric if numeric > 0 else 0.0
        mapping[cell] = min(int(share * groups), groups - 1)
        before += reference.get(cell, 0.0)
    # Values that are not numbers keep groups of their own (a surge of missing values shows).
    mapping.update({cell: groups + index for index, cell in enumerate(SPECIAL_CELLS)})
    return mapping


def grouped(
    counts: Mapping[str, float], mapping: Mapping[str, int], size: int
) -> NDArray[np.float64]:
    """Counts summed into their groups (cells outside `mapping` go to group "" if present)."""
    out = np.zeros(size)
    rest = mapping.get("")
    for cell, n in counts.items():
        index = mapping.get(cell, rest)
        if index is not None:
            out[index] += n
    return out


@dataclass(frozen=True, slots=True)
class FieldDrift:
    """One field at one look: the distance of the recent window and the test since the reference."""

    psi: float | None
    log_e: float
    recent_n: int
    reference_n: int
    since_n: int


def field_drift(
    reference: Mapping[str, float],
    recent: Mapping[str, float],
    since: Mapping[str, float],
    *,
    ordered: Sequence[str] | None,
) -> FieldDrift:
    """PSI of `recent` against `reference` and the e-value of everything `since` the reference."""
    mapping = merge_groups(reference, ordered=ordered)
    size = max(mapping.values(), default=0) + 1
    ref = grouped(reference, mapping, size)
    now = grouped(recent, mapping, size)
    after = grouped(since, mapping, size)
    distance = psi(shares(now), shares(ref)) if now.sum() > 0 and ref.sum() > 0 else None
    log_e = homogeneity_log_e(ref, after) if ref.sum() > 0 and after.sum() > 0 else 0.0
    return FieldDrift(
        psi=distance,
        log_e=log_e,
        recent_n=int(now.sum()),
        reference_n=int(ref.sum()),
        since_n=int(after.sum()),
    )


def flagged(drift: FieldDrift, *, threshold: float, alpha: float) -> bool:
    """Drift beyond the threshold (PSI of the recent window) and confirmed by the test."""
    return drift.psi is not None and drift.psi > threshold and drift.log_e >= math.log(1 / alpha)
