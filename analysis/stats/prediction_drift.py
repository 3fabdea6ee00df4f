"""Prediction drift between arms: an anytime-valid test that two arms' predictions differ
by more than a tolerated total variation, betting on users with the known assignment share.

The null (composite)
    Each user i contributes one category c_i: the class (or bin, for numbers) of its first
    sampled prediction. At the moment t_i of that prediction the user was in the tested arm
    B with the known probability rho_i (B's share among control and B at t_i, from the ramp
    step; users of other arms are not bet on), independently of the user (sticky hashing).
    Write P_B,t and P_A,t for the distributions of the first prediction of a user arriving at
    t, had it been routed to B or to control A. The tolerated distance is the total
    variation TV(P, Q) = max_S |P(S) - Q(S)| = 1/2 sum_c |p_c - q_c|, and

        H0: TV(P_B,t, P_A,t) <= eps at every t        (eps = the tolerance, in [0, 1/2)).

    Both distributions may drift over time in any way (traffic mix, ramp steps): only their
    distance at the same moment is constrained, so the test is contemporaneous.

The bet (testing by betting with a predictable witness)
    For a witness g: categories -> [0, 1] fixed before user i is seen, the inverse-propensity
    payoff

        phi_i = g(c_i) (1{B} / rho_i - 1{A} / (1 - rho_i))

    has conditional mean E[g | B] - E[g | A] <= TV(P_B,t, P_A,t) <= eps under H0 (the
    assignment share is known exactly; Waudby-Smith, Wu, Ramdas, Karampatziakis & Mineiro
    2022, "Anytime-valid off-policy inference for contextual bandits", the IPW betting of
    their section 3; STATS.md 12.1 option 2). So for every predictable
    lambda_i in [0, (1 - rho_i) / (1 + eps (1 - rho_i))], the bound that keeps
    1 + lambda (phi - eps) >= 0 at phi = -1 / (1 - rho), the wealth prod_i (1 + lambda_i
    (phi_i - eps)) is a nonnegative supermartingale under every distribution of H0, not only
    under equality. This is the two-sample test by betting of Shekhar & Ramdas 2023
    ("Nonparametric two-sample testing by betting", IEEE Trans. Inf. Theory 70(2), the
    payoff of their eq. (6) with a witness chosen from past data), shifted by the tolerance
    and weighted by the known shares instead of alternating pairs of observations.
    By Ville's inequality P(sup_n W_n >= 1 / alpha) <= alpha: flagging the first time the
    e-value reaches 1 / alpha keeps the false-alarm probability at most alpha under
    continuous monitoring, with no burn-in and no asymptotics.

    The witness is the plug-in of the set that attains the total variation,
    g(c) = 1{p_B(c) > p_A(c)}, estimated with add-1/2 (Krichevsky-Trofimov) frequencies of
    the users bet on before, refreshed every `WITNESS_CHUNK` users (so it is predictable).
    The bet size is a mixture: the e-value is the equal-weight average of the wealths of a
    log-spaced grid `BET_FRACTIONS` of fractions of the largest admissible lambda (an
    average of test supermartingales is one; Waudby-Smith & Ramdas 2024, "Estimating means
    of bounded random variables by betting", JRSS-B, section 5).

The user is the unit
    One category per user (its first sampled prediction) makes the bets independent across
    users however many requests a user makes and however correlated they are (STATS.md
    12.1: per-request tests inflate false alarms with sticky users).

Descriptive distances
    `total_variation` and `psi` (population stability index, sum (p - q) ln(p / q), the
    symmetrised Kullback-Leibler divergence; Yurdakul 2018, "Statistical properties of
    population stability index", with empty cells floored at `PSI_FLOOR`) are shown next to
    the test; they are estimates, not the decision.

Binning numbers
    `quantile_edges` takes the interior edges of equal-count bins of a calibration sample
    (control's first users), plus one just above the sample's maximum (values beyond all of
    it get their own bin); bins are then fixed for the life of the experiment, so every bet
    uses categories defined before it is placed.

Pure: numpy only, over arrays of users; nothing here reads settings or a database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# Fractions of the largest admissible bet, log-spaced; the e-value is their wealths' mean.
BET_FRACTIONS: tuple[float, ...] = tuple(float(c) for c in np.geomspace(2e-3, 0.5, 16))
# Users bet on between two refreshes of the witness.
WITNESS_CHUNK = 25
# PSI's floor for an empty cell (a share of 1e-4).
PSI_FLOOR = 1e-4
_FRACTIONS = np.asarray(BET_FRACTIONS)


def log_mean_exp(values: Sequence[float] | FloatArray) -> float:
    """log(mean(exp(values))) without overflow; -inf entries (a wealth of 0) are fine."""
    array = np.asarray(values, dtype=float)
    top = float(array.max())
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.exp(array - top).sum())) - math.log(array.size)


@dataclass(frozen=True, slots=True)
class DriftBet:
    """The running state of one tested arm's drift e-process against control.

    `log_wealth[j]` is the log-wealth of bet fraction `BET_FRACTIONS[j]`; the counts are the
    users bet on per category (tested arm and control), which also give the witness;
    `max_log_e` is the running maximum of the e-value's log over every user so far.
    """

    log_wealth: tuple[float, ...] = (0.0,) * len(BET_FRACTIONS)
    treated_counts: tuple[int, ...] = ()
    control_counts: tuple[int, ...] = ()
    max_log_e: float = 0.0

    @property
    def log_e(self) -> float:
        return log_mean_exp(self.log_wealth)

    @property
    def treated_users(self) -> int:
        return sum(self.treated_counts)

    @property
    def control_users(self) -> int:
        return sum(self.control_counts)

    def as_json(self) -> dict[str, object]:
        return {
            "wealth": list(self.log_wealth),
            "treated": list(self.treated_counts),
            "control": list(self.control_counts),
            "max_log_e": self.max_log_e,
        }

    @classmethod
    def from_json(cls, data: object) -> DriftBet:
        """The inverse of `as_json`; an empty or foreign value starts a fresh state."""
        if not isinstance(data, dict) or len(data.get("wealth", ())) != len(BET_FRACTIONS):
            return cls()
        return cls(
            log_wealth=tuple(float(v) for v in data["wealth"]),
            treated_counts=tuple(int(v) for v in data["treated"]),
            control_counts=tuple(int(v) for v in data["control"]),
            max_log_e=float(data["max_log_e"]),
        )


def _padded(counts: Sequence[int], size: int) -> NDArray[np.int64]:
    array = np.zeros(size, dtype=np.int64)
    array[: len(counts)] = counts
    return array


def witness(treated_counts: ArrayLike, control_counts: ArrayLike) -> FloatArray:
    """g(c) = 1 where the tested arm's add-1/2 frequency of c exceeds control's, else 0."""
    treated = np.asarray(treated_counts, dtype=float)
    control = np.asarray(control_counts, dtype=float)
    size = treated.size
    p_b = (treated + 0.5) / (treated.sum() + 0.5 * size)
    p_a = (control + 0.5) / (control.sum() + 0.5 * size)
    return np.asarray(p_b > p_a, dtype=float)


def bet_log_factors(
    categories: ArrayLike,
    treated: ArrayLike,
    share: ArrayLike,
    g: ArrayLike,
    *,
    tolerance: float,
) -> FloatArray:
    """log(1 + lambda (phi - eps)) per user (rows) and bet fraction (columns), for witness g."""
    cats = np.asarray(categories, dtype=np.int64)
    in_b = np.asarray(treated, dtype=bool)
    rho = np.asarray(share, dtype=float)
    weights = np.asarray(g, dtype=float)[cats]
    phi = np.where(in_b, weights / rho, -weights / (1 - rho))
    top = (1 - rho) / (1 + tolerance * (1 - rho))
    steps = (top * (phi - tolerance))[:, None] * _FRACTIONS[None, :]
    return np.asarray(np.log1p(steps), dtype=float)


def _check(cats: NDArray[np.int64], rho: FloatArray, tolerance: float, size: int) -> None:
    if not (math.isfinite(tolerance) and 0 <= tolerance < 0.5):
        raise ValueError(f"tolerance must lie in [0, 0.5), got {tolerance}")
    if rho.size and (np.any(~np.isfinite(rho)) or rho.min() <= 0 or rho.max() >= 1):
        raise ValueError("share must lie in (0, 1)")
    if cats.size and (cats.min() < 0 or cats.max() >= size):
        raise ValueError(f"categories must lie in [0, {size})")


def fold_users(
    bet: DriftBet,
    *,
    categories: ArrayLike,
    treated: ArrayLike,
    share: ArrayLike,
    tolerance: float,
    n_categories: int,
    chunk: int = WITNESS_CHUNK,
) -> DriftBet:
    """Place the bets on a batch of users (in order) and return the new state.

    `share` is each user's probability of the tested arm among (control, tested arm) at
    its first prediction; `n_categories` is the number of categories known so far.
    """
    cats = np.asarray(categories, dtype=np.int64)
    in_b = np.asarray(treated, dtype=bool)
    rho = np.asarray(share, dtype=float)
    size = max(n_categories, len(bet.treated_counts), len(bet.control_counts), 1)
    _check(cats, rho, tolerance, size)
    if not (cats.shape == in_b.shape == rho.shape):
        raise ValueError("categories, treated and share must have the same length")
    treated_counts = _padded(bet.treated_counts, size)
    control_counts = _padded(bet.control_counts, size)
    wealth = np.asarray(bet.log_wealth, dtype=float)
    max_log_e = bet.max_log_e
    for start in range(0, cats.size, chunk):
        part = slice(start, start + chunk)
        g = witness(treated_counts, control_counts)
        factors = bet_log_factors(cats[part], in_b[part], rho[part], g, tolerance=tolerance)
        path = wealth[None, :] + np.cumsum(factors, axis=0)
        top = path.max(axis=1, keepdims=True)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            log_e = np.log(np.exp(path - safe).mean(axis=1)) + safe[:, 0]
        max_log_e = max(max_log_e, float(log_e.max()))
        wealth = path[-1]
        np.add.at(treated_counts, cats[part][in_b[part]], 1)
        np.add.at(control_counts, cats[part][~in_b[part]], 1)
    return replace(
        bet,
        log_wealth=tuple(wealth.tolist()),
        treated_counts=tuple(int(v) for v in treated_counts),
        control_counts=tuple(int(v) for v in control_counts),
        max_log_e=max_log_e,
    )


def running_log_e(
    categories: ArrayLike,
    treated: ArrayLike,
    share: ArrayLike,
    *,
    tolerance: float,
    n_categories: int,
    chunk: int = WITNESS_CHUNK,
) -> FloatArray:
    """The e-process's log e-value after each user (for simulations and tests)."""
    cats = np.asarray(categories, dtype=np.int64)
    in_b = np.asarray(treated, dtype=bool)
    rho = np.asarray(share, dtype=float)
    _check(cats, rho, tolerance, n_categories)
    treated_counts = np.zeros(n_categories, dtype=np.int64)
    control_counts = np.zeros(n_categories, dtype=np.int64)
    wealth = np.zeros(len(BET_FRACTIONS))
    out = np.empty(cats.size)
    for start in range(0, cats.size, chunk):
        part = slice(start, start + chunk)
        g = witness(treated_counts, control_counts)
        path = wealth[None, :] + np.cumsum(
            bet_log_factors(cats[part], in_b[part], rho[part], g, tolerance=tolerance), axis=0
        )
        top = path.max(axis=1, keepdims=True)
        out[part] = np.log(np.exp(path - top).mean(axis=1)) + top[:, 0]
        wealth = path[-1]
        np.add.at(treated_counts, cats[part][in_b[part]], 1)
        np.add.at(control_counts, cats[part][~in_b[part]], 1)
    return out


# --------------------------------------------------------------------------- distances


def shares(counts: ArrayLike) -> FloatArray:
    """Counts as shares (all zeros stay zeros)."""
    array = np.asarray(counts, dtype=float)
    total = array.sum()
    return array / total if total > 0 else array


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """1/2 sum |p - q| of two distributions (shares) over the same categories."""
    return float(0.5 * np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def psi(actual: ArrayLike, expected: ArrayLike, *, floor: float = PSI_FLOOR) -> float:
    """Population stability index sum (a - e) ln(a / e), cells floored at `floor`."""
    a = np.maximum(np.asarray(actual, dtype=float), floor)
    e = np.maximum(np.asarray(expected, dtype=float), floor)
    return float(((a - e) * np.log(a / e)).sum())


# --------------------------------------------------------------------------- bins


def quantile_edges(values: ArrayLike, *, bins: int) -> tuple[float, ...]:
    """Interior edges of `bins` equal-count bins of `values` (ties merged), and one above all."""
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if bins < 2 or data.size == 0:
        return ()
    cuts = np.quantile(data, np.arange(1, bins) / bins, method="higher")
    # Values above all of the calibration sample get a bin of their own (a constant control
    # would otherwise share its one bin with anything larger).
    above = np.nextafter(data.max(), np.inf)
    return tuple(float(v) for v in np.unique(np.append(cuts, above)))


def bin_index(values: ArrayLike, edges: Sequence[float]) -> NDArray[np.int64]:
    """The bin of each value: 0 below the first edge, len(edges) at or above the last."""
    return np.asarray(
        np.searchsorted(np.asarray(edges, dtype=float), np.asarray(values, dtype=float), "right"),
        dtype=np.int64,
    )
