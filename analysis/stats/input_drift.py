"""Input drift over time: PSI of a window of users against a reference, and a valid test.

Distance
    The population stability index PSI = sum (r - q) ln(r / q) of the window's shares r
    against the reference's q (`analysis.stats.prediction_drift.psi`; Yurdakul 2018,
    "Statistical properties of population stability index"; rule of thumb: below 0.1 stable,
    0.1-0.25 moderate, above 0.25 a shift). Fine cells are merged into at most
    `GROUPS` groups first (`merge_groups`): consecutive bins of a number with about equal
    reference mass, the reference's most frequent categories (the rest as one group), so the
    index does not grow with the number of empty or rare cells.

The user as the unit, window by window
    A user's requests are not independent draws: real users are sticky and repeat their
    inputs, and heavy users send most requests. With requests as draws, a stationary
    population of such users makes any test of homogeneity reject without drift. So the proxy
    counts at most one sampled request per user and window (windows of one length,
    `experiments.input_windows`); the users of the reference and of the monitoring are
    disjoint halves by a hash of the user (so the reference x and every window y_k are
    independent), and each reference user counts in one reference window only (picked by its
    hash), so x has the law of one window: "the input of a user active in a window of this
    length". H0: x and each y_k are i.i.d. draws of that one distribution.

    Each closed window k = 1, 2, ... is tested once with an exact conditional e-value E_k of
    y_k against x (`analysis.stats.split_e.window_log_e`: Fisher-type 2 x 2 tables of pooled
    quantile or top-category splits, E[E_k] <= 1 under H0 at any sample size). The same users
    return in later windows, so the E_k are dependent and their product is no e-process; a
    union bound with weights w_k = 1 / (k (k + 1)), summing to 1, is valid under any
    dependence: P(exists k: E_k >= 1 / (w_k alpha)) <= sum_k w_k alpha E[E_k] <= alpha
    (Markov's inequality per window; Vovk & Wang 2021, "E-values: calibration, combination and
    applications", Ann. Stat., section 2). A window is looked at only once it has closed:
    within a window heavy users arrive first, so its partial counts have another law than a
    whole window's. Seeded simulations of whole experiments: `bench.input_drift_sticky`.

The Dirichlet-multinomial e-value of homogeneity (`homogeneity_log_e`)
    E = DM(x; a) DM(y; a) / sup_q L(q; x + y), DM the Dirichlet-multinomial marginal
    likelihood of an ordered sequence with the Krichevsky-Trofimov prior a_i = 1/2 (Lindon &
    Malek 2022, "Anytime-valid inference for multinomial count data", NeurIPS, eq. 5),
    bounded by a mixture likelihood ratio against the true q (universal inference, Wasserman,
    Ramdas & Balakrishnan 2020, PNAS, section 7): the test of requests since the reference
    used before, kept for the simulation's contrast. It pays about (G - 1)/2 ln n on each side
    for the unknown q, so one window of a thousand users rarely reaches 1/alpha.

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
from analysis.stats.split_e import window_log_e

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
    """One field in one window: its distance from the reference and the window's test."""

    psi: float | None
    log_e: float
    recent_n: int
    reference_n: int


def field_drift(
    reference: Mapping[str, float],
    window: Mapping[str, float],
    *,
    ordered: Sequence[str] | None,
) -> FieldDrift:
    """PSI of `window` against `reference` (merged groups) and the window's e-value."""
    mapping = merge_groups(reference, ordered=ordered)
    size = max(mapping.values(), default=0) + 1
    ref = grouped(reference, mapping, size)
    now = grouped(window, mapping, size)
    distance = psi(shares(now), shares(ref)) if now.sum() > 0 and ref.sum() > 0 else None
    log_e = window_log_e(
        reference, window, ordered=ordered, special=SPECIAL_CELLS if ordered is not None else ()
    )
    return FieldDrift(
        psi=distance, log_e=log_e, recent_n=int(now.sum()), reference_n=int(ref.sum())
    )


def window_weight(window: int) -> float:
    """w_k = 1 / (k (k + 1)) of the k-th window after the reference (k >= 1; they sum to 1)."""
    if window < 1:
        raise ValueError("windows are numbered from 1")
    return 1.0 / (window * (window + 1.0))


def window_log_threshold(window: int, alpha: float) -> float:
    """ln(1 / (w_k alpha)): the e-value of window k that rejects, alpha spent over windows."""
    return math.log(1.0 / (window_weight(window) * alpha))


def flagged(drift: FieldDrift, *, threshold: float, alpha: float, window: int) -> bool:
    """Drift beyond the threshold (PSI) and confirmed by window k's test, E_k >= 1/(w_k alpha)."""
    return (
        drift.psi is not None
        and drift.psi > threshold
        and drift.log_e >= window_log_threshold(window, alpha)
    )
