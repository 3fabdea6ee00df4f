"""Benchmark: the LLM guardrails (p95 TTFT, cost per request) with the user as the unit.

The world (STATS.md 12.4 (iv), for generative models). The sticky-user population of
`bench.ramp_aa`: a ramp 1 -> 5 -> 10 -> 25 -> 50% with 600 s steps, one new user per second,
Pareto(1.2) answers per user spaced by exponential gaps of 10 s, sticky hashing. Each user
has its own prompt length and answer length, so its own TTFT factor ``f_i = exp(N(0, s^2))``
and cost factor ``g_i = exp(N(0, c^2))`` (s = 0.5, c = 0.7; the same in both arms). An answer
of user i at time t has

* TTFT ``300 ms x (1 + t / duration) x f_i x exp(N(0, 0.4^2))`` (load doubles over the run);
* cost ``$3e-4 x g_i x exp(N(0, 0.4^2))`` (tokens times the price, as the proxy derives it).

Guardrails on the same data, margin 0, alpha 5%:

* p95 TTFT, per user (shipped: `analysis.stats.quantile_users` on the users' TTFT buckets, the
  bet of `bench.quantile_sticky.user_guardrail`: each user's share of answers above control's
  p95 over control's buckets that closed before its first request, fast 3 s and slow 60 s
  windows averaged), against the per-request exceedance e-process the TTFT guardrail used
  before (`bench.quantile_sticky.request_exceedance_fires`);
* cost per request, per user (shipped: per-user cost sum over priced answers within 60 s, the
  delta-method ratio in ramp-step strata with Mantel-Haenszel weights,
  `analysis.stats.latency_mean`; `bench.ramp_latency.alarms` "users, stratified"), against the
  per-request pooled mean the cost guardrail used before ("requests, pooled").

Reported: A/A false rollbacks with Wilson 95% intervals (target: the shipped guardrails' upper
bound at most alpha), then detection of a slow and expensive candidate (TTFT x 1.5, cost x 2
at every answer) at margins 0.2 (TTFT) and 0.5 (cost), during the ramp, at a fixed 10% step
and at a 50% split: the share of runs rolled back and the median number of canary users and
answers (and seconds) when each guardrail fired.

Run from the repository root: `.venv/bin/python -m bench.llm_sticky` (`--runs 500`; a few
minutes).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analysis.stats.quantile_users import margin_shift
from bench import quantile_sticky, ramp_latency
from bench.ramp_aa import RAMP, SETTLE_S, SLOW_S, STEP_S, Users, simulate, wilson
from routing.observe.histogram import LogHistogram

ALPHA = 0.05
SEED = 20261217
TTFT_MS, TTFT_USER_SIGMA = 300.0, 0.5
COST, COST_USER_SIGMA = 3e-4, 0.7
NOISE_SIGMA = 0.4
_REFERENCE = LogHistogram()
_LOG_RATIO = math.log(_REFERENCE.upper_edge(1) / _REFERENCE.upper_edge(0))
_THRESHOLD = math.log(1 / ALPHA)

Array = NDArray[Any]


@dataclass(frozen=True)
class LLMWorld:
    """One run: the population and each answer's TTFT and cost."""

    users: Users
    ttft_ms: Array
    cost: Array
    ramp: tuple[float, ...]


def llm_world(
    rng: np.random.Generator,
    *,
    ramp: tuple[float, ...] = RAMP,
    ttft_factor: float = 1.0,
    cost_factor: float = 1.0,
    ttft_user_sigma: float = TTFT_USER_SIGMA,
    cost_user_sigma: float = COST_USER_SIGMA,
    users_per_s: float = 1.0,
) -> LLMWorld:
    """A sticky-user population of generative answers; the canary's answers scaled."""
    users = simulate(rng, ramp=ramp, users_per_s=users_per_s)
    count, n = users.arrival.size, users.request_time.size
    duration = STEP_S * len(ramp)
    f = np.exp(rng.normal(0.0, ttft_user_sigma, count))
    g = np.exp(rng.normal(0.0, cost_user_sigma, count))
    canary = users.request_treated
    ttft = TTFT_MS * (1 + users.request_time / duration) * f[users.request_user]
    ttft = ttft * np.exp(rng.normal(0.0, NOISE_SIGMA, n)) * np.where(canary, ttft_factor, 1.0)
    cost = COST * g[users.request_user] * np.exp(rng.normal(0.0, NOISE_SIGMA, n))
    return LLMWorld(users, ttft, cost * np.where(canary, cost_factor, 1.0), ramp)


def _step(t: Array, ramp: tuple[float, ...]) -> Array:
    return np.minimum((t // STEP_S).astype(int), len(ramp) - 1)


def cost_population(world: LLMWorld) -> ramp_latency.Population:
    """The cost per answer as `bench.ramp_latency`'s population (user sums within 60 s)."""
    users = world.users
    count = users.arrival.size
    offset = users.request_time - users.arrival[users.request_user]
    inside = offset <= SLOW_S
    user_m = np.bincount(users.request_user[inside], weights=world.cost[inside], minlength=count)
    user_d = np.bincount(users.request_user[inside], minlength=count).astype(float)
    return ramp_latency.Population(
        arrival=users.arrival,
        user_arm=users.treated.astype(int),
        user_step=_step(users.arrival, world.ramp),
        user_m=user_m,
        user_d=user_d,
        request_time=users.request_time,
        request_arm=users.request_treated.astype(int),
        request_step=_step(users.request_time, world.ramp),
        request_latency=world.cost,
    )


def _ttft_world(world: LLMWorld) -> quantile_sticky.World:
    return quantile_sticky.World(world.users, world.ttft_ms)


def quantile_looks(ramp: tuple[float, ...]) -> Array:
    return np.arange(10.0, STEP_S * len(ramp) + SLOW_S + SETTLE_S + 20.0, 10.0)


def cost_looks(ramp: tuple[float, ...]) -> Array:
    return np.arange(30.0, STEP_S * len(ramp) + SLOW_S + SETTLE_S + 30.0, 30.0)


@dataclass(frozen=True)
class AARates:
    runs: int
    ttft_users: int
    ttft_requests: int
    cost_users: int
    cost_requests: int


def false_rollbacks(runs: int, *, seed: int) -> AARates:
    """A/A runs each guardrail ever rolled back (the same worlds for all four)."""
    rng = np.random.default_rng(seed)
    q_looks, c_looks = quantile_looks(RAMP), cost_looks(RAMP)
    counts = [0, 0, 0, 0]
    for _ in range(runs):
        world = llm_world(rng)
        ttft = _ttft_world(world)
        counts[0] += bool((quantile_sticky.user_guardrail(ttft, q_looks) >= _THRESHOLD).any())
        counts[1] += quantile_sticky.request_exceedance_fires(ttft)
        alarms = ramp_latency.alarms(cost_population(world), c_looks)
        counts[2] += alarms["users, stratified"] >= 0
        counts[3] += alarms["requests, pooled"] >= 0
    return AARates(runs, *counts)


def detection(
    runs: int,
    *,
    seed: int,
    ramp: tuple[float, ...] = RAMP,
    ttft_factor: float = 1.5,
    cost_factor: float = 2.0,
    ttft_margin: float = 0.2,
    cost_margin: float = 0.5,
) -> dict[str, Array]:
    """Per guardrail and run: (canary users, canary answers, seconds) when it first fired
    (inf if never), for a canary slower and dearer at every answer."""
    rng = np.random.default_rng(seed)
    q_looks, c_looks = quantile_looks(ramp), cost_looks(ramp)
    shift = margin_shift(ttft_margin, _LOG_RATIO)
    found: dict[str, list[tuple[float, float, float]]] = {"ttft": [], "cost": []}
    for _ in range(runs):
        world = llm_world(rng, ramp=ramp, ttft_factor=ttft_factor, cost_factor=cost_factor)
        users = world.users
        fired = np.flatnonzero(
            quantile_sticky.user_guardrail(_ttft_world(world), q_looks, shift=shift) >= _THRESHOLD
        )
        look = ramp_latency.alarms(cost_population(world), c_looks, margin=cost_margin)[
            "users, stratified"
        ]
        for key, at in (
            ("ttft", q_looks[fired[0]] if fired.size else math.inf),
            ("cost", c_looks[look] if look >= 0 else math.inf),
        ):
            if not math.isfinite(at):
                found[key].append((math.inf, math.inf, math.inf))
                continue
            canary_users = int((users.treated & (users.arrival <= at)).sum())
            answers = int((users.request_treated & (users.request_time <= at)).sum())
            found[key].append((canary_users, answers, float(at)))
    return {key: np.asarray(rows, dtype=float) for key, rows in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--detection-runs", type=int, default=100)
    args = parser.parse_args()
    print(
        f"A/A ramp {' -> '.join(f'{s:.0%}' for s in RAMP)}, {STEP_S:.0f} s steps, sticky users "
        f"(Pareto(1.2) answers, TTFT factor sigma {TTFT_USER_SIGMA}, cost factor sigma "
        f"{COST_USER_SIGMA}), TTFT doubling, margin 0, alpha {ALPHA}, {args.runs} runs"
    )
    start = time.perf_counter()
    rates = false_rollbacks(args.runs, seed=SEED)
    for label, count in (
        ("p95 TTFT, users, betting (shipped)", rates.ttft_users),
        ("p95 TTFT, per-request exceedance e-process (before)", rates.ttft_requests),
        ("cost per request, users, strata (shipped)", rates.cost_users),
        ("cost per request, requests pooled (before)", rates.cost_requests),
    ):
        low, high = wilson(count, rates.runs)
        print(
            f"  {label:<54}{count:>4}/{rates.runs} = {count / rates.runs:>5.1%}  "
            f"[{low:.1%}, {high:.1%}]"
        )
    print(f"  ({time.perf_counter() - start:.0f} s)")
    for label, ramp in (
        ("ramp 1 -> 50%", RAMP),
        ("fixed 10% canary", (0.10,) * len(RAMP)),
        ("50% split", (0.50,) * len(RAMP)),
    ):
        start = time.perf_counter()
        found = detection(args.detection_runs, seed=SEED + 1, ramp=ramp)
        for key, name in (("ttft", "p95 TTFT (margin 20%)"), ("cost", "cost/request (50%)")):
            rows = found[key]
            caught = np.isfinite(rows[:, 0])
            median = np.median(rows[caught], axis=0) if caught.any() else [math.nan] * 3
            print(
                f"TTFT x1.5, cost x2, {label}, {name}: rolled back in {caught.sum()}/"
                f"{len(rows)} runs; median {median[0]:.0f} canary users, {median[1]:.0f} canary "
                f"answers, {median[2]:.0f} s after the start"
            )
        print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
