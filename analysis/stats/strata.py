"""Arms compared within cohorts (ramp steps) and combined with fixed weights (STATS.md 12.2).

In a ramp, control's units come mostly from early steps and the canary's from late ones.
When anything drifts (load, user mix, time of day), a comparison of the pooled arms is biased
in either direction (Simpson's paradox across ramp phases; Kohavi, Tang & Xu 2020, ch. 15).
`standardize` compares the arms inside each cohort, the units whose first exposure fell in
one period of constant split, and standardises every arm to the same cohort weights:

    (1) w_s = 1 / sum_a (1 / n_{a,s})          (w_s = n_A n_B / (n_A + n_B) for two arms)
    (2) mu_a = sum_s w_s mean_{a,s} / sum_s w_s
    (3) Var(mu_a) = sum_s w_s^2 var_{a,s} / n_{a,s} / (sum_s w_s)^2

(1) are the Mantel-Haenszel weights of a risk difference (Mantel & Haenszel 1959; Greenland &
Robins 1985, Biometrics 41:55-68; Greenland & Rothman, "Introduction to stratified analysis",
Modern Epidemiology, 3rd ed. 2008, ch. 15, eqs. 15-18 and 15-19), and (2) is the direct
standardisation that yields the Mantel-Haenszel difference from standardised arms (as in SAS
PROC STDRATE's "Mantel-Haenszel effect estimation"). Because both arms use the same weights,
mu_B - r mu_A = sum_s w_s (mean_{B,s} - r mean_{A,s}) / sum w:
a weighted sum of within-cohort contrasts, so time cannot leak into the comparison. The
weights depend only on the cohort sizes, never on outcomes, and are zero for a cohort in
which an arm has fewer than `min_per_arm` units: a cohort with a single arm (a pause, the
time after a rollback, a step before the canary got any units) contributes nothing. The
variance (3) is the plug-in variance of independent cohort means (units are independent
across and within cohorts), which is what the harm test of `analysis.stats.harm` needs.

With a single contributing cohort the arms' own statistics are returned unchanged, so an
experiment that never ramped is analysed exactly as before ("pooled"). Otherwise each arm gets
an equivalent statistic: a `MeanStats` (for rate and mean metrics) or a `RatioStats` over its
N contributing units whose mean is (2) and whose variance of the mean is (3), so every test
downstream (guardrail harm tests, confidence sequences, reports) runs unchanged on the
standardised arms, with N units per arm for its sample-size terms. The weights move between
looks while cohorts fill up (a closed step's cohort stops growing once its users' windows
have closed), so the anytime guarantee stays asymptotic, as it is for every mean and rate
guardrail; the A/A ramp simulation in `bench/ramp_cohorts.py` (1,000 runs per world, and its
CI version) checks the false-rollback rate against alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from analysis.stats.moments import MeanStats, MetricStats, ProportionStats, RatioStats

Construction = Literal["pooled", "stratified_by_ramp_step"]
POOLED: Construction = "pooled"
STRATIFIED: Construction = "stratified_by_ramp_step"


@dataclass(frozen=True, slots=True)
class Standardized:
    """Per arm the statistic to compare, and how it was built.

    `stats` holds only arms that share at least one contributing cohort with every other
    arm (empty when none does). `weights[s]` is cohort s's normalised weight (0 when it
    contributes nothing); `left_out[arm]` counts the arm's units in cohorts that contribute
    nothing. `standardized` is True when `stats` are equivalent statistics built from (2)
    and (3) rather than an arm's own sums.
    """

    construction: Construction
    stats: Mapping[str, MetricStats]
    weights: Mapping[int, float] = field(default_factory=dict)
    cohorts_used: int = 0
    cohorts_seen: int = 0
    left_out: Mapping[str, int] = field(default_factory=dict)
    standardized: bool = False


FloatArray = NDArray[np.float64]


def _moments(stats: MetricStats) -> tuple[FloatArray, FloatArray]:
    """Per-unit mean vector and covariance matrix (one entry for rates and means, two for
    ratios: numerator and denominator), with the variance conventions of `moments`."""
    n = stats.n
    if isinstance(stats, RatioStats):
        mean = np.array([stats.numerator_sum / n, stats.denominator_sum / n])
        if n <= 1:
            return mean, np.zeros((2, 2))
        sums = np.array([stats.numerator_sum, stats.denominator_sum])
        squares = np.array(
            [
                [stats.numerator_sum_squares, stats.cross_sum],
                [stats.cross_sum, stats.denominator_sum_squares],
            ]
        )
        return mean, (squares - np.outer(sums, sums) / n) / (n - 1)
    return np.array([stats.mean]), np.array([[stats.variance]])


def _equivalent(
    mean: FloatArray, covariance_of_mean: FloatArray, n: int, ratio: bool
) -> MetricStats:
    """Sums of n units whose mean is `mean` and whose sample covariance / n is the given one."""
    covariance = covariance_of_mean * n
    squares = (n - 1) * covariance + n * np.outer(mean, mean)
    if ratio:
        return RatioStats(
            n=n,
            numerator_sum=float(n * mean[0]),
            numerator_sum_squares=float(max(squares[0, 0], 0.0)),
            denominator_sum=float(n * mean[1]),
            denominator_sum_squares=float(max(squares[1, 1], 0.0)),
            cross_sum=float(squares[0, 1]),
        )
    return MeanStats(n=n, sum=float(n * mean[0]), sum_squares=float(max(squares[0, 0], 0.0)))


def standardize(
    strata: Mapping[str, Mapping[int, MetricStats]],
    *,
    arms: Sequence[str],
    construction: Construction,
    min_per_arm: int = 2,
) -> Standardized:
    """Combine per-cohort statistics of `arms` (strata[arm][cohort]) with the weights (1)."""
    if min_per_arm < 1:
        raise ValueError(f"min_per_arm must be >= 1, got {min_per_arm}")
    cohorts = sorted({s for arm in arms for s in strata.get(arm, {})})
    used = [
        s
        for s in cohorts
        if len(arms) >= 2
        and all(
            (part := strata.get(arm, {}).get(s)) is not None and part.n >= min_per_arm
            for arm in arms
        )
    ]
    left_out = {
        arm: sum(part.n for s, part in strata.get(arm, {}).items() if s not in used) for arm in arms
    }
    raw = {s: 1.0 / math.fsum(1.0 / strata[arm][s].n for arm in arms) for s in used}
    total = math.fsum(raw.values())
    weights = {s: (raw.get(s, 0.0) / total if total > 0 else 0.0) for s in cohorts}

    def result(stats: Mapping[str, MetricStats], standardized: bool = False) -> Standardized:
        return Standardized(
            construction=construction,
            stats=stats,
            weights=weights,
            cohorts_used=len(used),
            cohorts_seen=len(cohorts),
            left_out=left_out,
            standardized=standardized,
        )

    if not used:
        return result({})
    if len(used) == 1:
        return result({arm: strata[arm][used[0]] for arm in arms})
    combined: dict[str, MetricStats] = {}
    for arm in arms:
        parts = [strata[arm][s] for s in used]
        ratio = isinstance(parts[0], RatioStats)
        if any(isinstance(p, RatioStats) != ratio for p in parts) or not all(
            isinstance(p, MeanStats | ProportionStats | RatioStats) for p in parts
        ):
            raise ValueError(f"{arm}: cohorts must all be rates/means or all ratios")
        mean = np.zeros(2 if ratio else 1)
        covariance = np.zeros((2, 2) if ratio else (1, 1))
        for s, part in zip(used, parts, strict=True):
            m, c = _moments(part)
            mean += weights[s] * m
            covariance += weights[s] ** 2 * c / part.n
        combined[arm] = _equivalent(mean, covariance, sum(p.n for p in parts), ratio)
    return result(combined, standardized=True)
