"""The quantile guardrail with the user as the unit (analysis/stats/quantile_users.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from analysis.stats.betting import RateBet, fold_users
from analysis.stats.guardrail_types import GuardrailSpec, GuardrailStatus
from analysis.stats.quantile_users import (
    ControlHistory,
    UserQuantileBets,
    exceedance_shares,
    margin_shift,
    quantile_user_evidence,
    thresholds,
)
from analysis.stats.rate_guardrail import UserRateBets
from bench.quantile_sticky import (
    ALPHA,
    detection,
    false_rollbacks,
    one_request_stopping_sizes,
)
from routing.observe.histogram import LogHistogram

INDEX = LogHistogram().bucket_index
LOG_RATIO = math.log(LogHistogram().upper_edge(1) / LogHistogram().upper_edge(0))


def _history(values_by_bucket: dict[float, list[float]], bucket_s: float) -> ControlHistory:
    buckets = []
    for start, values in values_by_bucket.items():
        counts: dict[int, int] = {}
        for value in values:
            counts[INDEX(value)] = counts.get(INDEX(value), 0) + 1
        buckets.append((start, counts))
    return ControlHistory.from_buckets(buckets, bucket_s=bucket_s)


def test_the_threshold_is_controls_quantile_over_buckets_that_ended_before_the_user() -> None:
    rng = np.random.default_rng(5)
    values = {
        float(start): (100 * np.exp(0.5 * rng.standard_normal(80))).tolist()
        for start in range(0, 200, 10)
    }
    history = _history(values, 10.0)
    first_seen = np.array([5.0, 25.0, 100.0, 100.5, 199.0, 500.0])
    index, found = thresholds(history, first_seen, p=0.95, lookback_s=60.0, min_requests=200)
    # At 5 s no bucket has ended; at 25 s two have (160 requests < 200): no threshold.
    assert found.tolist() == [False, False, True, True, True, True]
    for t, k in zip(first_seen[found], index[found], strict=True):
        ended = [s for s in values if s + 10.0 <= t]
        window = [s for s in ended if s + 10.0 > t - 60.0]  # the last 60 s ...
        window = ended[-max(len(window), 3) :]  # ... extended to 200 requests (3 buckets)
        pooled = np.concatenate([values[s] for s in window])
        expected = np.quantile(pooled, 0.95, method="inverted_cdf")
        assert k == INDEX(float(expected))


def test_margin_shifts_round_the_margin_to_whole_buckets_conservatively() -> None:
    # gamma = 1.01 / 0.99; log(1.1) / log(gamma) = 4.77 buckets.
    assert margin_shift(0.1, LOG_RATIO) == 5
    assert margin_shift(0.1, LOG_RATIO, harm=False) == 4
    assert margin_shift(0.0, LOG_RATIO) == margin_shift(0.0, LOG_RATIO, harm=False) == 0
    with pytest.raises(ValueError, match="margin"):
        margin_shift(-0.1, LOG_RATIO)


def test_exceedance_shares_count_a_users_requests_above_or_at_its_threshold() -> None:
    users = [{10: 3, 11: 1}, {}, {12: 2, 9: 2}]
    assert exceedance_shares(users, [10, 10, 11]).tolist() == [0.25, 0.0, 0.5]
    assert exceedance_shares(users, [10, 10, 11], inclusive=True).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="one threshold per user"):
        exceedance_shares(users, [10])


def _bets(harm_outcome: float, users: int) -> UserQuantileBets:
    bet = fold_users(
        RateBet(),
        outcome=[harm_outcome] * users + [0.05] * users,
        treated=[True] * users + [False] * users,
        treated_share=[0.5] * (2 * users),
        control_share=[0.5] * (2 * users),
        margin=0.0,
    )
    return UserQuantileBets(
        bets=UserRateBets(windows_s=(3.0,), bets=(bet,)),
        quantile=0.95,
        shift=5,
        threshold_ms=163.2,
        relative_effect=0.4,
    )


def test_evidence_rolls_back_on_slow_users_and_reports_the_quantile_effect() -> None:
    spec = GuardrailSpec("latency-p95", "quantile", "lower_is_better", margin=0.1, quantile=0.95)
    evidence = quantile_user_evidence(spec, "v2", _bets(1.0, 30), alpha=0.05)
    assert evidence.status is GuardrailStatus.HARM
    assert evidence.p_value < 1e-6 and evidence.harm_lower_bound == 0.1
    assert evidence.relative_effect == evidence.harm_estimate == 0.4
    assert evidence.method.startswith("betting e-process on users")
    assert "163.2 ms" in evidence.method
    # The nested harm bets raise the bound to the largest harm level that fired.
    bounded = dataclasses.replace(_bets(1.0, 30), bounds=((0.25, 9.0), (0.5, 3.1), (1.0, 0.2)))
    assert quantile_user_evidence(spec, "v2", bounded, alpha=0.05).harm_lower_bound == 0.5
    assert quantile_user_evidence(spec, "v2", bounded, alpha=0.05).interval == (0.5, math.inf)
    quiet = quantile_user_evidence(spec, "v2", _bets(0.05, 30), alpha=0.05)
    assert quiet.status is GuardrailStatus.INCONCLUSIVE and quiet.p_value > 0.05
    with pytest.raises(ValueError, match="quantile"):
        other = GuardrailSpec("latency-p99", "quantile", "lower_is_better", quantile=0.99)
        quantile_user_evidence(other, "v2", _bets(1.0, 3), alpha=0.05)


# Seeded simulations (bench/quantile_sticky.py; 500 runs per world there, figures in the README).
RUNS = 100


def test_a_a_ramps_with_sticky_users_stay_under_alpha_only_with_the_user_as_the_unit() -> None:
    rates = false_rollbacks(RUNS, user_sigma=0.5, seed=11)
    assert rates.users / RUNS <= ALPHA
    # The previous per-request exceedance e-process exceeds alpha with confidence.
    lower, _ = proportion_confint(rates.per_request, RUNS, alpha=0.1, method="wilson")
    assert lower > ALPHA
    assert rates.per_request > rates.users


def test_a_constant_slow_canary_and_a_twenty_percent_slower_one_are_caught() -> None:
    slow = detection(5, seed=12, ramp=(0.05,) * 5, canary_constant_ms=1000.0)
    assert np.isfinite(slow[:, 0]).all()
    assert slow[:, 0].max() <= 30  # canary users before the rollback
    regressed = detection(3, seed=13, ramp=(0.10,) * 5, canary_factor=1.2, users_per_s=10.0)
    assert np.isfinite(regressed[:, 0]).all()


def test_p95_plus_twenty_percent_stops_within_one_and_a_half_fixed_horizons() -> None:
    # Fixed horizon of bench/quantile_power.py at these settings: 268 canary requests.
    stopped = one_request_stopping_sizes(60, seed=14, max_canary=3_000)
    assert np.isfinite(stopped).mean() >= 0.95
    assert np.median(stopped) <= 1.5 * 268
