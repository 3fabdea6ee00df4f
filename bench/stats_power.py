"""Benchmark: traffic the sequential guardrail needs to catch a regression, vs fixed horizon.

Case 1 (rate): the error rate of a 10% canary doubles from 1% to 2% (allocation 90/10), one
request per user. The shipped error-rate guardrail (`analysis.stats.betting`: the exact betting
e-process with the user as the unit, a mixture over relative harms with its prior centred on a
doubling, one guardrail with the whole alpha = 0.05) looks after every batch of 100 users;
next to it, on the same users, its previous bets (an equal-weight grid of bet sizes), and the
per-request harm test (`analysis.stats.harm`, N* from `guardrail_n_star_proportion`, burn-in of
10 events per arm), which is only asymptotic and needs independent requests. Then both
betting constructions for 1% -> 1.5% and 1% -> 3%, against their own fixed-horizon sizes.
Reported: the median, 80th and 90th percentile of the total sample size at which each rolls
back, next to the two-sided fixed-horizon total at 80% power for the same allocation
(statsmodels NormalIndPower with `ratio`, and the pooled-variance formula), measured in the
same run, plus the A/A false-rollback rates. Targets: median <= 0.9x and 80th percentile <=
1.5x the fixed-horizon size (GrowthBook's default two-sided test: about 1.03x and 1.7x,
STATS.md 10.2).

Case 2 (p95 latency): the canary's latencies are 20% slower (log-normal), through the
exceedance e-process of `analysis.stats.quantile_exceedance` on per-batch time windows of
`routing.observe.histogram` buckets (bench/quantile_power.py compares it with fixed horizon).

Run from the repository root: `.venv/bin/python -m bench.stats_power` (a few minutes at most), or
with `--quick`.
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
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from analysis.stats.betting import running_log_e
from analysis.stats.guardrails import GuardrailSettings
from analysis.stats.harm import harm_threshold, proportion_harm_z
from analysis.stats.planning import fixed_horizon_total_n_proportion, guardrail_n_star_proportion
from analysis.stats.quantile_exceedance import harm_log_e_path
from bench.quantile_power import first_crossing, to_windows

ALPHA = 0.05
TREATMENT_SHARE = 0.1
BASE_RATE, HARMED_RATE = 0.01, 0.02
BATCH = 100
SEED = 20240601

Array = NDArray[Any]


@dataclass(frozen=True)
class StoppingSizes:
    median: float
    p80: float
    p90: float
    never: float


def _stopping_sizes(fired: Array, totals: Array) -> StoppingSizes:
    """Total N at the first alarm per run (inf when it never fires within the horizon)."""
    first = np.where(fired.any(axis=1), fired.argmax(axis=1), -1)
    sizes = np.where(first >= 0, totals[np.maximum(first, 0)], np.inf)

    # Order-statistic percentiles, so runs that never stopped (inf) are handled exactly.
    def percentile(q: float) -> float:
        return float(np.percentile(sizes, q, method="inverted_cdf"))

    return StoppingSizes(
        median=percentile(50),
        p80=percentile(80),
        p90=percentile(90),
        never=float(np.isinf(sizes).mean()),
    )


def fixed_horizon_sizes() -> tuple[float, float]:
    """Two-sided 80%-power totals at 90/10: statsmodels NormalIndPower and the pooled formula."""
    effect = proportion_effectsize(HARMED_RATE, BASE_RATE)
    ratio = TREATMENT_SHARE / (1 - TREATMENT_SHARE)
    n_control = NormalIndPower().solve_power(
        effect_size=effect, alpha=ALPHA, power=0.8, ratio=ratio, alternative="two-sided"
    )
    pooled = fixed_horizon_total_n_proportion(
        BASE_RATE, HARMED_RATE, treatment_share=TREATMENT_SHARE, alpha=ALPHA
    )
    return float(n_control * (1 + ratio)), pooled


def rate_guardrail_fired(
    treatment_rate: float, runs: int, looks: int, settings: GuardrailSettings, seed: int
) -> tuple[Array, Array]:
    """Simulate `runs` canaries and apply the guardrail's rule at every look (vectorised)."""
    rng = np.random.default_rng(seed)
    n_b = rng.binomial(BATCH, TREATMENT_SHARE, size=(runs, looks))
    n_a = BATCH - n_b
    x_a = rng.binomial(n_a, BASE_RATE).cumsum(axis=1)
    x_b = rng.binomial(n_b, treatment_rate).cumsum(axis=1)
    n_a, n_b = n_a.cumsum(axis=1), n_b.cumsum(axis=1)
    totals = BATCH * np.arange(1, looks + 1)
    z = proportion_harm_z(x_a, n_a, x_b, n_b, ratio=1.0, lower_is_better=True)
    burned_in = (np.minimum(n_a, n_b) >= settings.min_units_per_arm) & (
        np.minimum(x_a, x_b) >= settings.min_events_per_arm
    )
    threshold = harm_threshold(totals, alpha=settings.alpha, n_star=settings.n_star)
    return burned_in & (z > threshold), totals


# The previous harm bets, for comparison: an equal-weight grid of bet sizes g (a canary user
# multiplied wealth g by 1 + g rho_A y / ((1 + m) rho_B), a control user by 1 - g y).
PREVIOUS_GRID = np.geomspace(1e-3, 0.9, 24)


def previous_log_e(treated: Array, rho_b: float, margin: float = 0.0) -> Array:
    """The previous grid's log e-value after each failing user (one request per user)."""
    odds = (1 - rho_b) / rho_b
    g = PREVIOUS_GRID[None, :]
    factors = np.where(treated[:, None], np.log1p(g * odds / (1 + margin)), np.log1p(-g))
    wealth = np.cumsum(factors, axis=0)
    top = wealth.max(axis=1)
    return np.asarray(top + np.log(np.exp(wealth - top[:, None]).mean(axis=1)), dtype=float)


def shipped_log_e(treated: Array, rho_b: float) -> Array:
    """The shipped guardrail's log e-value after each failing user."""
    size = treated.size
    return running_log_e(
        np.ones(size), treated, np.full(size, rho_b), np.full(size, 1 - rho_b), margin=0.0
    )


def betting_guardrail_fired(
    treatment_rate: float,
    runs: int,
    looks: int,
    seed: int,
    log_e_path: Callable[[Array, float], Array] = shipped_log_e,
) -> tuple[Array, Array]:
    """A betting guardrail on users with one request each, looking after every batch.

    Users without a failure multiply every bet by 1, so only the failing users are folded.
    """
    rng = np.random.default_rng(seed)
    total = BATCH * looks
    totals = BATCH * np.arange(1, looks + 1)
    threshold = math.log(1 / ALPHA)
    fired = np.zeros((runs, looks), dtype=bool)
    for run in range(runs):
        treated = rng.random(total) < TREATMENT_SHARE
        failed = rng.random(total) < np.where(treated, treatment_rate, BASE_RATE)
        where = np.nonzero(failed)[0]
        crossed = np.nonzero(log_e_path(treated[where], TREATMENT_SHARE) >= threshold)[0]
        if crossed.size:
            # The failure that crossed is user where[k]; the look after it sees it.
            first_look = int(where[crossed[0]] // BATCH)
            fired[run, first_look:] = True
    return fired, totals


def quantile_guardrail_fired(
    slowdown: float, runs: int, looks: int, batch: int, seed: int
) -> tuple[Array, Array]:
    """p95 guardrail (margin 0) on log-normal latencies, one time window and look per batch.

    The guardrail `evaluate_guardrails` runs on the analysis' windowed histograms: the
    exceedance e-process of `analysis.stats.quantile_exceedance`.
    """
    rng = np.random.default_rng(seed)
    fired = np.zeros((runs, looks), dtype=bool)
    window = np.repeat(np.arange(looks), batch)
    for run in range(runs):
        in_treatment = rng.random(looks * batch) < TREATMENT_SHARE
        latencies = rng.lognormal(math.log(100), 0.5, looks * batch)
        latencies = np.where(in_treatment, latencies * slowdown, latencies)
        dense = to_windows(window, in_treatment, latencies, looks).dense
        crossing = first_crossing(harm_log_e_path(dense, p=0.95), ALPHA)
        if crossing is not None:
            fired[run, crossing:] = True
    return fired, batch * np.arange(1, looks + 1)


def _timed(label: str, action: Callable[[], tuple[Array, Array]]) -> StoppingSizes:
    start = time.perf_counter()
    fired, totals = action()
    sizes = _stopping_sizes(fired, totals)
    print(f"  ({label}: {time.perf_counter() - start:.1f} s)")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (about 20 s)")
    args = parser.parse_args()
    runs = 1000 if args.quick else 5000
    aa_runs = 1000 if args.quick else 4000
    quantile_runs = 60 if args.quick else 300

    n_star = guardrail_n_star_proportion(
        BASE_RATE, detectable_relative_harm=1.0, treatment_share=TREATMENT_SHARE, alpha=ALPHA
    )
    settings = GuardrailSettings(alpha=ALPHA, n_star=round(n_star))
    statsmodels_n, pooled_n = fixed_horizon_sizes()
    looks = int(6 * pooled_n / BATCH)

    print("Error rate 1% -> 2%, 10% canary (90/10), alpha 0.05, look every 100 units")
    print(f"  N* = two-sided 80%-power pooled total = {settings.n_star:,.0f}")
    bet = _timed("betting runs", lambda: betting_guardrail_fired(HARMED_RATE, runs, looks, SEED))
    bet_aa = _timed(
        "betting A/A runs", lambda: betting_guardrail_fired(BASE_RATE, aa_runs, looks, SEED + 1)
    )
    grid = _timed(
        "previous grid runs",
        lambda: betting_guardrail_fired(HARMED_RATE, runs, looks, SEED, previous_log_e),
    )
    grid_aa = _timed(
        "previous grid A/A runs",
        lambda: betting_guardrail_fired(BASE_RATE, aa_runs, looks, SEED + 1, previous_log_e),
    )
    harm = _timed(
        "harm runs", lambda: rate_guardrail_fired(HARMED_RATE, runs, looks, settings, SEED)
    )
    aa = _timed(
        "A/A runs", lambda: rate_guardrail_fired(BASE_RATE, aa_runs, looks, settings, SEED + 1)
    )
    monte_carlo_se = math.sqrt(ALPHA * (1 - ALPHA) / aa_runs)

    rows = (
        ("shipped: betting on users (exact)", "betting", bet, bet_aa),
        ("previous bets: equal-weight grid of g", "previous grid", grid, grid_aa),
        ("per-request harm test (asymptotic)", "harm test", harm, aa),
    )
    print()
    print(f"{'total units (both arms)':<44}{'median':>10}{'p80':>10}{'p90':>10}")
    for title, _, sizes, _ in rows:
        print(f"{title:<44}{sizes.median:>10,.0f}{sizes.p80:>10,.0f}{sizes.p90:>10,.0f}")
    print(f"{'fixed horizon, pooled formula (80% power)':<44}{pooled_n:>10,.0f}")
    print(f"{'fixed horizon, statsmodels NormalIndPower':<44}{statsmodels_n:>10,.0f}")
    print()
    for _, name, sizes, _ in rows:
        for label, reference in (("pooled formula", pooled_n), ("NormalIndPower", statsmodels_n)):
            print(
                f"{name} ratios vs {label}: median {sizes.median / reference:.2f}x "
                f"(target <= 0.90), p80 {sizes.p80 / reference:.2f}x (target <= 1.50), "
                f"p90 {sizes.p90 / reference:.2f}x"
            )
        print(f"{name}: runs never stopped within {looks * BATCH:,} units: {sizes.never:.2%}")
    print(
        "A/A false-rollback rates: "
        + ", ".join(f"{name} {1 - same.never:.2%}" for _, name, _, same in rows)
        + f" (alpha {ALPHA:.0%}, Monte-Carlo SE {monte_carlo_se:.2%}, {aa_runs} runs)"
    )

    print()
    print("Other harms (1% -> 1.5% and 1% -> 3%), ratios to their own pooled fixed-horizon size")
    other_runs = max(runs // 5, 200)
    for rate in (0.015, 0.03):
        reference = fixed_horizon_total_n_proportion(
            BASE_RATE, rate, treatment_share=TREATMENT_SHARE, alpha=ALPHA
        )
        other_looks = int(6 * reference / BATCH)
        for name, path in (("betting", shipped_log_e), ("previous grid", previous_log_e)):
            fired, totals = betting_guardrail_fired(rate, other_runs, other_looks, SEED + 4, path)
            sizes = _stopping_sizes(fired, totals)
            print(
                f"  {rate:.1%} ({reference:,.0f} units), {name}: median "
                f"{sizes.median / reference:.2f}x, p80 {sizes.p80 / reference:.2f}x "
                f"({other_runs} runs)"
            )

    print()
    print("p95 latency +20% (log-normal, sigma 0.5), 10% canary, margin 0, look every 500 units")
    quantile_looks, quantile_batch = 120, 500
    slow = _timed(
        "harm runs",
        lambda: quantile_guardrail_fired(
            1.2, quantile_runs, quantile_looks, quantile_batch, SEED + 2
        ),
    )
    same = _timed(
        "A/A runs",
        lambda: quantile_guardrail_fired(
            1.0, quantile_runs, quantile_looks, quantile_batch, SEED + 3
        ),
    )
    print(
        f"  quantile guardrail (exceedance e-process): median {slow.median:,.0f}, "
        f"p80 {slow.p80:,.0f}, p90 {slow.p90:,.0f} total units; "
        f"never stopped within {quantile_looks * quantile_batch:,}: {slow.never:.1%}"
    )
    print(f"  A/A false-rollback rate: {1 - same.never:.2%} ({quantile_runs} runs)")


if __name__ == "__main__":
    main()
