"""Vectorised one-sided sequential harm tests with a relative margin (the guardrail core).

A guardrail with relative margin m asks whether the treatment is worse than control by more
than m: for "lower is better" H0: mu_B <= (1 + m) mu_A, for "higher is better"
H0: mu_B >= (1 - m) mu_A. Writing r for the null ratio, each is a sign hypothesis on the linear
contrast C = mu_B - r mu_A (Fieller's construction), so the test needs no ratio of noisy means:

    z_harm = +-(mu_B_hat - r mu_A_hat) / sqrt(s_B^2 / n_B + r^2 s_A^2 / n_A)

Divided by |mu_A| the numerator is the relative lift minus the margin and the denominator is
the delta-method SE of the relative lift (STATS.md 1.2) evaluated on the null boundary
mu_B = r mu_A. For rates the variances are taken at the maximum-likelihood estimates under
that boundary (the score test of Miettinen & Nurminen 1985 / Farrington & Manning 1990 for a
risk ratio; for m = 0 the pooled rate). Under H0 that plug-in is consistent, so the asymptotic
guarantee is unchanged, and under harm it does not inflate the variance with the harm being
tested: that is what lets a sequential rate guardrail compete with the pooled fixed-horizon
z test (the benchmark in bench/stats_power.py).

z_harm is compared with the one-sided boundary of GrowthBook Safe Rollouts (Waudby-Smith et
al. 2023, arXiv 2103.06476v7, eq. (134); STATS.md 2.2): reject at the first look with
z_harm > sqrt(2 k / (N rho^2) log(1 + sqrt(k) / (2 alpha))), k = N rho^2 + 1, rho^2 from 2 alpha
and N*. Every function takes numpy arrays (or scalars), so the A/A simulations and the
benchmark run the same code as the worker.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from analysis.stats.sequential import asymptotic_rho

FloatArray = NDArray[np.float64]


def restricted_rates(
    successes_a: ArrayLike,
    n_a: ArrayLike,
    successes_b: ArrayLike,
    n_b: ArrayLike,
    *,
    ratio: float,
) -> tuple[FloatArray, FloatArray]:
    """Maximum-likelihood rates (p_A, p_B) of two binomials under p_B = ratio * p_A.

    The score equation reduces to a quadratic a p^2 + b p + c = 0 with a = ratio (n_A + n_B),
    b = -(n_A + ratio n_B + x_B + ratio x_A), c = x_A + x_B; the smaller root is the MLE
    (Miettinen & Nurminen 1985, risk-ratio case). For ratio = 1 it is the pooled rate.
    """
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be positive, got {ratio}")
    x_a = np.asarray(successes_a, dtype=float)
    x_b = np.asarray(successes_b, dtype=float)
    m_a = np.asarray(n_a, dtype=float)
    m_b = np.asarray(n_b, dtype=float)
    a = ratio * (m_a + m_b)
    b = -(m_a + ratio * m_b + x_b + ratio * x_a)
    c = x_a + x_b
    discriminant = np.maximum(b * b - 4 * a * c, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # The numerically stable form of the smaller root, 2c / (-b + sqrt(disc)).
        p_a = np.where(c > 0, 2 * c / (-b + np.sqrt(discriminant)), 0.0)
    p_a = np.clip(p_a, 0.0, min(1.0, 1.0 / ratio))
    return p_a, np.clip(ratio * p_a, 0.0, 1.0)


def proportion_harm_z(
    successes_a: ArrayLike,
    n_a: ArrayLike,
    successes_b: ArrayLike,
    n_b: ArrayLike,
    *,
    ratio: float,
    lower_is_better: bool,
) -> FloatArray:
    """Score z statistic for harm of a rate at null ratio `ratio` (NaN when undefined)."""
    x_a = np.asarray(successes_a, dtype=float)
    x_b = np.asarray(successes_b, dtype=float)
    m_a = np.asarray(n_a, dtype=float)
    m_b = np.asarray(n_b, dtype=float)
    p_a, p_b = restricted_rates(x_a, m_a, x_b, m_b, ratio=ratio)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = p_b * (1 - p_b) / m_b + ratio**2 * p_a * (1 - p_a) / m_a
        contrast = x_b / m_b - ratio * x_a / m_a
        z = np.where(variance > 0, contrast / np.sqrt(variance), np.nan)
    return np.asarray(z if lower_is_better else -z, dtype=float)


def mean_harm_z(
    mean_a: ArrayLike,
    variance_a: ArrayLike,
    n_a: ArrayLike,
    mean_b: ArrayLike,
    variance_b: ArrayLike,
    n_b: ArrayLike,
    *,
    ratio: float,
    lower_is_better: bool,
) -> FloatArray:
    """Fieller-contrast z statistic for harm of a mean or ratio metric (NaN when undefined).

    Per-arm variances are the ordinary (Welch) ones; for a ratio metric pass the per-unit
    delta-method variance of the arm's ratio (STATS.md 6) and the arm's ratio as its mean.
    """
    mu_a = np.asarray(mean_a, dtype=float)
    mu_b = np.asarray(mean_b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.asarray(variance_b, dtype=float) / np.asarray(n_b, dtype=float) + (
            ratio**2 * np.asarray(variance_a, dtype=float) / np.asarray(n_a, dtype=float)
        )
        z = np.where(variance > 0, (mu_b - ratio * mu_a) / np.sqrt(variance), np.nan)
    return np.asarray(z if lower_is_better else -z, dtype=float)


def harm_threshold(total_n: ArrayLike, *, alpha: float, n_star: float) -> FloatArray:
    """The z boundary of the one-sided sequential test at pairwise total N (eq. (134))."""
    rho2 = asymptotic_rho(alpha, n_star, one_sided=True) ** 2
    n = np.asarray(total_n, dtype=float)
    k = n * rho2 + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        threshold = np.sqrt(2 * k / (n * rho2) * np.log1p(np.sqrt(k) / (2 * alpha)))
    return np.asarray(np.where(n > 0, threshold, np.inf), dtype=float)


def harm_p_value(z: ArrayLike, total_n: ArrayLike, *, alpha: float, n_star: float) -> FloatArray:
    """Level at which the one-sided boundary would be crossed (rho fixed at the design alpha).

    Closed form sqrt(k) / (2 (exp(z^2 N rho^2 / (2k)) - 1)) for z > 0, else 1 (STATS.md 2.2);
    the running minimum over looks is an always-valid p-value for the harm hypothesis.
    """
    rho2 = asymptotic_rho(alpha, n_star, one_sided=True) ** 2
    zz = np.asarray(z, dtype=float)
    n = np.asarray(total_n, dtype=float)
    k = n * rho2 + 1
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        exponent = np.minimum(zz * zz * n * rho2 / (2 * k), 700.0)
        p = np.sqrt(k) / (2 * np.expm1(exponent))
    return np.asarray(np.where(zz > 0, np.minimum(p, 1.0), 1.0), dtype=float)
