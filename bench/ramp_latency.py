"""Benchmark: false rollbacks and detection of the mean-latency guardrail over a canary ramp.

World (STATS.md 12.4 (i) and (iv)): an A/A canary ramps 1 -> 5 -> 10 -> 25 -> 50% in five
equal steps. Users arrive at a steady rate and are sticky (a uniform hash u: canary while
u < the share, so a ramp step only moves users from control to the canary). Each sends
one request, or (sticky worlds) a Pareto(1.2)-distributed number of requests (capped at
1,000) spaced by exponential gaps. A request's latency is base(t) * f_user * exp(0.3 Z):
base(t) is 100 ms, or (drift worlds) rises linearly from 100 to 200 ms over the run, and
f_user = exp(sigma N(0, 1)) is the user's own level (payload, region, client).

Mean-latency guardrails compared on the same data (margin 0, alpha = 0.05 for the one
guardrail, N* = 10,000, burn-in 100 units per arm, a look every LOOK_S seconds), all with
the harm test of `analysis.stats.harm` (Fieller contrast, GrowthBook eq. (134) boundary):

* users, stratified (the shipped guardrail, `analysis.stats.latency_mean`): per-user latency
  sum and count within SLOW_S of the first request (the user's arm and stratum are those of
  its first request), counted once its window has closed and settled, a ratio metric with
  the delta-method variance, ramp steps combined by `analysis.stats.strata.standardize`;
* users, pooled: the same per-user sums pooled over the whole run (not contemporaneous);
* requests, stratified: every request its own unit, compared within ramp steps;
* requests, pooled: the previous guardrail (every request pooled over the run).

Reported: the false-rollback rate with its Wilson 95% interval (target: upper bound <=
alpha for the shipped guardrail). Detection: a canary at a constant 1,000 ms against a
variable 100 ms control, and a canary 20% slower than control on every request (users and
seconds before the rollback).

Run from the repository root: `.venv/bin/python -m bench.ramp_latency` (about two minutes
at 500 runs), `--runs N` to change the number of runs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from statsmodels.stats.proportion import proportion_confint

from analysis.stats.degenerate import is_constant
from analysis.stats.harm import harm_threshold, mean_harm_z
from analysis.stats.moments import MeanStats, MetricStats, RatioStats
from analysis.stats.strata import POOLED, STRATIFIED, standardize

ALPHA = 0.05
RAMP = (0.01, 0.05, 0.10, 0.25, 0.50)
STEP_S = 600.0
USERS_PER_S = 1.0
GAP_MEAN_S = 2.0
SLOW_S, SETTLE_S = 60.0, 2.5
LOOK_S = 30.0
BASE_MS = 100.0
NOISE_SIGMA = 0.3
N_STAR = 10_000.0
MIN_UNITS = 100
SEED = 20261204

Array = NDArray[Any]
ANALYSES = ("users, stratified", "users, pooled", "requests, stratified", "requests, pooled")


@dataclass(frozen=True)
class World:
    label: str
    drift: bool
    sticky: bool
    sigma: float


WORLDS = (
    World("latency doubling, one request per user", drift=True, sticky=False, sigma=0.0),
    World("sticky users, Pareto(1.2) requests, sigma 0.5", drift=False, sticky=True, sigma=0.5),
    World("both: doubling and sticky users, sigma 0.5", drift=True, sticky=True, sigma=0.5),
)


@dataclass(frozen=True)
class Population:
    """One simulated run: per user (first request) and per request."""

    arrival: Array
    user_arm: Array  # 1 for the canary at the first request
    user_step: Array
    user_m: Array  # latency sum within SLOW_S of the first request
    user_d: Array  # requests within SLOW_S
    request_time: Array
    request_arm: Array  # the arm serving the request (ramp steps move users)
    request_step: Array
    request_latency: Array


def _step(t: Array, ramp: tuple[float, ...]) -> Array:
    return np.minimum((t // STEP_S).astype(int), len(ramp) - 1)


def simulate(
    rng: np.random.Generator,
    world: World,
    *,
    ramp: tuple[float, ...] = RAMP,
    canary: Callable[[Array], Array] | None = None,
) -> Population:
    """A population over the ramp; `canary` maps control-like latencies to the canary's."""
    duration = STEP_S * len(ramp)
    count = rng.poisson(USERS_PER_S * duration)
    arrival = np.sort(rng.uniform(0, duration, count))
    u = rng.random(count)
    if world.sticky:
        requests = np.minimum(np.floor(rng.pareto(1.2, count) + 1), 1000).astype(int)
    else:
        requests = np.ones(count, dtype=int)
    level = np.exp(world.sigma * rng.standard_normal(count))
    user = np.repeat(np.arange(count), requests)
    gaps = rng.exponential(GAP_MEAN_S, user.size)
    first = np.r_[0, np.cumsum(requests)[:-1]]
    gaps[first] = 0.0
    offset = np.cumsum(gaps)
    offset -= np.repeat(offset[first], requests)
    at = arrival[user] + offset
    keep = at < duration
    user, at, offset = user[keep], at[keep], offset[keep]
    shares = np.asarray(ramp)
    arm = (u[user] < shares[_step(at, ramp)]).astype(int)
    base = BASE_MS * (1 + at / duration) if world.drift else np.full(at.size, BASE_MS)
    latency = base * level[user] * np.exp(NOISE_SIGMA * rng.standard_normal(at.size))
    if canary is not None:
        latency = np.where(arm == 1, canary(latency), latency)
    inside = offset <= SLOW_S
    user_m = np.bincount(user[inside], weights=latency[inside], minlength=count)
    user_d = np.bincount(user[inside], minlength=count).astype(float)
    user_step = _step(arrival, ramp)
    user_arm = (u < shares[user_step]).astype(int)
    return Population(
        arrival, user_arm, user_step, user_m, user_d, at, arm, _step(at, ramp), latency
    )


def _cumulative(
    ready: Array, arm: Array, stratum: Array, columns: list[Array], looks: Array, strata: int
) -> Array:
    """Sums per look, arm and stratum: shape (looks, 2, strata, 1 + len(columns))."""
    order = np.argsort(ready, kind="stable")
    done = np.searchsorted(ready[order], looks, side="right")
    out = np.zeros((looks.size, 2, strata, 1 + len(columns)))
    a, s = arm[order], stratum[order]
    values = [np.ones(order.size), *(c[order] for c in columns)]
    for arm_value in (0, 1):
        for s_value in range(strata):
            mask = (a == arm_value) & (s == s_value)
            for j, column in enumerate(values):
                sums = np.r_[0.0, np.cumsum(np.where(mask, column, 0.0))]
                out[:, arm_value, s_value, j] = sums[done]
    return out


def _stats(sums: Array, ratio: bool) -> MetricStats:
    n = int(sums[0] + 0.5)
    if ratio:
        return RatioStats(n, sums[1], sums[2], sums[3], sums[4], sums[5])
    return MeanStats(n=n, sum=sums[1], sum_squares=sums[2])


def fires(control: MetricStats, treatment: MetricStats, *, alpha: float, margin: float) -> bool:
    """The lower-is-better harm decision of `analysis.stats.guardrails` for these arms."""
    if min(control.n, treatment.n) < MIN_UNITS or control.mean <= 0:
        return False
    ratio = 1 + margin
    if is_constant(control) and is_constant(treatment):
        return treatment.mean / control.mean - 1 > margin
    z = float(
        mean_harm_z(
            control.mean,
            control.variance,
            control.n,
            treatment.mean,
            treatment.variance,
            treatment.n,
            ratio=ratio,
            lower_is_better=True,
        )
    )
    threshold = float(harm_threshold(control.n + treatment.n, alpha=alpha, n_star=N_STAR))
    return math.isfinite(z) and z > threshold


def first_alarm(
    sums: Array, *, ratio: bool, stratified: bool, alpha: float = ALPHA, margin: float = 0.0
) -> int:
    """Index of the first look at which the guardrail fires (-1 if never)."""
    for look in range(sums.shape[0]):
        cells = sums[look]
        if stratified:
            strata = {
                arm: {
                    s: _stats(cells[i, s], ratio) for s in range(cells.shape[1]) if cells[i, s, 0]
                }
                for i, arm in enumerate(("A", "B"))
            }
            construction = STRATIFIED if cells.shape[1] > 1 else POOLED
            combined = standardize(strata, arms=("A", "B"), construction=construction).stats
            if len(combined) < 2:
                continue
            control, treatment = combined["A"], combined["B"]
        else:
            control, treatment = _stats(cells[0].sum(0), ratio), _stats(cells[1].sum(0), ratio)
        if fires(control, treatment, alpha=alpha, margin=margin):
            return look
    return -1


def alarms(population: Population, looks: Array, *, margin: float = 0.0) -> dict[str, int]:
    """For each analysis, the first look that rolls back (-1 if none)."""
    strata = int(max(population.user_step.max(), population.request_step.max())) + 1
    has = population.user_d > 0
    m, d = population.user_m[has], population.user_d[has]
    users = _cumulative(
        population.arrival[has] + SLOW_S + SETTLE_S,
        population.user_arm[has],
        population.user_step[has],
        [m, m * m, d, d * d, m * d],
        looks,
        strata,
    )
    y = population.request_latency
    requests = _cumulative(
        population.request_time,
        population.request_arm,
        population.request_step,
        [y, y * y],
        looks,
        strata,
    )
    return {
        "users, stratified": first_alarm(users, ratio=True, stratified=True, margin=margin),
        "users, pooled": first_alarm(users, ratio=True, stratified=False, margin=margin),
        "requests, stratified": first_alarm(requests, ratio=False, stratified=True, margin=margin),
        "requests, pooled": first_alarm(requests, ratio=False, stratified=False, margin=margin),
    }


def _looks(ramp: tuple[float, ...]) -> Array:
    return np.arange(LOOK_S, STEP_S * len(ramp) + SLOW_S + SETTLE_S + LOOK_S, LOOK_S)


def false_rollbacks(runs: int, world: World, *, seed: int) -> dict[str, int]:
    """Per analysis, the number of A/A runs it ever rolled back."""
    rng = np.random.default_rng(seed)
    looks = _looks(RAMP)
    counts = dict.fromkeys(ANALYSES, 0)
    for _ in range(runs):
        for name, look in alarms(simulate(rng, world), looks).items():
            counts[name] += look >= 0
    return counts


def detection(
    runs: int,
    world: World,
    *,
    canary: Callable[[Array], Array],
    seed: int,
    ramp: tuple[float, ...] = RAMP,
) -> Array:
    """Per run for the shipped guardrail: (users, canary users, seconds) at the rollback."""
    rng = np.random.default_rng(seed)
    looks = _looks(ramp)
    found = []
    for _ in range(runs):
        population = simulate(rng, world, canary=canary, ramp=ramp)
        look = alarms(population, looks)["users, stratified"]
        if look < 0:
            found.append((np.inf, np.inf, np.inf))
            continue
        at = looks[look]
        counted = population.arrival + SLOW_S + SETTLE_S <= at
        found.append(
            (int(counted.sum()), int((counted & (population.user_arm == 1)).sum()), float(at))
        )
    return np.asarray(found, dtype=float)


def constant_slow(latency: Array) -> Array:
    return np.full(latency.shape, 1_000.0)


def twenty_percent_slower(latency: Array) -> Array:
    return latency * 1.2


def wilson(count: int, runs: int) -> tuple[float, float]:
    low, high = proportion_confint(count, runs, alpha=0.05, method="wilson")
    return float(low), float(high)


def main() -> None:
    global GAP_MEAN_S  # the one setting the command line may change
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument(
        "--gap-mean-s",
        type=float,
        default=GAP_MEAN_S,
        help="mean gap between a sticky user's requests (0.05 puts all of them in its window)",
    )
    parser.add_argument("--no-detection", action="store_true")
    args = parser.parse_args()
    GAP_MEAN_S = args.gap_mean_s
    print(
        f"A/A ramp {' -> '.join(f'{s:.0%}' for s in RAMP)}, {STEP_S:.0f} s steps, "
        f"{USERS_PER_S:g} new users/s, {GAP_MEAN_S:g} s between a user's requests, "
        f"mean-latency guardrail, margin 0, alpha {ALPHA}, {args.runs} runs per world"
    )
    print(f"{'world':<50}{'analysis':<24}{'false rollbacks':>16}  Wilson 95%")
    for index, world in enumerate(WORLDS):
        start = time.perf_counter()
        counts = false_rollbacks(args.runs, world, seed=SEED + index)
        for name in ANALYSES:
            low, high = wilson(counts[name], args.runs)
            label = f"{name} (shipped)" if name == "users, stratified" else name
            print(
                f"{world.label:<50}{label:<24}{counts[name]:>5}/{args.runs} "
                f"= {counts[name] / args.runs:>5.1%}  [{low:.1%}, {high:.1%}]"
            )
        print(f"  ({time.perf_counter() - start:.0f} s)")
    if args.no_detection:
        return
    runs = max(args.runs // 5, 20)
    half = (0.5,) * len(RAMP)
    for label, canary, world, ramp in (
        ("constant 1,000 ms canary vs ~100 ms control, ramp", constant_slow, WORLDS[0], RAMP),
        ("constant 1,000 ms canary, 50% split", constant_slow, WORLDS[0], half),
        ("canary 20% slower, ramp, one request per user", twenty_percent_slower, WORLDS[0], RAMP),
        (
            "canary 20% slower, 50% split, one request per user",
            twenty_percent_slower,
            WORLDS[0],
            half,
        ),
        (
            "canary 20% slower, 50% split, sticky users sigma 0.5",
            twenty_percent_slower,
            WORLDS[1],
            half,
        ),
    ):
        found = detection(runs, world, canary=canary, seed=SEED + 7, ramp=ramp)
        caught = np.isfinite(found[:, 0])
        median = np.median(found[caught], axis=0) if caught.any() else [math.nan] * 3
        print(
            f"{label}: rolled back in {caught.mean():.0%} of {runs} runs; median "
            f"{median[0]:.0f} users counted ({median[1]:.0f} canary), {median[2]:.0f} s "
            f"after the start"
        )


if __name__ == "__main__":
    main()
