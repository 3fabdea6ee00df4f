"""Price of anytime validity for p95 latency guardrails, and A/A ramps with drifting latency.

Part 1, power. A canary gets 10% of the requests and is 20% slower at every quantile (log-normal
latencies, median 100 ms, sigma 0.5, treatment = 1.2 x control). Two sequential guardrails
(p = 0.95, margin 0, alpha = 0.05) look after every 500 requests (50 canary, 450 control, one
time window) and stop at the first look where they fire:

* the threshold-exceedance e-process (`analysis.stats.quantile_exceedance`, contemporaneous,
  one Fisher bet per window), the per-request construction Rampart uses for quantile
  metrics that are not guardrails (guardrails take the user as the unit:
  `bench.quantile_sticky` measures them);
* the pooled per-arm quantile confidence sequences (`analysis.stats.quantiles.quantile_guardrail`,
  Howard & Ramdas 2022), the previous method, for comparison (``--cs-replications``).

The canary's request count at that look is the stopping size. Baseline: the canary size a
fixed-horizon one-sided test at the same alpha needs for 80% power against the same p95
difference with the same 10/90 split, from the asymptotic variance of a sample quantile,
Var(q_hat) = p(1-p) / (n f(q)^2) (Serfling 1980, "Approximation Theorems of Mathematical
Statistics", section 2.3). For a log-normal, f(q) = phi(z_p) / (sigma q), so
Var(q_hat_B - q_hat_A) = p(1-p) sigma^2 / phi(z_p)^2 (q_B^2 / n_B + q_A^2 / n_A) and
n_B = (z_{1-alpha} + z_{0.8})^2 Var(n_B = 1) / (q_B - q_A)^2. The script also simulates that
fixed-horizon test (the Deng-Knoblich-Yu CI of `quantile_difference_ci`, one-sided) to find
the size with 80% simulated power. Ratios printed: median, 80th and 90th percentile stopping
sizes over the fixed-horizon size.

Part 2, A/A ramps (STATS.md 12.4). Ramp 1 -> 5 -> 10 -> 25 -> 50% (6 windows of 1,000 requests
per step), both arms' latency doubling linearly over the run; at least 500 runs. False-rollback
rate (with the Wilson 95% upper bound) of the exceedance e-process, next to the pooled per-arm
CS guardrail looked at after every window. World "sticky": the same ramp and drift, but each
request comes from one of 2,000 users with Pareto(1.2) request rates and a user-specific
latency factor exp(N(0, s^2)) for s in 0, 0.1, 0.2, 0.5; users are assigned stickily (a user
in the canary at 5% stays in it at 25%). Per-request tests assume independent requests, so
this world is reported as measured, not as covered by the guarantee.

Run: .venv/bin/python -m bench.quantile_power [--replications 1000] [--ramp-runs 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from analysis.stats.quantile_exceedance import DenseWindows, harm_log_e_path
from analysis.stats.quantiles import quantile_guardrail
from analysis.stats.quantiles_fixed import quantile_difference_ci
from routing.observe.histogram import LogHistogram

QUANTILE = 0.95
TARGET_POWER = 0.8


@dataclass(frozen=True, slots=True)
class Scenario:
    alpha: float
    canary_share: float
    regression: float
    sigma: float
    median_ms: float
    look_every: int  # total requests between looks
    max_total: int  # total requests after which the simulation gives up
    t_opt: float  # per-arm tuning size of the mixture boundary
    replications: int
    seed: int

    @property
    def canary_per_look(self) -> int:
        return round(self.look_every * self.canary_share)

    @property
    def control_per_look(self) -> int:
        return self.look_every - self.canary_per_look


class BucketedArm:
    """Cumulative bucket counts of one arm for every replication, drawn batch by batch."""

    def __init__(self, replications: int, median_ms: float, sigma: float) -> None:
        self.median_ms = median_ms
        self.sigma = sigma
        self.replications = replications
        reference = LogHistogram()
        self.offset = reference.min_index
        self.inverse_log_gamma = 1.0 / math.log(reference.upper_edge(1))
        width = reference.max_index - self.offset + 1
        self.cumulative = np.zeros((replications, width), dtype=np.int64)

    def draw(self, rng: np.random.Generator, batch: int) -> None:
        values = rng.lognormal(math.log(self.median_ms), self.sigma, (self.replications, batch))
        # routing/observe/histogram.py's bucket rule, vectorised: ceil(log(x) / log(gamma)).
        indices = np.ceil(np.log(values) * self.inverse_log_gamma).astype(np.int64) - self.offset
        rows = np.repeat(np.arange(self.replications), batch)
        np.add.at(self.cumulative, (rows, indices.ravel()), 1)

    def histogram(self, replication: int) -> LogHistogram:
        row = self.cumulative[replication]
        occupied = np.flatnonzero(row)
        return LogHistogram.from_bucket_counts(
            dict(zip((occupied + self.offset).tolist(), row[occupied].tolist(), strict=True))
        )


def cs_stopping_sizes(scenario: Scenario) -> NDArray[np.float64]:
    """Canary request count at the first look where the guardrail fires (inf if never)."""
    rng = np.random.default_rng(scenario.seed)
    control = BucketedArm(scenario.replications, scenario.median_ms, scenario.sigma)
    canary = BucketedArm(
        scenario.replications, scenario.median_ms * (1.0 + scenario.regression), scenario.sigma
    )
    stopped_at = np.full(scenario.replications, np.inf)
    looks = scenario.max_total // scenario.look_every
    for look in range(1, looks + 1):
        control.draw(rng, scenario.control_per_look)
        canary.draw(rng, scenario.canary_per_look)
        for replication in np.flatnonzero(np.isinf(stopped_at)):
            result = quantile_guardrail(
                control.histogram(replication),
                canary.histogram(replication),
                p=QUANTILE,
                alpha=scenario.alpha,
                t_opt=scenario.t_opt,
            )
            if result.harm_lower_bound > 0.0:
                stopped_at[replication] = look * scenario.canary_per_look
        if not np.isinf(stopped_at).any():
            break
    return stopped_at


def fixed_horizon_canary_size(scenario: Scenario) -> int:
    """Canary sample size for 80% power, one-sided, from the asymptotic quantile variance."""
    z_p = float(stats.norm.ppf(QUANTILE))
    control_quantile = scenario.median_ms * math.exp(scenario.sigma * z_p)
    canary_quantile = control_quantile * (1.0 + scenario.regression)
    control_per_canary = (1.0 - scenario.canary_share) / scenario.canary_share
    unit_variance = (
        QUANTILE
        * (1.0 - QUANTILE)
        * scenario.sigma**2
        / float(stats.norm.pdf(z_p)) ** 2
        * (canary_quantile**2 + control_quantile**2 / control_per_canary)
    )
    z_total = float(stats.norm.ppf(1.0 - scenario.alpha) + stats.norm.ppf(TARGET_POWER))
    return math.ceil(z_total**2 * unit_variance / (canary_quantile - control_quantile) ** 2)


def fixed_horizon_power(scenario: Scenario, canary_size: int) -> float:
    """Simulated power of the one-sided fixed-horizon test (DKY CI) at ``canary_size``."""
    rng = np.random.default_rng(scenario.seed + 1)
    control_size = round(canary_size * (1.0 - scenario.canary_share) / scenario.canary_share)
    control = BucketedArm(scenario.replications, scenario.median_ms, scenario.sigma)
    canary = BucketedArm(
        scenario.replications, scenario.median_ms * (1.0 + scenario.regression), scenario.sigma
    )
    control.draw(rng, control_size)
    canary.draw(rng, canary_size)
    detected = 0
    for replication in range(scenario.replications):
        # A two-sided (1 - 2 alpha) interval's lower end is the one-sided (1 - alpha) bound.
        result = quantile_difference_ci(
            control.histogram(replication),
            canary.histogram(replication),
            p=QUANTILE,
            alpha=2.0 * scenario.alpha,
        )
        detected += result.error is None and result.relative_interval[0] > 0.0
    return detected / scenario.replications


def simulated_fixed_horizon_size(scenario: Scenario, start: int) -> tuple[int, float]:
    """Smallest canary size (to 2%) whose simulated one-sided fixed-horizon power is >= 80%."""
    low, high = max(start // 4, 10), start
    while fixed_horizon_power(scenario, high) < TARGET_POWER:
        low, high = high, high * 2
    while high - low > max(2, high // 50):
        middle = (low + high) // 2
        if fixed_horizon_power(scenario, middle) >= TARGET_POWER:
            high = middle
        else:
            low = middle
    return high, fixed_horizon_power(scenario, high)


# --------------------------------------------------------------------------- dense windows

_REFERENCE = LogHistogram()
_ALL_INDICES = np.arange(_REFERENCE.min_index, _REFERENCE.max_index + 1)
_INVERSE_LOG_GAMMA = 1.0 / math.log(_REFERENCE.upper_edge(1))
_LOWER = np.array([_REFERENCE.lower_edge(int(i)) for i in _ALL_INDICES])
_UPPER = np.array([_REFERENCE.upper_edge(int(i)) for i in _ALL_INDICES])
_REPRESENTATIVE = np.array([_REFERENCE.representative(int(i)) for i in _ALL_INDICES])


@dataclass(frozen=True)
class Windows:
    """One run's per-window bucket counts; ``first_index`` is the bucket of column 0."""

    dense: DenseWindows
    first_index: int

    def cumulative_histogram(self, arm: int, windows: int) -> LogHistogram:
        counts = (self.dense.control if arm == 0 else self.dense.treatment)[:windows].sum(axis=0)
        occupied = np.flatnonzero(counts)
        return LogHistogram.from_bucket_counts(
            dict(
                zip((occupied + self.first_index).tolist(), counts[occupied].tolist(), strict=True)
            )
        )


def to_windows(
    window: NDArray[np.int64], canary: NDArray[np.bool_], values: NDArray[np.float64], count: int
) -> Windows:
    """Bin requests (window id, arm, latency in ms) into per-window histograms of both arms."""
    # routing/observe/histogram.py's bucket rule, vectorised: ceil(log(x) / log(gamma)).
    indices = np.ceil(np.log(values) * _INVERSE_LOG_GAMMA).astype(np.int64)
    low, high = int(indices.min()), int(indices.max()) + 1
    columns = indices - low
    control = np.zeros((count, high - low), dtype=np.int64)
    treatment = np.zeros((count, high - low), dtype=np.int64)
    np.add.at(control, (window[~canary], columns[~canary]), 1)
    np.add.at(treatment, (window[canary], columns[canary]), 1)
    offset = low - _REFERENCE.min_index
    edges = slice(offset, offset + high - low)
    dense = DenseWindows(
        control=control,
        treatment=treatment,
        first_index=low,
        log_ratio=1.0 / _INVERSE_LOG_GAMMA,
        lower_edges=_LOWER[edges],
        upper_edges=_UPPER[edges],
        representatives=_REPRESENTATIVE[edges],
    )
    return Windows(dense=dense, first_index=low)


def first_crossing(path: NDArray[np.float64], alpha: float) -> int | None:
    """The first window (0-based) after which the log wealth reaches log(1 / alpha)."""
    hits = np.flatnonzero(path >= math.log(1.0 / alpha))
    return int(hits[0]) if len(hits) else None


def exceedance_stopping_sizes(scenario: Scenario) -> NDArray[np.float64]:
    """Canary request count at the window where the exceedance e-process fires (inf if never)."""
    rng = np.random.default_rng(scenario.seed)
    windows = scenario.max_total // scenario.look_every
    stopped_at = np.full(scenario.replications, np.inf)
    per_window = scenario.control_per_look + scenario.canary_per_look
    window = np.repeat(np.arange(windows), per_window)
    canary = np.tile(np.arange(per_window) >= scenario.control_per_look, windows)
    medians = np.where(canary, scenario.median_ms * (1.0 + scenario.regression), scenario.median_ms)
    for replication in range(scenario.replications):
        values = rng.lognormal(np.log(medians), scenario.sigma)
        run = to_windows(window, canary, values, windows)
        crossing = first_crossing(harm_log_e_path(run.dense, p=QUANTILE), scenario.alpha)
        if crossing is not None:
            stopped_at[replication] = (crossing + 1) * scenario.canary_per_look
    return stopped_at


# --------------------------------------------------------------------------- A/A ramps

RAMP_SHARES = (0.01, 0.05, 0.10, 0.25, 0.50)


@dataclass(frozen=True, slots=True)
class Ramp:
    windows_per_step: int = 6
    requests_per_window: int = 1_000
    sigma: float = 0.5
    median_ms: float = 100.0
    growth: float = 1.0  # latency is multiplied by 1 + growth over the run (1.0: doubles)
    sticky_users: int = 0  # 0: independent requests; else the number of sticky users
    user_sigma: float = 0.5
    pareto_shape: float = 1.2

    @property
    def windows(self) -> int:
        return self.windows_per_step * len(RAMP_SHARES)


def ramp_run(rng: np.random.Generator, ramp: Ramp) -> Windows:
    """One A/A ramp: per-request arm (or sticky per user), drifting latency, binned per window."""
    windows = ramp.windows
    n = ramp.requests_per_window
    window = np.repeat(np.arange(windows), n)
    share = np.repeat(np.array(RAMP_SHARES), ramp.windows_per_step * n)
    drift = 1.0 + ramp.growth * (window + 0.5) / windows
    if ramp.sticky_users:
        rates = rng.pareto(ramp.pareto_shape, ramp.sticky_users) + 1.0
        user = rng.choice(ramp.sticky_users, size=windows * n, p=rates / rates.sum())
        position = rng.random(ramp.sticky_users)  # a user's place in the hash range
        factor = np.exp(rng.normal(0.0, ramp.user_sigma, ramp.sticky_users))
        canary = position[user] < share
        scale = drift * factor[user]
    else:
        canary = rng.random(windows * n) < share
        scale = drift
    values = rng.lognormal(np.log(ramp.median_ms * scale), ramp.sigma)
    return to_windows(window, canary, values, windows)


def pooled_fires(run: Windows, *, alpha: float, t_opt: float) -> bool:
    """Whether the pooled per-arm CS guardrail fires at some window's end (previous method)."""
    for looks in range(1, run.dense.control.shape[0] + 1):
        control = run.cumulative_histogram(0, looks)
        canary = run.cumulative_histogram(1, looks)
        if min(control.count, canary.count) < 100:
            continue
        result = quantile_guardrail(control, canary, p=QUANTILE, alpha=alpha, t_opt=t_opt)
        if result.harm_lower_bound > 0.0:
            return True
    return False


def wilson_upper(successes: int, trials: int, z: float = 1.959963984540054) -> float:
    """Upper end of the Wilson score interval (Wilson 1927, JASA 22) for a binomial rate."""
    if trials == 0:
        return 1.0
    rate = successes / trials
    centre = rate + z * z / (2 * trials)
    spread = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    return (centre + spread) / (1 + z * z / trials)


@dataclass(frozen=True, slots=True)
class RampRates:
    runs: int
    exceedance: int
    pooled: int | None


def ramp_false_rollbacks(
    ramp: Ramp, *, runs: int, alpha: float, seed: int, pooled: bool, t_opt: float = 1_000.0
) -> RampRates:
    """False rollbacks over ``runs`` A/A ramps: exceedance e-process (and the pooled CS)."""
    rng = np.random.default_rng(seed)
    exceedance = pooled_count = 0
    for _ in range(runs):
        run = ramp_run(rng, ramp)
        exceedance += first_crossing(harm_log_e_path(run.dense, p=QUANTILE), alpha) is not None
        if pooled:
            pooled_count += pooled_fires(run, alpha=alpha, t_opt=t_opt)
    return RampRates(runs=runs, exceedance=exceedance, pooled=pooled_count if pooled else None)


# --------------------------------------------------------------------------- report


def _rate(count: int, runs: int) -> str:
    return f"{count}/{runs} = {count / runs:.1%} (Wilson upper {wilson_upper(count, runs):.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=1_000)
    parser.add_argument("--cs-replications", type=int, default=200)
    parser.add_argument("--ramp-runs", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--canary-share", type=float, default=0.10)
    parser.add_argument("--regression", type=float, default=0.20)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--look-every", type=int, default=500, help="total requests per look")
    parser.add_argument("--max-total", type=int, default=200_000)
    parser.add_argument("--t-opt", type=float, default=1_000.0, help="per-arm tuning size")
    parser.add_argument("--seed", type=int, default=20240601)
    arguments = parser.parse_args()
    scenario = Scenario(
        alpha=arguments.alpha,
        canary_share=arguments.canary_share,
        regression=arguments.regression,
        sigma=arguments.sigma,
        median_ms=100.0,
        look_every=arguments.look_every,
        max_total=arguments.max_total,
        t_opt=arguments.t_opt,
        replications=arguments.replications,
        seed=arguments.seed,
    )
    started = time.perf_counter()
    fixed_size = fixed_horizon_canary_size(scenario)
    power = fixed_horizon_power(scenario, fixed_size)
    simulated_size, simulated_power = simulated_fixed_horizon_size(scenario, fixed_size)
    control_per_canary = (1.0 - scenario.canary_share) / scenario.canary_share
    print(
        f"p95 latency guardrail, +{scenario.regression:.0%} regression, canary share "
        f"{scenario.canary_share:.0%}, alpha {scenario.alpha}, lognormal sigma {scenario.sigma}, "
        f"look every {scenario.look_every} requests"
    )
    print(
        f"  fixed horizon (one-sided, 80% power, asymptotic variance): canary n {fixed_size:,} "
        f"(control {round(fixed_size * control_per_canary):,}); simulated power {power:.1%}"
    )
    print(
        f"  fixed horizon (one-sided, simulated DKY test on histograms): canary n "
        f"{simulated_size:,} for {simulated_power:.1%} power"
    )
    methods = [("exceedance e-process", exceedance_stopping_sizes(scenario), scenario.replications)]
    if arguments.cs_replications > 0:
        cs_scenario = dataclasses.replace(scenario, replications=arguments.cs_replications)
        methods.append(
            ("pooled per-arm CS", cs_stopping_sizes(cs_scenario), arguments.cs_replications)
        )
    for name, stopped_at, replications in methods:
        caught = np.isfinite(stopped_at).mean()
        quantiles = {q: float(np.percentile(stopped_at, q)) for q in (50, 80, 90)}
        print(
            f"  {name} ({replications} runs): caught {caught:.1%}; canary n median "
            f"{quantiles[50]:,.0f}, 80th {quantiles[80]:,.0f}, 90th {quantiles[90]:,.0f}"
        )
        print(
            "    ratio to fixed horizon (asymptotic / simulated): "
            + ", ".join(
                f"{label} {value / fixed_size:.2f} / {value / simulated_size:.2f}"
                for label, value in zip(("median", "80th", "90th"), quantiles.values(), strict=True)
            )
        )
    ramp = Ramp()
    print(
        f"A/A ramp {' -> '.join(f'{s:.0%}' for s in RAMP_SHARES)}, "
        f"{ramp.windows_per_step} windows of {ramp.requests_per_window:,} requests per step, "
        f"latency doubling over the run, alpha {scenario.alpha}, p95, margin 0"
    )
    independent = ramp_false_rollbacks(
        ramp, runs=arguments.ramp_runs, alpha=scenario.alpha, seed=scenario.seed + 2, pooled=True
    )
    exceedance_rate = _rate(independent.exceedance, independent.runs)
    print(f"  independent requests: exceedance e-process {exceedance_rate}")
    assert independent.pooled is not None
    print(
        f"  independent requests: pooled per-arm CS {_rate(independent.pooled, independent.runs)}"
    )
    for user_sigma in (0.0, 0.1, 0.2, 0.5):
        sticky = ramp_false_rollbacks(
            Ramp(sticky_users=2_000, user_sigma=user_sigma),
            runs=arguments.ramp_runs,
            alpha=scenario.alpha,
            seed=scenario.seed + 3,
            pooled=False,
        )
        print(
            f"  sticky users, user latency factor exp(N(0, {user_sigma}^2)): exceedance "
            f"e-process {_rate(sticky.exceedance, sticky.runs)}"
        )
    print(f"  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
