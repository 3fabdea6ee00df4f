"""Exact anytime-valid rate guardrails: betting on users with the known assignment share.

The test (STATS.md 12.1, option 2, with the user as the unit)
    Each user i has an outcome y_i in [0, 1] fixed by a rule that does not look at it: the
    share of the user's requests that failed within a fixed window after the user's first
    exposure. The user was assigned to the tested arm B with the known probability rho_B,i
    and to control A with rho_A,i (the ramp step's shares at the first exposure; users of
    other arms are not bet on). With m the relative margin,

        phi_i = y_i (1{B} / rho_B,i - (1 + m) 1{A} / rho_A,i)

    has conditional mean E[y_i(B)] - (1 + m) E[y_i(A)] <= 0 under H0 "B's mean user outcome is
    at most (1 + m) times A's", at every moment, whatever the level then (drift, ramp steps,
    load), because the share is known exactly: the bet is contemporaneous by construction.
    The wealth prod_i (1 + lambda_i phi_i) with lambda_i chosen before y_i and the arm are
    seen, and 0 <= lambda_i < rho_A,i / (1 + m), is a nonnegative supermartingale with
    initial value 1 (the inverse-propensity-weighted betting of Waudby-Smith, Wu, Ramdas,
    Karampatziakis & Mineiro 2022, "Anytime-valid off-policy inference for contextual
    bandits"; the capital process of Waudby-Smith & Ramdas 2024, "Estimating means of bounded
    random variables by betting", JRSS-B; STATS.md 12.1 option 2). By
    Ville's inequality P(sup_n W_n >= 1 / alpha) <= alpha: rolling back at the first look
    with W >= 1 / alpha bounds the false-rollback probability by alpha, at every sample size,
    with no burn-in, no minimum number of events and no variance estimate. One failing user
    of a 1% canary multiplies the wealth by up to 1 + g 99 / (1 + m).

The bets
    lambda_i = g rho_A,i / (1 + m) for each g of a fixed grid `GRID` (from 1e-3 to 0.9,
    geometric), so a canary user multiplies wealth g by 1 + g rho_A y / ((1 + m) rho_B) and a
    control user by 1 - g y >= 0.1. The e-value is the equal-weight average over the grid: an
    average of test supermartingales is one (the "diversified" grid of bets of Waudby-Smith &
    Ramdas 2024). Each factor depends only on the user, so the state is one log-wealth
    per grid point, folded user by user in the order the users' windows close.

    The promotion test (non-inferiority, H0': E[y(B)] >= (1 + m) E[y(A)]) is the mirror bet
    phi'_i = y_i ((1 + m) 1{A} / rho_A,i - 1{B} / rho_B,i) with lambda'_i = g rho_B,i: a canary
    user multiplies wealth g by 1 - g y, a control user by 1 + g (1 + m) rho_B y / rho_A.

Several windows
    The e-processes of a fast window (decides within seconds of a dead canary's first users)
    and a slow one (uses more of each user's requests) are averaged with equal weights:
    still an e-process under one alpha (STATS.md 12.1).

Everything is numpy over arrays of users; nothing here reads settings or a database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# The bet sizes g (fractions of the largest admissible bet), log-spaced.
GRID: tuple[float, ...] = tuple(float(g) for g in np.geomspace(1e-3, 0.9, 24))
_LOG_GRID_SIZE = math.log(len(GRID))


@dataclass(frozen=True, slots=True)
class RateBet:
    """The running state of one arm's betting e-processes (harm and non-inferiority).

    `harm_log_wealth[j]` and `safe_log_wealth[j]` are the log-wealths of grid bet j. The
    sums are for reports: users bet on and the sum of their outcomes, per arm.
    """

    harm_log_wealth: tuple[float, ...] = (0.0,) * len(GRID)
    safe_log_wealth: tuple[float, ...] = (0.0,) * len(GRID)
    treated_users: int = 0
    control_users: int = 0
    treated_outcome_sum: float = 0.0
    control_outcome_sum: float = 0.0

    @property
    def users(self) -> int:
        return self.treated_users + self.control_users

    @property
    def harm_log_e(self) -> float:
        """log of the grid-average harm e-value (0 before any user)."""
        return log_mean_exp(self.harm_log_wealth)

    @property
    def safe_log_e(self) -> float:
        return log_mean_exp(self.safe_log_wealth)

    @property
    def treated_mean(self) -> float:
        return self.treated_outcome_sum / self.treated_users if self.treated_users else math.nan

    @property
    def control_mean(self) -> float:
        return self.control_outcome_sum / self.control_users if self.control_users else math.nan

    def as_json(self) -> dict[str, object]:
        return {
            "harm": list(self.harm_log_wealth),
            "safe": list(self.safe_log_wealth),
            "treated_users": self.treated_users,
            "control_users": self.control_users,
            "treated_sum": self.treated_outcome_sum,
            "control_sum": self.control_outcome_sum,
        }

    @classmethod
    def from_json(cls, data: object) -> RateBet:
        """The inverse of `as_json`; an empty or foreign value starts a fresh state."""
        if not isinstance(data, dict) or len(data.get("harm", ())) != len(GRID):
            return cls()
        return cls(
            harm_log_wealth=tuple(float(v) for v in data["harm"]),
            safe_log_wealth=tuple(float(v) for v in data["safe"]),
            treated_users=int(data["treated_users"]),
            control_users=int(data["control_users"]),
            treated_outcome_sum=float(data["treated_sum"]),
            control_outcome_sum=float(data["control_sum"]),
        )


def log_mean_exp(values: Sequence[float] | FloatArray) -> float:
    """log(mean(exp(values))) without overflow; -inf entries (a wealth of 0) are fine."""
    array = np.asarray(values, dtype=float)
    top = float(array.max())
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.exp(array - top).sum())) - _LOG_GRID_SIZE


def bet_log_factors(
    outcome: ArrayLike,
    treated: ArrayLike,
    treated_share: ArrayLike,
    control_share: ArrayLike,
    *,
    margin: float,
) -> tuple[FloatArray, FloatArray]:
    """Per user and grid bet, log(1 + lambda phi) for the harm and non-inferiority bets.

    Arrays of users in the order their bets are placed; returns two (users, len(GRID))
    matrices. `treated` says which users are in the tested arm (the others are control).
    """
    y = np.asarray(outcome, dtype=float)
    in_b = np.asarray(treated, dtype=bool)
    rho_b = np.asarray(treated_share, dtype=float)
    rho_a = np.asarray(control_share, dtype=float)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if y.size and (np.any(~np.isfinite(y)) or y.min() < 0 or y.max() > 1):
        raise ValueError("outcomes must lie in [0, 1]")
    for name, share in (("treated_share", rho_b), ("control_share", rho_a)):
        if share.size and (np.any(~np.isfinite(share)) or share.min() <= 0 or share.max() >= 1):
            raise ValueError(f"{name} must lie in (0, 1)")
    g = np.asarray(GRID)[None, :]
    y_col = y[:, None]
    odds = (rho_a / rho_b)[:, None]
    harm = np.where(in_b[:, None], np.log1p(g * odds * y_col / (1 + margin)), np.log1p(-g * y_col))
    safe = np.where(in_b[:, None], np.log1p(-g * y_col), np.log1p(g * (1 + margin) * y_col / odds))
    return harm, safe


def fold_users(
    bet: RateBet,
    *,
    outcome: ArrayLike,
    treated: ArrayLike,
    treated_share: ArrayLike,
    control_share: ArrayLike,
    margin: float,
) -> RateBet:
    """Place the bets on a batch of users (in order) and return the new state."""
    y = np.asarray(outcome, dtype=float)
    in_b = np.asarray(treated, dtype=bool)
    if y.shape != in_b.shape:
        raise ValueError("outcome and treated must have the same length")
    if not y.size:
        return bet
    harm, safe = bet_log_factors(y, in_b, treated_share, control_share, margin=margin)
    return replace(
        bet,
        harm_log_wealth=tuple((np.asarray(bet.harm_log_wealth) + harm.sum(axis=0)).tolist()),
        safe_log_wealth=tuple((np.asarray(bet.safe_log_wealth) + safe.sum(axis=0)).tolist()),
        treated_users=bet.treated_users + int(in_b.sum()),
        control_users=bet.control_users + int((~in_b).sum()),
        treated_outcome_sum=bet.treated_outcome_sum + float(y[in_b].sum()),
        control_outcome_sum=bet.control_outcome_sum + float(y[~in_b].sum()),
    )


def combined_log_e(bets: Sequence[RateBet], *, harm: bool = True) -> float:
    """log of the equal-weight average of the windows' e-values (an e-process itself)."""
    if not bets:
        raise ValueError("bets must not be empty")
    values = [bet.harm_log_e if harm else bet.safe_log_e for bet in bets]
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def running_log_e(
    outcome: ArrayLike,
    treated: ArrayLike,
    treated_share: ArrayLike,
    control_share: ArrayLike,
    *,
    margin: float,
) -> FloatArray:
    """The harm e-process's log e-value after each user (for simulations and tests)."""
    harm, _ = bet_log_factors(outcome, treated, treated_share, control_share, margin=margin)
    wealth = np.cumsum(harm, axis=0)
    top = wealth.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.asarray(top[:, 0] + np.log(np.exp(wealth - top).mean(axis=1)), dtype=float)
