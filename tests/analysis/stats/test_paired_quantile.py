"""The paired p95 (95th percentile of the per-pair ratio S / C): closed forms and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats.paired_quantile import order_statistic_ranks, paired_p95_cs
from analysis.stats.quantiles import quantile_cs_ranks
from analysis.stats.shadow_pairs import (
    PairedLatency,
    ShadowInputs,
    Tolerances,
    shadow_verdict,
)
from bench.shadow_pairing import P95_WORLDS, compare_p95
from routing.observe.histogram import LogHistogram
from routing.observe.shadow_pairs import PairCell

T_OPT = 2000.0


@pytest.mark.parametrize("n", [20, 100, 500, 2000, 10_000])
@pytest.mark.parametrize("alpha", [0.05, 0.0125])
def test_order_statistic_ranks_match_the_binomial_closed_form(n: int, alpha: float) -> None:
    lower, upper = order_statistic_ranks(n, 0.95, alpha)
    binomial = stats.binom(n, 0.95)
    # Each tail holds at most alpha / 2, and one rank further in would break that.
    assert binomial.cdf(lower - 1) <= alpha / 2 < binomial.cdf(lower)
    if upper <= n:
        assert binomial.sf(upper - 1) <= alpha / 2 < binomial.sf(upper - 2)
    # Monte Carlo check of the exact coverage of [X_(l), X_(u)] (continuous X).
    rng = np.random.default_rng(n)
    draws = np.sort(rng.standard_normal((4000, n)), axis=1)
    truth = stats.norm.ppf(0.95)
    low = draws[:, lower - 1] if lower >= 1 else np.full(4000, -np.inf)
    high = draws[:, upper - 1] if upper <= n else np.full(4000, np.inf)
    misses = np.mean((low > truth) | (high < truth))
    assert misses <= alpha + 3 * math.sqrt(alpha / 4000) + 0.002


@pytest.mark.parametrize("n", [20, 60, 100, 200, 500, 1000, 2000, 5000, 20_000])
def test_the_sequential_cs_contains_the_fixed_n_exact_interval(n: int) -> None:
    """Valid at every n at once, so at each n it is at least as wide as the exact fixed-n CI."""
    alpha = 0.0125
    exact_lower, exact_upper = order_statistic_ranks(n, 0.95, alpha)
    lower, upper = quantile_cs_ranks(n, 0.95, alpha=alpha, t_opt=T_OPT)
    assert lower <= exact_lower
    assert upper >= exact_upper


def _cell(control: np.ndarray, shadow: np.ndarray) -> PairCell:
    cell = PairCell()
    for c, s in zip(control, shadow, strict=True):
        cell.add(float(c), float(s), disagreed=False, abs_diff=None)
    return cell


def test_paired_cs_brackets_theta_and_the_between_request_spread_cancels() -> None:
    rng = np.random.default_rng(7)
    shared = 100.0 * np.exp(rng.normal(0.0, 0.7, 3000))
    control = shared * np.exp(rng.normal(0.0, 0.1, 3000))
    shadow = 1.3 * shared * np.exp(rng.normal(0.0, 0.1, 3000))
    result = paired_p95_cs(_cell(control, shadow).ratio, alpha=0.05, t_opt=T_OPT)
    # Symmetric noise: theta = k = 1.3; the tails are k a and a / k, a = exp(1.645 0.1 sqrt 2).
    tail = math.exp(stats.norm.ppf(0.95) * 0.1 * math.sqrt(2.0))
    assert result.lower < 1.3 < result.upper
    assert result.estimate == pytest.approx(1.3, rel=0.02)
    assert result.slowdown == pytest.approx(1.3 * tail, rel=0.03)
    assert result.speedup == pytest.approx(tail / 1.3, rel=0.03)
    # Between-request spread cancels: the interval is narrow although latencies vary 2x.
    assert result.upper / result.lower < 1.1


def test_no_pairs_give_no_bounds() -> None:
    result = paired_p95_cs(LogHistogram(), alpha=0.05, t_opt=T_OPT)
    assert math.isnan(result.estimate) and result.lower == 0.0 and result.upper == math.inf


def _log_ratio_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return math.log(1.1) + rng.normal(0.0, 0.2 * math.sqrt(2.0), n)


def _log_ratio_skewed(rng: np.random.Generator, n: int) -> np.ndarray:
    return 0.2 * rng.exponential(1.0, n) - 0.1


# theta of each world in closed form: exp((q95 + q05) / 2) of the log ratio.
WORLDS = {
    "normal": (_log_ratio_normal, 1.1),
    "skewed": (
        _log_ratio_skewed,
        math.exp((0.2 * -math.log(0.05) - 0.1 + 0.2 * -math.log(0.95) - 0.1) / 2.0),
    ),
}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_running_coverage_at_every_look_stays_within_alpha(world: str) -> None:
    """Seeded: 300 runs of 2,000 pairs, a look every 20; P(CS ever misses theta) <= alpha."""
    draw, theta = WORLDS[world]
    alpha, runs, n, look = 0.05, 300, 2000, 20
    misses = 0
    for run in range(runs):
        log_ratio = draw(np.random.default_rng([11, run]), n)
        for t in range(look, n + 1, look):
            ordered = np.exp(np.sort(log_ratio[:t]))
            bounds = []
            for p in (0.95, 0.05):
                k_lo, k_hi = quantile_cs_ranks(t, p, alpha=alpha / 2, t_opt=T_OPT)
                low = ordered[k_lo - 1] if k_lo >= 1 else 0.0
                high = ordered[k_hi - 1] if k_hi <= t else math.inf
                bounds.append((low, high))
            (high_lo, high_hi), (low_lo, low_hi) = bounds
            if not math.sqrt(high_lo * low_lo) <= theta <= math.sqrt(high_hi * low_hi):
                misses += 1
                break
    # Binomial(300, 0.05) exceeds 25 with probability < 0.2%.
    assert misses <= 25, misses


def _inputs(control: np.ndarray, shadow: np.ndarray) -> ShadowInputs:
    cell = _cell(control, shadow)
    return ShadowInputs(
        pairs=PairedLatency(cell.n, cell.c, cell.s, cell.cc, cell.ss, cell.x),
        control_histogram=cell.control,
        shadow_histogram=cell.shadow,
        ratio_histogram=cell.ratio,
        compared=cell.n,
        disagreements=0,
        abs_diff_sum=0.0,
        abs_diff_sum_sq=0.0,
        numeric=False,
    )


TOLERANCES = Tolerances(latency_increase=0.5, p95_increase=0.2, disagreement=0.05, min_pairs=200)


def test_a_shadow_twice_as_slow_on_a_tenth_of_requests_is_worse_at_the_paired_p95() -> None:
    """Mean within its tolerance, the paired p95 beyond: the reason says what X is."""
    rng = np.random.default_rng(3)
    n = 1500
    control = 50.0 * np.exp(rng.normal(0.0, 0.5, n))
    slow = rng.random(n) < 0.10
    shadow = control * np.exp(rng.normal(0.0, 0.03, n)) * np.where(slow, 2.0, 1.0)
    result = shadow_verdict(_inputs(control, shadow), TOLERANCES, alpha=0.05, n_star=T_OPT)
    assert result.verdict == "worse", result.reason
    lower = result.p95_pair_ratio.lower
    # theta = sqrt(2.0 * exp(-1.645 * 0.03)) = 1.38.
    assert 1.2 < lower < 1.38 < result.p95_pair_ratio.upper
    slowdown, speedup = result.p95_pair_tails
    assert slowdown == pytest.approx(2.0, rel=0.05)
    assert (
        f"paired p95 latency ratio at least {lower:.2f}x (tolerance 1.20x; on 5% of users' "
        f"requests the shadow took at least {slowdown:.2f}x control's time, and on 5% "
        f"control at least {speedup:.2f}x the shadow's)"
    ) in result.reason
    assert "mean latency" not in result.reason
    latest = result.as_json()["p95_pair_ratio"]
    assert isinstance(latest, dict)
    assert (latest["lower"], latest["slowdown"]) == (lower, slowdown)


def test_an_identical_shadow_with_noisy_servers_is_ready() -> None:
    """Each server's own noise 10%: the shadow's 1-in-20 slowdown is about 1.26x (beyond a
    20% tolerance on it alone), but control's against it is the same, and theta is 1."""
    rng = np.random.default_rng(4)
    n = 3000
    shared = 50.0 * np.exp(rng.normal(0.0, 0.5, n))
    control = shared * np.exp(rng.normal(0.0, 0.1, n))
    shadow = shared * np.exp(rng.normal(0.0, 0.1, n))
    result = shadow_verdict(_inputs(control, shadow), TOLERANCES, alpha=0.05, n_star=T_OPT)
    assert result.verdict == "ready", result.reason
    slowdown, speedup = result.p95_pair_tails
    assert slowdown > 1.2 and speedup > 1.2
    upper = result.p95_pair_ratio.upper
    assert result.p95_pair_ratio.lower < 1.0 < upper < 1.2
    assert f"paired p95 latency ratio at most {upper:.2f}x" in result.reason
    # The per-arm p95s (context) are far wider on the same pairs: their spread does not cancel.
    per_arm = result.p95_ratio.upper - result.p95_ratio.lower
    assert per_arm > 2 * (upper - result.p95_pair_ratio.lower)


def test_the_paired_p95_needs_far_fewer_users_than_the_per_arm_one() -> None:
    # A shadow 50% slower on every request (bench/shadow_pairing.py --p95). The README reports
    # 11.9x at the median and 14.2x at the 80th percentile over 200 runs.
    result = compare_p95(P95_WORLDS["+50%"], runs=12, max_pairs=8000, look=10, seed=1)
    assert result.censored_paired == result.censored_unpaired == 0
    assert result.ratio(0.5) > 6.0
    assert result.ratio(0.8) > 6.0
