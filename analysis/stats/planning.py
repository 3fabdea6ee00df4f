"""Sample-size planning: fixed-horizon sizes and the sequential tuning N* derived from them.

N* (the `n_star` of every confidence sequence here) is where a sequential boundary is
tightest. It must be chosen before the experiment starts and never changed (changing it with
the data would void the guarantee), and it is best set to the pairwise total at which the
decision is expected (GrowthBook's advice, STATS.md 2.1). `guardrail_n_star_*` therefore
defines N* as the fixed-horizon total sample size that detects the smallest harm worth
catching with 80% power at the guardrail's allocation: a number a product owner can reason
about ("how many requests until we would notice a doubling of errors").
"""

from __future__ import annotations

import math

from scipy import stats as scipy_stats


def _check_share(treatment_share: float) -> None:
    if not 0 < treatment_share < 1:
        raise ValueError(f"treatment_share must lie in (0, 1), got {treatment_share}")


def _quantiles(alpha: float, power: float, two_sided: bool) -> tuple[float, float]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    z_alpha = float(scipy_stats.norm.isf(alpha / 2 if two_sided else alpha))
    return z_alpha, float(scipy_stats.norm.isf(1 - power))


def fixed_horizon_total_n_proportion(
    p_control: float,
    p_treatment: float,
    *,
    treatment_share: float = 0.5,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
) -> float:
    """Total units (both arms) for a two-proportion z test, pooled variance under H0.

    N = (z_a sqrt(pbar (1 - pbar) (1/k_A + 1/k_B)) + z_b sqrt(p_A q_A / k_A + p_B q_B / k_B))^2
    / (p_B - p_A)^2 with arm shares k_A, k_B and pbar = k_A p_A + k_B p_B: the usual normal
    approximation with the pooled variance under H0 (Fleiss, Levin & Paik, Statistical Methods
    for Rates and Proportions, ch. 4), for unequal allocation. 1% -> 2% with an equal split
    needs 2,319 per arm (STATS.md 10.2).
    """
    _check_share(treatment_share)
    for field, value in (("p_control", p_control), ("p_treatment", p_treatment)):
        if not 0 < value < 1:
            raise ValueError(f"{field} must lie in (0, 1), got {value}")
    if p_control == p_treatment:
        raise ValueError("p_control and p_treatment must differ")
    z_alpha, z_beta = _quantiles(alpha, power, two_sided)
    share_a, share_b = 1 - treatment_share, treatment_share
    pooled = share_a * p_control + share_b * p_treatment
    null_sd = math.sqrt(pooled * (1 - pooled) * (1 / share_a + 1 / share_b))
    alternative_sd = math.sqrt(
        p_control * (1 - p_control) / share_a + p_treatment * (1 - p_treatment) / share_b
    )
    return (z_alpha * null_sd + z_beta * alternative_sd) ** 2 / (p_treatment - p_control) ** 2


def fixed_horizon_total_n_mean(
    mean_control: float,
    sd: float,
    *,
    relative_change: float,
    treatment_share: float = 0.5,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
) -> float:
    """Total units for a two-sample z test of means with common sd and a relative change.

    N = (z_a + z_b)^2 sd^2 (1/k_A + 1/k_B) / (relative_change * mean_control)^2.
    """
    _check_share(treatment_share)
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be positive, got {sd}")
    if mean_control == 0 or relative_change == 0:
        raise ValueError("mean_control and relative_change must be non-zero")
    z_alpha, z_beta = _quantiles(alpha, power, two_sided)
    share_a, share_b = 1 - treatment_share, treatment_share
    spread = sd * sd * (1 / share_a + 1 / share_b)
    return (z_alpha + z_beta) ** 2 * spread / (relative_change * mean_control) ** 2


def guardrail_n_star_proportion(
    baseline_rate: float,
    *,
    detectable_relative_harm: float,
    treatment_share: float,
    alpha: float = 0.05,
) -> float:
    """N* for a rate guardrail: the two-sided, 80%-power fixed-horizon total for the harm.

    E.g. error rate 1% that should be caught when it doubles (detectable_relative_harm = 1.0)
    at a 10% canary. Round it and store it with the experiment: it must never change.
    """
    return fixed_horizon_total_n_proportion(
        baseline_rate,
        baseline_rate * (1 + detectable_relative_harm),
        treatment_share=treatment_share,
        alpha=alpha,
    )


def guardrail_n_star_mean(
    baseline_mean: float,
    sd: float,
    *,
    detectable_relative_harm: float,
    treatment_share: float,
    alpha: float = 0.05,
) -> float:
    """N* for a mean guardrail (e.g. mean latency): the 80%-power fixed-horizon total."""
    return fixed_horizon_total_n_mean(
        baseline_mean,
        sd,
        relative_change=detectable_relative_harm,
        treatment_share=treatment_share,
        alpha=alpha,
    )
