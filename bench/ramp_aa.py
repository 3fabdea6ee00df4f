"""Benchmark: false rollbacks and detection of the error-rate guardrail over a canary ramp.

World (STATS.md 12.4 (ii) and (iv)): an A/A canary ramps 1 -> 5 -> 10 -> 25 -> 50% in five
equal steps. Users arrive at a steady rate and are sticky (a uniform hash u: canary while
u < the share, so a ramp step only moves users from control to the canary). Each sends a
Pareto(1.2)-distributed number of requests (capped at 1,000) spaced by exponential gaps,
each failing with probability min(1, g * base(t)) where g ~ gamma(shape k, mean 1) is the
user's propensity and base(t) doubles from 1% over the run.

Guardrails compared on the same data (alpha = 0.05 for the one guardrail, looks every
LOOK_S seconds):

* users (the shipped guardrail): `analysis.stats.betting` with the user as the unit, the
  average of a fast-window (3 s) and a slow-window (60 s) e-process, bets placed when each
  user's window closes plus the settle time, shares of the user's first request;
* per-request betting: the same bet on every request as its own unit (invalid here);
* pooled per-request harm test: the previous guardrail (`analysis.stats.harm`, counts pooled
  over the whole ramp, burn-in of 100 requests and 10 errors per arm).

Reported: the false-rollback rate with its Wilson 95% interval (target: upper bound <=
alpha for the user guardrail). Detection: an error-free control against a canary failing 10%
of requests at a fixed 5% step, and a canary failing every request (canary users and
requests before the rollback).

Run from the repository root: `.venv/bin/python -m bench.ramp_aa` (about a minute at 500
runs), `--runs N` to change the number of runs.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from statsmodels.stats.proportion import proportion_confint

from analysis.stats.betting import bet_log_factors, harm_mixture_log_e
from analysis.stats.harm import harm_threshold, proportion_harm_z

ALPHA = 0.05
RAMP = (0.01, 0.05, 0.10, 0.25, 0.50)
STEP_S = 600.0
USERS_PER_S = 1.0
GAP_MEAN_S = 10.0
FAST_S, SLOW_S, SETTLE_S = 3.0, 60.0, 2.5
LOOK_S = 10.0
BASE_RATE = 0.01
N_STAR = 20_000.0
SEED = 20261204

Array = NDArray[Any]


@dataclass(frozen=True)
class Users:
    """One simulated population: per user and per request."""

    arrival: Array  # first request time per user
    treated: Array  # canary at the first request
    share: Array  # canary share at the first request
    request_user: Array  # user index per request
    request_time: Array
    request_treated: Array  # canary at the time of the request (ramp moves users)
    request_failed: Array


def _share_at(t: Array, ramp: tuple[float, ...]) -> Array:
    step = np.minimum((t // STEP_S).astype(int), len(ramp) - 1)
    return np.asarray(ramp)[step]


def simulate(
    rng: np.random.Generator,
    *,
    shape: float = 0.3,
    ramp: tuple[float, ...] = RAMP,
    canary_rate: float | None = None,
    control_rate: float | None = None,
    users_per_s: float = USERS_PER_S,
) -> Users:
    """A population over the ramp; fixed rates replace the A/A propensities when given."""
    duration = STEP_S * len(ramp)
    count = rng.poisson(users_per_s * duration)
    arrival = np.sort(rng.uniform(0, duration, count))
    u = rng.random(count)
    requests = np.minimum(np.floor(rng.pareto(1.2, count) + 1), 1000).astype(int)
    propensity = rng.gamma(shape, 1 / shape, count)
    user = np.repeat(np.arange(count), requests)
    gaps = rng.exponential(GAP_MEAN_S, user.size)
    first = np.r_[0, np.cumsum(requests)[:-1]]
    gaps[first] = 0.0
    offset = np.cumsum(gaps)
    offset -= np.repeat(offset[first], requests)
    at = arrival[user] + offset
    keep = at < duration
    user, at = user[keep], at[keep]
    treated_now = u[user] < _share_at(at, ramp)
    rate = np.minimum(1.0, propensity[user] * BASE_RATE * (1 + at / duration))
    if canary_rate is not None:
        rate = np.where(treated_now, canary_rate, rate if control_rate is None else control_rate)
    failed = rng.random(at.size) < rate
    share = _share_at(arrival, ramp)
    return Users(arrival, u < share, share, user, at, treated_now, failed)


def _windowed(users: Users, window: float) -> tuple[Array, Array, Array]:
    """Bet times, outcomes and the mask of users with a request in the window."""
    age = users.request_time - users.arrival[users.request_user]
    inside = age <= window
    n = np.bincount(users.request_user[inside], minlength=users.arrival.size)
    e = np.bincount(
        users.request_user[inside], weights=users.request_failed[inside], minlength=n.size
    )
    has = n > 0
    return users.arrival + window + SETTLE_S, np.where(has, e / np.maximum(n, 1), 0.0), has


def _process(bet_time: Array, outcome: Array, treated: Array, share: Array, looks: Array) -> Array:
    """The harm e-process's log e-value at each look (users bet in order of their bet time)."""
    order = np.argsort(bet_time, kind="stable")
    harm, _ = bet_log_factors(
        outcome[order], treated[order], share[order], 1 - share[order], margin=0.0
    )
    wealth = np.vstack([np.zeros((1, harm.shape[1])), np.cumsum(harm, axis=0)])
    done = np.searchsorted(bet_time[order], looks, side="right")
    return harm_mixture_log_e(wealth[done])


def user_guardrail(users: Users, looks: Array) -> Array:
    """Combined (fast + slow) log e-value at each look."""
    values = []
    for window in (FAST_S, SLOW_S):
        bet_time, outcome, has = _windowed(users, window)
        values.append(
            _process(bet_time[has], outcome[has], users.treated[has], users.share[has], looks)
        )
    return np.logaddexp(values[0], values[1]) - math.log(2)


def request_betting(users: Users, looks: Array) -> Array:
    """The same bet with every request as its own unit (invalid with sticky users)."""
    share = _share_at(users.request_time, RAMP)
    return _process(
        users.request_time,
        users.request_failed.astype(float),
        users.request_treated,
        share,
        looks,
    )


def pooled_harm_fires(users: Users, looks: Array) -> bool:
    """The previous guardrail: pooled per-request counts, one-sided harm test, burn-in."""
    index = np.searchsorted(np.sort(users.request_time), looks, side="right")
    order = np.argsort(users.request_time)
    treated = users.request_treated[order]
    failed = users.request_failed[order]
    n_b, x_b = np.r_[0, np.cumsum(treated)][index], np.r_[0, np.cumsum(failed & treated)][index]
    n_a, x_a = index - n_b, np.r_[0, np.cumsum(failed & ~treated)][index]
    ok = (np.minimum(n_a, n_b) >= 100) & (np.minimum(x_a, x_b) >= 10)
    if not ok.any():
        return False
    with np.errstate(divide="ignore", invalid="ignore"):
        z = proportion_harm_z(x_a[ok], n_a[ok], x_b[ok], n_b[ok], ratio=1.0, lower_is_better=True)
    threshold = harm_threshold(n_a[ok] + n_b[ok], alpha=ALPHA, n_star=N_STAR)
    return bool(np.any(np.nan_to_num(z, nan=-np.inf) > threshold))


@dataclass(frozen=True)
class Rates:
    runs: int
    users: int
    per_request_betting: int
    pooled_harm: int


def false_rollbacks(runs: int, *, shape: float, seed: int, pooled: bool = True) -> Rates:
    rng = np.random.default_rng(seed)
    looks = np.arange(LOOK_S, STEP_S * len(RAMP) + SLOW_S + 2 * LOOK_S, LOOK_S)
    threshold = math.log(1 / ALPHA)
    user_alarms = request_alarms = pooled_alarms = 0
    for _ in range(runs):
        users = simulate(rng, shape=shape)
        user_alarms += bool((user_guardrail(users, looks) >= threshold).any())
        request_alarms += bool((request_betting(users, looks) >= threshold).any())
        if pooled:
            pooled_alarms += pooled_harm_fires(users, looks)
    return Rates(runs, user_alarms, request_alarms, pooled_alarms)


def detection(runs: int, *, canary_rate: float, ramp: tuple[float, ...], seed: int) -> Array:
    """Per run: (canary users, canary requests, seconds) before the rollback; inf if never."""
    rng = np.random.default_rng(seed)
    threshold = math.log(1 / ALPHA)
    looks = np.arange(1.0, STEP_S * len(ramp) + SLOW_S, 1.0)
    found = []
    for _ in range(runs):
        users = simulate(rng, ramp=ramp, canary_rate=canary_rate, control_rate=0.0)
        fired = np.nonzero(user_guardrail(users, looks) >= threshold)[0]
        if not fired.size:
            found.append((np.inf, np.inf, np.inf))
            continue
        at = looks[fired[0]]
        canary_users = int((users.treated & (users.arrival <= at)).sum())
        canary_requests = int((users.request_treated & (users.request_time <= at)).sum())
        found.append((canary_users, canary_requests, at))
    return np.asarray(found, dtype=float)


def wilson(count: int, runs: int) -> tuple[float, float]:
    low, high = proportion_confint(count, runs, alpha=0.05, method="wilson")
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    print(
        f"A/A ramp {' -> '.join(f'{s:.0%}' for s in RAMP)}, {STEP_S:.0f} s steps, "
        f"{USERS_PER_S:g} new users/s, error rate doubling from {BASE_RATE:.0%}, "
        f"alpha {ALPHA}, {args.runs} runs per world"
    )
    print(f"{'world':<37}{'guardrail':<30}{'false rollbacks':>16}  Wilson 95%")
    for shape in (2.0, 0.3):
        start = time.perf_counter()
        rates = false_rollbacks(args.runs, shape=shape, seed=SEED + int(shape * 10))
        world = f"sticky users, gamma({shape:g}) propensity"
        for label, count in (
            ("users, betting (shipped)", rates.users),
            ("per-request betting", rates.per_request_betting),
            ("pooled per-request harm test", rates.pooled_harm),
        ):
            low, high = wilson(count, rates.runs)
            print(f"{world:<37}{label:<30}{count / rates.runs:>15.1%}  [{low:.1%}, {high:.1%}]")
        print(f"  ({time.perf_counter() - start:.0f} s)")
    runs = max(args.runs // 5, 20)
    for label, rate, ramp in (
        ("error-free control vs 10% canary at a 5% step", 0.10, (0.05,) * 5),
        ("canary failing every request, 1% step", 1.0, (0.01,) * 5),
        ("canary failing every request, 5% step", 1.0, (0.05,) * 5),
    ):
        found = detection(runs, canary_rate=rate, ramp=ramp, seed=SEED + 7)
        caught = np.isfinite(found[:, 0])
        median = np.median(found, axis=0)
        print(
            f"{label}: rolled back in {caught.mean():.0%} of {runs} runs; median "
            f"{median[0]:.0f} canary users, {median[1]:.0f} canary requests, "
            f"{median[2]:.0f} s after the start"
        )


if __name__ == "__main__":
    main()
