"""The exact rate guardrail (analysis.stats.betting): hand-checked factors and seeded worlds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom
from statsmodels.stats.proportion import proportion_confint

from analysis.stats.betting import (
    HARM_LOG_WEIGHTS,
    HARM_RATIOS,
    SAFE_GRID,
    RateBet,
    bet_log_factors,
    combined_log_e,
    fold_users,
    log_mean_exp,
    running_log_e,
)
from analysis.stats.planning import fixed_horizon_total_n_proportion

ALPHA = 0.05
THRESHOLD = math.log(1 / ALPHA)
RAMP = (0.01, 0.05, 0.10, 0.25, 0.50)


def _fold(outcome, treated, share, *, margin=0.0, bet=None):
    n = len(outcome)
    return fold_users(
        bet or RateBet(),
        outcome=outcome,
        treated=treated,
        treated_share=np.full(n, share),
        control_share=np.full(n, 1 - share),
        margin=margin,
    )


def test_one_user_factors_by_hand():
    harm, safe = bet_log_factors([1.0, 0.5], [True, False], [0.1, 0.1], [0.9, 0.9], margin=0.2)
    s = np.asarray(HARM_RATIOS)
    # Bet on relative harm s: g = rho_B r0 (s - 1) / (rho_B r0 s + rho_A), r0 = 1 + m.
    g = 0.1 * 1.2 * (s - 1) / (0.1 * 1.2 * s + 0.9)
    # Canary user failing: 1 + g rho_A / ((1 + m) rho_B); control half-failing: 1 - g / 2.
    assert harm[0] == pytest.approx(np.log1p(g * 9 / 1.2))
    assert harm[1] == pytest.approx(np.log1p(-g * 0.5))
    # Mirror bet: canary 1 - g y, control 1 + g (1 + m) rho_B y / rho_A.
    g_safe = np.asarray(SAFE_GRID)
    assert safe[0] == pytest.approx(np.log1p(-g_safe))
    assert safe[1] == pytest.approx(np.log1p(g_safe * 1.2 * 0.5 / 9))


def test_harm_bets_are_binomial_likelihood_ratios_of_where_failures_land():
    # One request per user, a constant 20% canary, margin 0.25: after 7 failing canary users
    # and 11 failing control users, bet s holds the binomial likelihood ratio of 7 of 18
    # failures in the canary at relative risk s (1 + m) against (1 + m), where a failure is
    # the canary's with probability rho_B r / (rho_B r + rho_A) (STATS.md 12.1, option 1).
    rng = np.random.default_rng(8)
    treated = rng.permutation(np.r_[np.ones(7, bool), np.zeros(11, bool), np.ones(30, bool)])
    outcome = np.ones(treated.size)
    outcome[np.nonzero(treated)[0][7:]] = 0.0  # 30 canary users without a failure
    bet = _fold(outcome, treated, 0.2, margin=0.25)

    def q(r):
        return 0.2 * r / (0.2 * r + 0.8)

    s = np.asarray(HARM_RATIOS)
    expected = binom.logpmf(7, 18, q(1.25 * s)) - binom.logpmf(7, 18, q(1.25))
    assert bet.harm_log_wealth == pytest.approx(expected, rel=1e-9)
    # The e-value is the prior-weighted average; the weights sum to one, peak near s = 2.
    weights = np.exp(HARM_LOG_WEIGHTS)
    assert weights.sum() == pytest.approx(1.0)
    assert 1.8 < s[weights.argmax()] < 2.2
    assert bet.harm_log_e == pytest.approx(math.log(float(np.exp(expected) @ weights)))


def test_a_previous_state_is_carried_over_as_its_e_value():
    # The harm bets before version 2: 24 equal-weight bet sizes; their e-value is kept.
    old = {
        "harm": [0.5] * 12 + [2.5] * 12,
        "safe": [0.1] * len(SAFE_GRID),
        "treated_users": 40,
        "control_users": 360,
        "treated_sum": 3.0,
        "control_sum": 2.0,
    }
    bet = RateBet.from_json(old)
    assert bet.harm_log_e == pytest.approx(math.log((math.exp(0.5) + math.exp(2.5)) / 2))
    assert bet.safe_log_wealth == (0.1,) * len(SAFE_GRID)
    assert bet.treated_users == 40
    assert RateBet.from_json(bet.as_json()) == bet
    assert RateBet.from_json({}) == RateBet()


def test_error_free_users_do_not_move_the_wealth():
    bet = _fold(np.zeros(500), np.arange(500) % 2 == 0, 0.5)
    assert bet.harm_log_e == 0.0 and bet.safe_log_e == 0.0
    assert bet.users == 500


def test_incremental_folding_equals_one_batch_and_survives_json():
    rng = np.random.default_rng(3)
    y = rng.random(300) * (rng.random(300) < 0.2)
    b = rng.random(300) < 0.3
    whole = _fold(y, b, 0.3, margin=0.1)
    parts = _fold(y[:100], b[:100], 0.3, margin=0.1)
    parts = _fold(y[100:], b[100:], 0.3, margin=0.1, bet=RateBet.from_json(parts.as_json()))
    assert parts.harm_log_wealth == pytest.approx(whole.harm_log_wealth)
    assert parts.treated_users == whole.treated_users
    assert running_log_e(y, b, np.full(300, 0.3), np.full(300, 0.7), margin=0.1)[
        -1
    ] == pytest.approx(whole.harm_log_e)


def test_zero_errors_in_control_against_ten_percent_rolls_back():
    # 0 / 9,000 control users against 100 / 1,000 canary users (one request each).
    treated = np.r_[np.zeros(9000, bool), np.ones(1000, bool)]
    outcome = np.r_[np.zeros(9000), (np.arange(1000) < 100).astype(float)]
    order = np.random.default_rng(1).permutation(10_000)
    bet = _fold(outcome[order], treated[order], 0.1)
    assert bet.harm_log_e > THRESHOLD
    assert bet.safe_log_e < 0


def test_a_canary_failing_everything_is_caught_after_a_few_users():
    rng = np.random.default_rng(5)
    treated = rng.random(2000) < 0.05
    log_e = running_log_e(
        treated.astype(float), treated, np.full(2000, 0.05), np.full(2000, 0.95), margin=0.0
    )
    first = int(np.argmax(log_e >= THRESHOLD))
    assert log_e[first] >= THRESHOLD
    assert int(treated[: first + 1].sum()) <= 4


def test_degenerate_constant_outcomes_beyond_and_within_the_margin():
    treated = np.arange(4000) % 2 == 0
    beyond = _fold(np.where(treated, 0.5, 0.1), treated, 0.5, margin=0.2)
    assert beyond.harm_log_e > THRESHOLD
    within = _fold(np.where(treated, 0.1, 0.1), treated, 0.5, margin=0.2)
    assert within.harm_log_e < 0
    # The same within-margin data proves non-inferiority, the beyond-margin data does not.
    assert within.safe_log_e > THRESHOLD
    assert beyond.safe_log_e < 0


def test_windows_average_and_grid_average():
    assert log_mean_exp([0.0] * len(SAFE_GRID)) == 0.0
    assert RateBet().harm_log_e == pytest.approx(0.0, abs=1e-12)
    a = _fold(np.ones(3), np.ones(3, bool), 0.1)
    b = RateBet()
    assert combined_log_e([a, b]) == pytest.approx(math.log((math.exp(a.harm_log_e) + 1) / 2))


def _ramp_world(rng: np.random.Generator, users: int, *, canary_rate=None):
    """Sticky users over a 1-5-10-25-50% ramp: Pareto(1.2) requests, gamma(0.3) propensity,
    an error rate that doubles over the run; each user's outcome is its failed share."""
    step = np.minimum((np.arange(users) * len(RAMP)) // users, len(RAMP) - 1)
    share = np.asarray(RAMP)[step]
    treated = rng.random(users) < share
    requests = np.minimum(np.floor(rng.pareto(1.2, users) + 1), 500).astype(int)
    drift = 0.01 * (1 + np.arange(users) / users)
    propensity = np.minimum(rng.gamma(0.3, 1 / 0.3, users) * drift, 1.0)
    if canary_rate is not None:
        propensity = np.where(treated, canary_rate, propensity)
    failed = rng.binomial(requests, propensity)
    return failed / requests, treated, share, failed, requests


def test_a_a_ramp_with_sticky_users_keeps_alpha_where_per_request_betting_does_not():
    rng = np.random.default_rng(20261204)
    runs, users = 150, 3000
    user_alarms = request_alarms = 0
    for _ in range(runs):
        outcome, treated, share, failed, requests = _ramp_world(rng, users)
        log_e = running_log_e(outcome, treated, share, 1 - share, margin=0.0)
        user_alarms += bool((log_e >= THRESHOLD).any())
        # The same bet on requests: every request its own unit (the invalid construction).
        per_request = np.repeat(np.arange(users), requests)
        y = np.concatenate(
            [np.r_[np.ones(f), np.zeros(n - f)] for f, n in zip(failed, requests, strict=True)]
        )
        req_e = running_log_e(
            y, treated[per_request], share[per_request], 1 - share[per_request], margin=0.0
        )
        request_alarms += bool((req_e >= THRESHOLD).any())
    _, user_upper = proportion_confint(user_alarms, runs, alpha=0.05, method="wilson")
    assert user_upper <= 0.06  # at most alpha, up to Monte-Carlo error (0 alarms: 0.025)
    assert user_alarms / runs <= ALPHA
    # The bound the user-level test meets is one the per-request test fails.
    assert request_alarms / runs > user_upper


def test_ten_percent_canary_against_error_free_control_at_a_five_percent_step():
    rng = np.random.default_rng(11)
    caught = 0
    for _ in range(20):
        n = 4000
        treated = rng.random(n) < 0.05
        outcome = np.where(treated, rng.random(n) < 0.10, 0.0).astype(float)
        log_e = running_log_e(outcome, treated, np.full(n, 0.05), np.full(n, 0.95), margin=0.0)
        caught += bool((log_e >= THRESHOLD).any())
    assert caught == 20


def test_doubling_error_rate_at_a_ten_percent_canary_meets_the_power_targets():
    # Issue 12's power target (bench/stats_power.py, 5,000 runs): 1% -> 2% at a 10% canary,
    # one request per user, a look every 100 users: median stopping size <= 0.9x and 80th
    # percentile <= 1.5x the two-sided 80%-power fixed-horizon total (pooled formula).
    fixed = fixed_horizon_total_n_proportion(0.01, 0.02, treatment_share=0.1, alpha=ALPHA)
    rng = np.random.default_rng(20240601)
    failure_rate = 0.1 * 0.02 + 0.9 * 0.01
    canary_share_of_failures = 0.1 * 0.02 / failure_rate
    sizes = []
    for _ in range(1000):
        # Only failing users move the wealth: their user numbers and arms.
        user = np.cumsum(rng.geometric(failure_rate, 1000)) - 1
        treated = rng.random(1000) < canary_share_of_failures
        log_e = running_log_e(
            np.ones(1000), treated, np.full(1000, 0.1), np.full(1000, 0.9), margin=0.0
        )
        crossed = np.nonzero(log_e >= THRESHOLD)[0]
        sizes.append((user[crossed[0]] // 100 + 1) * 100 if crossed.size else np.inf)
    median, p80 = np.percentile(sizes, [50, 80], method="inverted_cdf")
    assert median <= 0.9 * fixed
    assert p80 <= 1.5 * fixed


def test_at_the_margin_the_false_rollback_rate_stays_within_alpha():
    # The hardest null: the canary's rate exactly (1 + m) times control's (1.25% vs 1%, margin
    # 0.25, a 10% canary), where every bet is a martingale, not just a supermartingale.
    # Only failing users move the wealth; 1,500 of them is about 146,000 users per run.
    rng = np.random.default_rng(20261204)
    runs, failures = 600, 1500
    canary_share_of_failures = 0.1 * 0.0125 / (0.1 * 0.0125 + 0.9 * 0.01)
    alarms = 0
    for _ in range(runs):
        treated = rng.random(failures) < canary_share_of_failures
        log_e = running_log_e(
            np.ones(failures),
            treated,
            np.full(failures, 0.1),
            np.full(failures, 0.9),
            margin=0.25,
        )
        alarms += bool((log_e >= THRESHOLD).any())
    lower, _ = proportion_confint(alarms, runs, alpha=0.05, method="wilson")
    assert lower <= ALPHA  # not above alpha beyond Monte-Carlo error
    assert alarms > 0  # the boundary is reachable: the test is not vacuous
