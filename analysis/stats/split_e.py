"""Exact conditional e-values that two samples of counts come from one distribution.

For a reference x and a window y over the same cells, and a split of the cells into a part A
and the rest, the 2 x 2 table (x_A, n_x - x_A; y_A, n_y - y_A) is tested conditionally on its
margins. Under H0 (x and y i.i.d. draws of one distribution, or only exchangeable), given the
pooled count s = x_A + y_A and n_x, x_A is hypergeometric(N = n_x + n_y, s, n_x), whatever
the distribution: no unknown parameter is left (Fisher's exact test; Lehmann & Romano 2005,
"Testing Statistical Hypotheses", 3rd ed., section 4.5). Under an alternative with odds ratio
psi, x_A is Fisher's noncentral hypergeometric, pmf proportional to the central one times
psi^x_A (Fog 2008, "Calculation methods for Wallenius' noncentral hypergeometric
distribution", Commun. Stat. Simul. Comput., eq. 2 for Fisher's). So with theta = ln psi

    E_theta = psi^x_A / E_H0[psi^X] = exp(theta x_A - ln M(theta)),

M the hypergeometric's moment generating function, has E_H0[E_theta | margins] = 1; so does
its mixture over a prior on theta (a fixed grid, `THETAS`, normal weights of sd `PRIOR_SD`),
and so does the mean over several splits (Vovk & Wang 2021, "E-values: calibration,
combination and applications", Ann. Stat., section 4), provided each split is a function of
the pooled counts x + y only (then it is the same whichever items went to x): the splits here
are the pooled quantiles of a number and the pooled most frequent categories.

The e-value is exact at every sample size and pays no price for the unknown distribution
(unlike a Dirichlet-multinomial universal-inference e-value, which pays about (G - 1)/2 ln n
on each side). It is for one look at fixed samples, not an e-process over growing ones.

Pure: numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import gammaln, logsumexp

# Log odds ratios of the mixture and their prior weights (normal, sd PRIOR_SD, renormalised).
PRIOR_SD = 1.0
THETAS = np.linspace(-4.0, 4.0, 41)
_LOG_WEIGHTS = -0.5 * (THETAS / PRIOR_SD) ** 2
_LOG_WEIGHTS = _LOG_WEIGHTS - logsumexp(_LOG_WEIGHTS)
# Numbers: the pooled quantiles split at; categories: the most frequent pooled categories.
QUANTILES = (0.2, 0.5, 0.8)
TOP = 3


def _log_choose(n: float, k: NDArray[Any]) -> NDArray[np.float64]:
    return np.asarray(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1), dtype=float)


def split_log_e(x_a: int, n_x: int, s: int, total: int) -> float:
    """ln of the theta-mixture e-value of one 2 x 2 table: x_a of the reference's n_x in part
    A, s of all `total` observations (reference and window) in part A."""
    low, high = max(0, n_x - (total - s)), min(s, n_x)
    if high <= low:
        return 0.0  # the margins fix the table: no evidence either way
    support = np.arange(low, high + 1, dtype=float)
    log_pmf = _log_choose(s, support) + _log_choose(total - s, n_x - support)
    log_pmf = log_pmf - logsumexp(log_pmf)
    # ln M(theta) for every theta on the grid: logsumexp over the support of pmf e^(theta t).
    log_mgf = logsumexp(log_pmf[None, :] + THETAS[:, None] * support[None, :], axis=1)
    return float(logsumexp(_LOG_WEIGHTS + THETAS * x_a - log_mgf))


def splits(
    pooled: Mapping[str, float], *, ordered: Sequence[str] | None, special: Sequence[str] = ()
) -> list[frozenset[str]]:
    """Parts A, from the pooled counts only: a number's cells below each pooled quantile in
    QUANTILES and its `special` (non-number) cells; a category's TOP most frequent values."""
    if ordered is None:
        top = sorted(pooled, key=lambda c: (-pooled[c], c))[:TOP]
        return [frozenset([cell]) for cell in top]
    numeric = [cell for cell in ordered if cell not in special]
    total = sum(pooled.get(cell, 0.0) for cell in numeric)
    parts: list[frozenset[str]] = []
    for quantile in QUANTILES:
        below: list[str] = []
        running = 0.0
        for cell in numeric:
            if running + pooled.get(cell, 0.0) > quantile * total and below:
                break
            below.append(cell)
            running += pooled.get(cell, 0.0)
        parts.append(frozenset(below))
    parts.append(frozenset(special))
    return parts


def window_log_e(
    reference: Mapping[str, float],
    window: Mapping[str, float],
    *,
    ordered: Sequence[str] | None,
    special: Sequence[str] = (),
) -> float:
    """ln of the mean over `splits` of `split_log_e`: the window against the reference."""
    n_x = round(sum(reference.values()))
    n_y = round(sum(window.values()))
    if n_x == 0 or n_y == 0:
        return 0.0
    pooled = dict(reference)
    for cell, n in window.items():
        pooled[cell] = pooled.get(cell, 0.0) + n
    logs = []
    for part in dict.fromkeys(splits(pooled, ordered=ordered, special=special)):
        x_a = round(sum(reference.get(cell, 0.0) for cell in part))
        s = round(sum(pooled.get(cell, 0.0) for cell in part))
        logs.append(split_log_e(x_a, n_x, s, n_x + n_y))
    return float(logsumexp(logs) - math.log(len(logs))) if logs else 0.0
