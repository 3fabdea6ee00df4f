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

The harm bets: a mixture of likelihood ratios over the relative harm
    Write r0 = 1 + m and, for a relative harm s > 1 (the canary's mean user outcome is
    s r0 times control's), take

        g_i(s) = rho_B,i r0 (s - 1) / (rho_B,i r0 s + rho_A,i),   lambda_i(s) = g_i(s) rho_A,i / r0,

    so a canary user multiplies the wealth of bet s by 1 + g rho_A y / (r0 rho_B) and a
    control user by 1 - g y (0 <= g < 1, so lambda is admissible). For users with one request
    this factor is exactly the likelihood ratio, at relative risk s r0 against r0, of "a
    failing user is the canary's" (probability rho_B r / (rho_B r + rho_A) at relative risk
    r): the product of STATS.md 12.1 option 1 (after Lindon & Malek 2022), exact here with
    no Poisson limit because each user is one independent draw of its arm, and for outcomes
    in [0, 1] still a bet with predictable lambda. lambda_i
    uses only the user's shares, known before its arm and outcome. (With more than two arms
    the caller may pass 1 - rho_A >= rho_B as rho_B for control users: lambda is increasing
    in rho_B, so a control user's lambda is at least a canary user's, and the conditional
    mean of lambda phi, lambda(B) E[y(B)] - lambda(A) (1 + m) E[y(A)], stays <= 0 under H0:
    conservative, still valid.) Because a bet is a relative harm, not a bet size, the same
    bet is the right one at every ramp step.

    The e-value is the prior-weighted average over a fixed grid `HARM_RATIOS` of s (1.02 to
    1,000, log-spaced), i.e. STATS.md 12.1 option 1's mixture of likelihood ratios with a
    discrete mixing distribution: an average of test supermartingales is one (Robbins 1970,
    "Statistical methods related to the law of the iterated logarithm", the method of
    mixtures; for bets, the averaged capital processes of Waudby-Smith & Ramdas 2024). The
    prior (`HARM_LOG_WEIGHTS`) puts 85% on a log-normal around the design harm s = 2 (a
    doubling beyond the margin, the harm `analysis.stats.planning.guardrail_n_star_proportion`
    sizes tests for) with sd 0.25 in log s (95% of it on s from 1.2 to 3.3), and spreads 15%
    evenly over the grid, so small and huge harms are caught too (a canary failing every
    request within a few of its users). A mixture pays for not knowing s about half the log
    of the number of failing users plus -log of the prior mass near the true s; centring the
    prior on a design harm is the analogue of tuning N* of the normal mixture (STATS.md 2.1):
    fixed in the code, never taken from the data.

    Measured (`python -m bench.stats_power`, 1% -> 2% at a 10% canary, one request per user,
    a look every 100 users, 5,000 seeded runs): median 0.71x and 80th percentile 1.39x the
    two-sided fixed-horizon size (pooled formula; 0.64x / 1.25x against statsmodels'
    NormalIndPower), A/A false rollbacks 3.3% at alpha 5%. The previous bets, an equal-weight
    grid of bet sizes g from 1e-3 to 0.9, needed 1.02x / 1.82x (A/A 1.6%); the new ones are
    also faster for 1% -> 1.5% (0.76x / 1.67x against 1.11x / 1.85x) and 1% -> 3% (0.90x /
    1.51x against 1.04x / 1.92x). Tried in a side simulation of the same case and rejected:
    predictable plug-in bets on the same phi, ONS (Cutkosky & Orabona 2018, "Black-box
    reductions for parameter-free online learning in Banach spaces"; as in Shekhar & Ramdas
    2023, "Nonparametric two-sample testing by betting") 0.93x / 1.84x, aGRAPA
    (Waudby-Smith & Ramdas 2024) 1.04x / 1.73x, the Krichevsky-Trofimov plug-in of the
    failing users' canary share 1.05x / 1.92x; the same grid of s with a log-uniform prior
    (no design harm) 1.17x / 2.09x; betting at the true s (an oracle) 0.64x / 1.25x. The
    state is one log-wealth per grid point, folded user by user in the order the users'
    windows close.

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

# The harm bets: relative harms s (the canary's mean user outcome over (1 + m) times control's).
HARM_RATIOS: tuple[float, ...] = tuple(float(s) for s in np.geomspace(1.02, 1000.0, 48))
# Their prior: a log-normal around the design harm, plus an even spread over the grid.
DESIGN_RATIO = 2.0
DESIGN_LOG_SD = 0.25
SPREAD_WEIGHT = 0.15


def _harm_log_weights() -> tuple[float, ...]:
    log_s = np.log(np.asarray(HARM_RATIOS))
    bump = np.exp(-0.5 * ((log_s - math.log(DESIGN_RATIO)) / DESIGN_LOG_SD) ** 2)
    weights = (1 - SPREAD_WEIGHT) * bump / bump.sum() + SPREAD_WEIGHT / log_s.size
    return tuple(float(w) for w in np.log(weights / weights.sum()))


HARM_LOG_WEIGHTS: tuple[float, ...] = _harm_log_weights()
# The promotion (non-inferiority) bet sizes g (fractions of the largest admissible bet),
# log-spaced, with equal weights.
SAFE_GRID: tuple[float, ...] = tuple(float(g) for g in np.geomspace(1e-3, 0.9, 24))
# States written before the harm bets became relative harms carry no version.
STATE_VERSION = 2


@dataclass(frozen=True, slots=True)
class RateBet:
    """The running state of one arm's betting e-processes (harm and non-inferiority).

    `harm_log_wealth[j]` is the log-wealth of the bet on relative harm `HARM_RATIOS[j]`,
    `safe_log_wealth[j]` that of promotion bet `SAFE_GRID[j]`. The sums are for reports:
    users bet on and the sum of their outcomes, per arm.
    """

    harm_log_wealth: tuple[float, ...] = (0.0,) * len(HARM_RATIOS)
    safe_log_wealth: tuple[float, ...] = (0.0,) * len(SAFE_GRID)
    treated_users: int = 0
    control_users: int = 0
    treated_outcome_sum: float = 0.0
    control_outcome_sum: float = 0.0

    @property
    def users(self) -> int:
        return self.treated_users + self.control_users

    @property
    def harm_log_e(self) -> float:
        """log of the prior-weighted harm e-value (0 before any user)."""
        return float(harm_mixture_log_e(np.asarray(self.harm_log_wealth)))

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
            "version": STATE_VERSION,
            "harm": list(self.harm_log_wealth),
            "safe": list(self.safe_log_wealth),
            "treated_users": self.treated_users,
            "control_users": self.control_users,
            "treated_sum": self.treated_outcome_sum,
            "control_sum": self.control_outcome_sum,
        }

    @classmethod
    def from_json(cls, data: object) -> RateBet:
        """The inverse of `as_json`; an empty or foreign value starts a fresh state.

        A state of the previous harm bets (no version: an equal-weight grid of bet sizes) is
        carried over as its e-value E: every new bet starts from wealth E, so the new
        mixture is E times a test supermartingale started then, and the evidence so far is
        neither lost nor counted twice.
        """
        if not isinstance(data, dict) or len(data.get("safe", ())) != len(SAFE_GRID):
            return cls()
        harm = tuple(float(v) for v in data["harm"])
        if data.get("version") != STATE_VERSION:
            harm = (log_mean_exp(harm),) * len(HARM_RATIOS) if harm else ()
        if len(harm) != len(HARM_RATIOS):
            return cls()
        return cls(
            harm_log_wealth=harm,
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
    return top + math.log(float(np.exp(array - top).sum())) - math.log(array.size)


def harm_mixture_log_e(log_wealth: ArrayLike) -> FloatArray:
    """log of the prior-weighted harm e-value, over the last axis (one entry per bet).

    A (users, len(HARM_RATIOS)) matrix of running log-wealths gives the e-process's path.
    """
    return _log_sum_exp(np.asarray(log_wealth, dtype=float) + _HARM_LOG_WEIGHTS) - _HARM_LOG_NORM


def _log_sum_exp(weighted: FloatArray) -> FloatArray:
    top = weighted.max(axis=-1, keepdims=True)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.exp(weighted - safe_top).sum(axis=-1))
    return np.asarray(total + safe_top[..., 0], dtype=float)


_HARM_LOG_WEIGHTS = np.asarray(HARM_LOG_WEIGHTS)
# The weights' log-sum as computed (about 1e-16 from 0), so a fresh state's e-value is 1.
_HARM_LOG_NORM = float(_log_sum_exp(_HARM_LOG_WEIGHTS))


def harm_bet_sizes(
    treated_share: ArrayLike, control_share: ArrayLike, *, margin: float
) -> FloatArray:
    """g_i(s) = rho_B r0 (s - 1) / (rho_B r0 s + rho_A) per user (rows) and harm s (columns)."""
    rho_b = np.asarray(treated_share, dtype=float)[:, None]
    rho_a = np.asarray(control_share, dtype=float)[:, None]
    s = np.asarray(HARM_RATIOS)[None, :]
    r0 = 1 + margin
    return np.asarray(rho_b * r0 * (s - 1) / (rho_b * r0 * s + rho_a), dtype=float)


def bet_log_factors(
    outcome: ArrayLike,
    treated: ArrayLike,
    treated_share: ArrayLike,
    control_share: ArrayLike,
    *,
    margin: float,
) -> tuple[FloatArray, FloatArray]:
    """Per user and bet, log(1 + lambda phi) for the harm and non-inferiority bets.

    Arrays of users in the order their bets are placed; returns a (users, len(HARM_RATIOS))
    and a (users, len(SAFE_GRID)) matrix. `treated` says which users are in the tested arm
    (the others are control).
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
    y_col = y[:, None]
    odds = (rho_a / rho_b)[:, None]
    g = harm_bet_sizes(rho_b, rho_a, margin=margin)
    harm = np.where(in_b[:, None], np.log1p(g * odds * y_col / (1 + margin)), np.log1p(-g * y_col))
    g_safe = np.asarray(SAFE_GRID)[None, :]
    safe = np.where(
        in_b[:, None],
        np.log1p(-g_safe * y_col),
        np.log1p(g_safe * (1 + margin) * y_col / odds),
    )
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
    return log_mean_exp([bet.harm_log_e if harm else bet.safe_log_e for bet in bets])


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
    return harm_mixture_log_e(np.cumsum(harm, axis=0))
