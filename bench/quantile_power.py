"""Sample size of the sequential p95 latency guardrail against a fixed-horizon test at 80% power.

Scenario: a canary gets 10% of the requests and is 20% slower at every quantile (log-normal
latencies, median 100 ms, sigma 0.5, treatment = 1.2 x control). The sequential guardrail
(`analysis.stats.quantiles.quantile_guardrail`, p = 0.95, margin 0, alpha = 0.05) looks after
every 500 requests (50 canary, 450 control) and stops at the first look where the always-valid
lower bound on the relative p95 harm is above 0. The canary's request count at that look is the
sample size reported; the control arm has 9x as many.

Baseline: the per-arm sample size a fixed-horizon one-sided test at the same alpha needs for 80%
power against the same p95 difference with the same 10/90 split, from the asymptotic variance of
a sample quantile, Var(q_hat) = p(1-p) / (n f(q)^2) (Serfling 1980, "Approximation Theorems of
Mathematical Statistics", section 2.3). For a log-normal, f(q) = phi(z_p) / (sigma q), so
Var(q_hat_B - q_hat_A) = p(1-p) sigma^2 / phi(z_p)^2 (q_B^2 / n_B + q_A^2 / n_A) and
n_B = (z_{1-alpha} + z_{0.8})^2 Var(n_B = 1) / (q_B - q_A)^2. The script then simulates that
fixed-horizon test (the Deng-Knoblich-Yu CI of `quantile_difference_ci`, one-sided) at that size
to check the power is about 80%.

The sequential guardrail pays for being valid at every look (and for the 2% histogram buckets);
the ratios printed are its median and 90th-percentile stopping sizes over the fixed-horizon size.

Run: .venv/bin/python -m bench.quantile_power [--replications 1000] [--alpha 0.05]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from analysis.stats.quantiles import quantile_guardrail
from analysis.stats.quantiles_fixed import quantile_difference_ci
from routing.histogram import LogHistogram

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
        # routing/histogram.py's bucket rule, vectorised: ceil(log(x) / log(gamma)).
        indices = np.ceil(np.log(values) * self.inverse_log_gamma).astype(np.int64) - self.offset
        rows = np.repeat(np.arange(self.replications), batch)
        np.add.at(self.cumulative, (rows, indices.ravel()), 1)

    def histogram(self, replication: int) -> LogHistogram:
        row = self.cumulative[replication]
        occupied = np.flatnonzero(row)
        return LogHistogram.from_bucket_counts(
            dict(zip((occupied + self.offset).tolist(), row[occupied].tolist(), strict=True))
        )


def sequential_stopping_sizes(scenario: Scenario) -> NDArray[np.float64]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=1_000)
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
    stopped_at = sequential_stopping_sizes(scenario)
    caught = np.isfinite(stopped_at)
    fixed_size = fixed_horizon_canary_size(scenario)
    power = fixed_horizon_power(scenario, fixed_size)
    simulated_size, simulated_power = simulated_fixed_horizon_size(scenario, fixed_size)
    elapsed = time.perf_counter() - started
    control_per_canary = (1.0 - scenario.canary_share) / scenario.canary_share
    median = float(np.median(stopped_at))
    p90 = float(np.percentile(stopped_at, 90))

    print(
        f"p95 latency guardrail, +{scenario.regression:.0%} regression, canary share "
        f"{scenario.canary_share:.0%}, alpha {scenario.alpha}, lognormal sigma {scenario.sigma}, "
        f"look every {scenario.look_every} requests, {scenario.replications} replications"
    )
    print(f"  sequential: caught in {caught.mean():.1%} of runs by {scenario.max_total} requests")
    print(
        f"  sequential: median canary n {median:,.0f} (control {median * control_per_canary:,.0f}),"
        f" 90th percentile {p90:,.0f} (control {p90 * control_per_canary:,.0f})"
    )
    print(
        f"  fixed horizon (one-sided, 80% power, asymptotic variance): canary n {fixed_size:,} "
        f"(control {round(fixed_size * control_per_canary):,}); simulated power {power:.1%}"
    )
    print(
        f"  fixed horizon (one-sided, simulated DKY test on histograms): canary n "
        f"{simulated_size:,} for {simulated_power:.1%} power"
    )
    print(
        f"  ratio sequential median / fixed: {median / fixed_size:.2f} (asymptotic), "
        f"{median / simulated_size:.2f} (simulated)"
    )
    print(
        f"  ratio sequential 90th percentile / fixed: {p90 / fixed_size:.2f} (asymptotic), "
        f"{p90 / simulated_size:.2f} (simulated)"
    )
    print(f"  ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
