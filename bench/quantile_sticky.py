"""Benchmark: the p95 latency guardrail with the user as the unit, against the per-request one.

Part 1, A/A ramps with sticky users (STATS.md 12.4 (iv)). The world of `bench.ramp_aa` (ramp
1 -> 5 -> 10 -> 25 -> 50%, 600 s steps, one new user per second, Pareto(1.2) requests per user
spaced by exponential gaps of 10 s, sticky hashing) with latencies instead of errors: a request
of user i at time t takes ``100 ms x (1 + t / duration) x f_i x exp(N(0, 0.5^2))``, with the
user's own factor ``f_i = exp(N(0, s^2))`` (s = 0.5 by default: payloads, regions, clients), the
same in both arms. Guardrails (p95, margin 0, alpha 5%) on the same data:

* users (the shipped guardrail, `analysis.stats.quantile_users`): each user's share of requests
  above control's p95 over control's 10-second buckets that ended before the user's first
  request (at least 60 s and 200 requests back), bet with the known share, fast (3 s) and slow
  (60 s) windows averaged, bets placed when a window closes plus the settle time;
* per-request exceedance e-process (the previous guardrail, `analysis.stats.quantile_exceedance`):
  10-second buckets merged into windows of at least 200 requests.

Reported: false rollbacks with the Wilson 95% interval (target: upper bound <= alpha).

Part 2, detection. (a) p95 +20% with one request per user: a 10% canary 20% slower at every
quantile (log-normal, median 100 ms, sigma 0.5), the scenario of `bench.quantile_power`; users
arrive one by one, the threshold comes from control's earlier requests (buckets of 50
requests, at least 200 control requests back), one outcome window; stopping size = canary
requests at the first look (every 50 canary requests) where the e-value reaches 1 / alpha,
against the fixed-horizon size of `bench.quantile_power` (one-sided, 80% power). (b) The same
+20% canary in the sticky world (user factor exp(N(0, 0.5^2))) at a fixed 10% step, with 10
and 3 new users per second: with users this different from each other, detection needs
hundreds of canary users, however many requests they send. (c) A canary at a constant
1,000 ms against a variable 100 ms control at a fixed 5% step.

Run from the repository root: `.venv/bin/python -m bench.quantile_sticky` (`--runs 500`,
`--power-runs 500`; a few minutes).
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

from analysis.stats.betting import bet_log_factors, log_mean_exp
from analysis.stats.quantile_exceedance import DenseWindows, harm_log_e_path, merge_windows
from analysis.stats.quantile_users import ControlHistory, thresholds
from bench.ramp_aa import FAST_S, RAMP, SETTLE_S, SLOW_S, STEP_S, Users, simulate
from routing.observe.histogram import LogHistogram

ALPHA = 0.05
P = 0.95
BUCKET_S = 10.0
LOOK_S = 10.0
MEDIAN_MS, SIGMA = 100.0, 0.5
SEED = 20261212
_REFERENCE = LogHistogram()
_INVERSE_LOG_GAMMA = 1.0 / math.log(_REFERENCE.upper_edge(1) / _REFERENCE.upper_edge(0))
_THRESHOLD = math.log(1 / ALPHA)

Array = NDArray[Any]


def bucket_index(values: Array) -> Array:
    """routing.observe.histogram's bucket rule, vectorised: ceil(log(x) / log(gamma))."""
    return np.ceil(np.log(values) * _INVERSE_LOG_GAMMA).astype(np.int64)


@dataclass(frozen=True)
class World:
    users: Users
    latency_ms: Array  # per request


def latency_world(
    rng: np.random.Generator,
    *,
    user_sigma: float = 0.5,
    ramp: tuple[float, ...] = RAMP,
    canary_factor: float = 1.0,
    canary_constant_ms: float | None = None,
    users_per_s: float = 1.0,
) -> World:
    """A sticky-user population (bench.ramp_aa) with per-request latencies."""
    users = simulate(rng, ramp=ramp, users_per_s=users_per_s)
    duration = STEP_S * len(ramp)
    factor = np.exp(rng.normal(0.0, user_sigma, users.arrival.size))
    scale = MEDIAN_MS * (1.0 + users.request_time / duration) * factor[users.request_user]
    scale = np.where(users.request_treated, scale * canary_factor, scale)
    latency = rng.lognormal(np.log(scale), SIGMA)
    if canary_constant_ms is not None:
        latency = np.where(users.request_treated, canary_constant_ms, latency)
    return World(users, latency)


def _dense_history(bucket: Array, index: Array, *, bucket_s: float) -> ControlHistory:
    """`ControlHistory` of requests given by time bucket number and histogram index."""
    low = int(index.min())
    counts = np.zeros((int(bucket.max()) + 2, int(index.max()) - low + 1), dtype=np.int64)
    np.add.at(counts, (bucket + 1, index - low), 1)
    occupied = np.flatnonzero(counts[1:].sum(axis=1))
    rows = np.vstack([counts[:1], counts[1:][occupied]])
    ends = (occupied + 1) * bucket_s
    return ControlHistory(ends.astype(float), np.cumsum(rows, axis=0), low)


def _control_history(world: World) -> ControlHistory:
    users = world.users
    control = ~users.request_treated
    bucket = np.floor(users.request_time[control] / BUCKET_S).astype(np.int64)
    return _dense_history(bucket, bucket_index(world.latency_ms[control]), bucket_s=BUCKET_S)


def _process(bet_time: Array, outcome: Array, treated: Array, share: Array, looks: Array) -> Array:
    """The harm e-process's log e-value at each look (users bet in order of their bet time)."""
    order = np.argsort(bet_time, kind="stable")
    harm, _ = bet_log_factors(
        outcome[order], treated[order], share[order], 1 - share[order], margin=0.0
    )
    wealth = np.vstack([np.zeros((1, harm.shape[1])), np.cumsum(harm, axis=0)])
    done = np.searchsorted(bet_time[order], looks, side="right")
    return np.array([log_mean_exp(wealth[k]) for k in done])


def user_guardrail(world: World, looks: Array, *, shift: int = 0) -> Array:
    """The shipped guardrail's combined (fast + slow) log e-value at each look."""
    users = world.users
    threshold, found = thresholds(_control_history(world), users.arrival, p=P)
    limit = threshold + np.where(users.treated, shift, 0)
    above = bucket_index(world.latency_ms) > limit[users.request_user]
    age = users.request_time - users.arrival[users.request_user]
    values = []
    for window in (FAST_S, SLOW_S):
        inside = age <= window
        n = np.bincount(users.request_user[inside], minlength=users.arrival.size)
        x = np.bincount(
            users.request_user[inside], weights=above[inside], minlength=users.arrival.size
        )
        outcome = np.where(n > 0, x / np.maximum(n, 1), 0.0)
        bet = found & (n > 0)
        values.append(
            _process(
                (users.arrival + window + SETTLE_S)[bet],
                outcome[bet],
                users.treated[bet],
                users.share[bet],
                looks,
            )
        )
    return np.logaddexp(values[0], values[1]) - math.log(2)


def request_exceedance_fires(world: World) -> bool:
    """The previous guardrail: the per-request exceedance e-process over time windows."""
    users = world.users
    bucket = np.floor(users.request_time / BUCKET_S).astype(np.int64)
    index = bucket_index(world.latency_ms)
    low = int(index.min())
    width = int(index.max()) - low + 1
    count = int(bucket.max()) + 1
    per_arm = np.zeros((2, count, width), dtype=np.int64)
    np.add.at(per_arm, (users.request_treated.astype(int), bucket, index - low), 1)
    sizes = [(int(a.sum()), int(b.sum())) for a, b in zip(per_arm[0], per_arm[1], strict=True)]
    groups = merge_windows(
        [(_Sized(a), _Sized(b)) for a, b in sizes],  # type: ignore[misc]
        200,
    )
    # Rebuild the merged windows' dense counts from the group sizes (buckets in order).
    rows_a, rows_b, start = [], [], 0
    for group in groups:
        end = start + len(group)
        rows_a.append(per_arm[0, start:end].sum(axis=0))
        rows_b.append(per_arm[1, start:end].sum(axis=0))
        start = end
    if not rows_a:
        return False
    dense = DenseWindows(
        control=np.asarray(rows_a),
        treatment=np.asarray(rows_b),
        first_index=low,
        log_ratio=1.0 / _INVERSE_LOG_GAMMA,
        lower_edges=np.zeros(width),
        upper_edges=np.zeros(width),
        representatives=np.zeros(width),
    )
    return bool((harm_log_e_path(dense, p=P) >= _THRESHOLD).any())


class _Sized:
    """Just enough of a histogram for `merge_windows`, which looks only at counts."""

    def __init__(self, count: int) -> None:
        self.count = count


@dataclass(frozen=True)
class Rates:
    runs: int
    users: int
    per_request: int


def false_rollbacks(runs: int, *, user_sigma: float, seed: int, per_request: bool = True) -> Rates:
    rng = np.random.default_rng(seed)
    looks = np.arange(LOOK_S, STEP_S * len(RAMP) + SLOW_S + 2 * LOOK_S, LOOK_S)
    user_alarms = request_alarms = 0
    for _ in range(runs):
        world = latency_world(rng, user_sigma=user_sigma)
        user_alarms += bool((user_guardrail(world, looks) >= _THRESHOLD).any())
        if per_request:
            request_alarms += request_exceedance_fires(world)
    return Rates(runs, user_alarms, request_alarms)


def detection(runs: int, *, seed: int, ramp: tuple[float, ...], **world: Any) -> Array:
    """Per run: (canary users, canary requests, seconds) before the rollback; inf if never."""
    rng = np.random.default_rng(seed)
    looks = np.arange(1.0, STEP_S * len(ramp) + SLOW_S, 1.0)
    found = []
    for _ in range(runs):
        sim = latency_world(rng, ramp=ramp, **world)
        fired = np.nonzero(user_guardrail(sim, looks) >= _THRESHOLD)[0]
        if not fired.size:
            found.append((np.inf, np.inf, np.inf))
            continue
        at = looks[fired[0]]
        users = sim.users
        canary_users = int((users.treated & (users.arrival <= at)).sum())
        canary_requests = int((users.request_treated & (users.request_time <= at)).sum())
        found.append((canary_users, canary_requests, at))
    return np.asarray(found, dtype=float)


def one_request_stopping_sizes(
    runs: int,
    *,
    seed: int,
    canary_share: float = 0.10,
    regression: float = 0.20,
    look_every: int = 50,
    max_canary: int = 5_000,
) -> Array:
    """Canary requests at the first look (every ``look_every``) where the user bet fires."""
    rng = np.random.default_rng(seed)
    total = int(max_canary / canary_share)
    chunk = 50  # requests per "time" bucket of the control history
    stopped = np.full(runs, np.inf)
    for run in range(runs):
        treated = rng.random(total) < canary_share
        latency = rng.lognormal(np.log(MEDIAN_MS * np.where(treated, 1 + regression, 1.0)), SIGMA)
        index = bucket_index(latency)
        bucket = np.arange(total) // chunk
        history = _dense_history(bucket[~treated], index[~treated], bucket_s=1.0)
        limit, found = thresholds(history, bucket.astype(float), p=P, lookback_s=0.0)
        # One request per user: its outcome is whether that request is above the threshold.
        outcome = (index[found] > limit[found]).astype(float)
        share = np.full(int(found.sum()), canary_share)
        harm, _ = bet_log_factors(outcome, treated[found], share, 1 - share, margin=0.0)
        wealth = np.cumsum(harm, axis=0)
        top = wealth.max(axis=1)
        log_e = top + np.log(np.exp(wealth - top[:, None]).mean(axis=1))
        canary_seen = np.cumsum(treated)[found]
        # Looks after every `look_every` canary requests: the e-value of the users so far.
        sizes = np.arange(look_every, max_canary + 1, look_every)
        last = np.searchsorted(canary_seen, sizes, side="right") - 1
        at_looks = np.where(last >= 0, log_e[np.maximum(last, 0)], 0.0)
        hits = np.flatnonzero(at_looks >= _THRESHOLD)
        if hits.size:
            stopped[run] = sizes[hits[0]]
    return stopped


def wilson(count: int, runs: int) -> tuple[float, float]:
    low, high = proportion_confint(count, runs, alpha=0.05, method="wilson")
    return float(low), float(high)


def main() -> None:
    from bench.quantile_power import Scenario, fixed_horizon_canary_size

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--power-runs", type=int, default=500)
    args = parser.parse_args()
    print(
        f"A/A ramp {' -> '.join(f'{s:.0%}' for s in RAMP)}, {STEP_S:.0f} s steps, sticky users "
        f"(Pareto(1.2) requests), latency doubling, p95, margin 0, alpha {ALPHA}, "
        f"{args.runs} runs per world"
    )
    for user_sigma in (0.0, 0.2, 0.5):
        start = time.perf_counter()
        rates = false_rollbacks(args.runs, user_sigma=user_sigma, seed=SEED + int(user_sigma * 10))
        for label, count in (
            ("users, betting (shipped)", rates.users),
            ("per-request exceedance e-process", rates.per_request),
        ):
            low, high = wilson(count, rates.runs)
            print(
                f"  user factor exp(N(0, {user_sigma:g}^2)), {label:<34}"
                f"{count}/{rates.runs} = {count / rates.runs:.1%}  [{low:.1%}, {high:.1%}]"
            )
        print(f"  ({time.perf_counter() - start:.0f} s)")
    scenario = Scenario(
        alpha=ALPHA,
        canary_share=0.10,
        regression=0.20,
        sigma=SIGMA,
        median_ms=MEDIAN_MS,
        look_every=500,
        max_total=200_000,
        t_opt=1_000.0,
        replications=0,
        seed=SEED,
    )
    fixed = fixed_horizon_canary_size(scenario)
    stopped = one_request_stopping_sizes(args.power_runs, seed=SEED + 1)
    q = {k: float(np.percentile(stopped, k)) for k in (50, 80, 90)}
    print(
        f"p95 +20%, 10% canary, one request per user, {args.power_runs} runs: caught "
        f"{np.isfinite(stopped).mean():.1%}; canary n median {q[50]:,.0f} ({q[50] / fixed:.2f}x "
        f"the fixed horizon {fixed:,}), 80th {q[80]:,.0f} ({q[80] / fixed:.2f}x), "
        f"90th {q[90]:,.0f} ({q[90] / fixed:.2f}x)"
    )
    runs = max(args.power_runs // 10, 20)
    for label, ramp, world in (
        (
            "p95 +20% (every quantile), sticky users, 10 new users/s, 10% step",
            (0.10,) * 5,
            {"canary_factor": 1.2, "users_per_s": 10.0},
        ),
        (
            "the same at 3 new users/s",
            (0.10,) * 5,
            {"canary_factor": 1.2, "users_per_s": 3.0},
        ),
        (
            "constant 1,000 ms canary vs 100 ms control, 5% step",
            (0.05,) * 5,
            {"canary_constant_ms": 1000.0},
        ),
    ):
        found = detection(runs, seed=SEED + 2, ramp=ramp, **world)
        caught = np.isfinite(found[:, 0])
        median = np.median(found, axis=0)
        print(
            f"{label}: rolled back in {caught.mean():.0%} of {runs} runs; median "
            f"{median[0]:.0f} canary users, {median[1]:.0f} canary requests, "
            f"{median[2]:.0f} s after the start"
        )


if __name__ == "__main__":
    main()
