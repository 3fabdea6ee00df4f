"""Uniform boundaries for the centred count of a quantile, behind the quantile CSs.

For ``S_t = sum_i (1{X_i <= q_p} - p)``, whose increments lie in ``[-g, h]``, a boundary
``u(v)`` that ``S_t`` crosses with probability at most ``alpha`` at any time. Two families
(STATS.md 8.1; :mod:`analysis.stats.quantiles` explains which serves which purpose):

* the beta-binomial mixture of Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform,
  nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), section 3
  (:func:`beta_binomial_log_mixture`, :func:`beta_binomial_mixture_bound`), valid for one
  fixed ``p``;
* the double-stitching boundary of Howard & Ramdas 2022, "Sequential estimation of quantiles
  with applications to A/B-testing and best-arm identification", Bernoulli 28(3), Theorem 3
  (:func:`double_stitching_bound`), uniform over all quantiles and times.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import optimize, special

# Defaults of the double-stitching boundary (Howard & Ramdas 2022, Theorem 3; confseq).
STITCHING_DELTA = 0.5
STITCHING_S = 1.4
STITCHING_ETA = 2.0

FloatArray = NDArray[np.float64]


def check_probability(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def check_t_opt(t_opt: float) -> None:
    if not t_opt >= 1.0:
        raise ValueError(f"t_opt must be >= 1, got {t_opt!r}")


def _normal_mixture_rho(v_opt: float, alpha_opt: float) -> float:
    """Normal-mixture precision tuned for intrinsic time ``v_opt`` (Howard et al. 2021).

    ``rho = v_opt / (2 log(1/alpha) + log(1 + 2 log(1/alpha)))``.
    """
    log_inverse_alpha = math.log(1.0 / alpha_opt)
    return v_opt / (2.0 * log_inverse_alpha + math.log1p(2.0 * log_inverse_alpha))


def beta_binomial_r(v_opt: float, alpha_opt: float, g: float, h: float, one_sided: bool) -> float:
    """Mixture parameter ``r = max(rho - g h, 1e-3 g h)``, rho at ``2 alpha_opt`` if one-sided."""
    rho = _normal_mixture_rho(v_opt, 2.0 * alpha_opt if one_sided else alpha_opt)
    return max(rho - g * h, 1e-3 * g * h)


def _log_incomplete_beta(
    a: FloatArray | float, b: FloatArray | float, x: float
) -> FloatArray | float:
    """log of the unregularised incomplete beta function B_x(a, b) (x = 1: complete beta)."""
    log_complete = special.betaln(a, b)
    if x == 1.0:
        return log_complete  # type: ignore[no-any-return]
    return np.log(special.betainc(a, b, x)) + log_complete  # type: ignore[no-any-return]


def log_mixture_array(
    s: FloatArray | float,
    v: float,
    *,
    g: float,
    h: float,
    r: float,
    one_sided: bool,
) -> FloatArray | float:
    """Vectorised body of :func:`beta_binomial_log_mixture` for a precomputed ``r``."""
    total = g + h
    x = h / total if one_sided else 1.0
    s_array = np.asarray(s, dtype=np.float64)
    value = (
        v / (g * h) * math.log(total)
        - (v + h * s_array) / (h * total) * math.log(g)
        - (v - g * s_array) / (g * total) * math.log(h)
        + _log_incomplete_beta(
            (r + v - g * s_array) / (g * total), (r + v + h * s_array) / (h * total), x
        )
        - _log_incomplete_beta(r / (g * total), r / (h * total), x)
    )
    return value


def beta_binomial_log_mixture(
    s: float,
    v: float,
    *,
    g: float,
    h: float,
    v_opt: float,
    alpha_opt: float,
    one_sided: bool,
) -> float:
    """log M(s, v) of the beta-binomial mixture supermartingale (STATS.md 8.1).

    Howard, Ramdas, McAuliffe & Sekhon 2021, section 3 (as confseq's ``BetaBinomialMixture``)::

        log M = v/(gh) log(g+h) - (v+hs)/(h(g+h)) log g - (v-gs)/(g(g+h)) log h
                + log B_x((r+v-gs)/(g(g+h)), (r+v+hs)/(h(g+h)))
                - log B_x(r/(g(g+h)), r/(h(g+h)))

    with ``x = 1`` (two-sided) or ``x = h/(g+h)`` (one-sided) and ``r`` from
    :func:`beta_binomial_r`. ``s`` is the centred sum, ``v`` its intrinsic time (``g h t`` for
    ``t`` observations), and increments lie in ``[-g, h]``.
    """
    r = beta_binomial_r(v_opt, alpha_opt, g, h, one_sided)
    return float(log_mixture_array(s, v, g=g, h=h, r=r, one_sided=one_sided))


def beta_binomial_mixture_bound(
    v: float,
    *,
    alpha: float,
    g: float,
    h: float,
    v_opt: float,
    alpha_opt: float,
    one_sided: bool,
) -> float:
    """Uniform boundary u(v): the root in ``s`` of ``log M(s, v) = log(1/alpha)``.

    The centred sum cannot exceed ``v/g`` (every increment at ``+h``), so the root is searched in
    ``(0, v/g]``; if the mixture stays below ``1/alpha`` there, no value of the sum is excluded
    and the boundary is +inf. ``log M`` is convex in ``s`` with ``M(0) <= 1``, so a root in that
    interval is unique. The returned value is nudged up by the root-finder's tolerance so it is
    never below the exact root.
    """
    check_probability("alpha", alpha)
    if v <= 0.0:
        return math.inf
    r = beta_binomial_r(v_opt, alpha_opt, g, h, one_sided)
    threshold = math.log(1.0 / alpha)
    s_max = v / g

    def excess(s: float) -> float:
        return float(log_mixture_array(s, v, g=g, h=h, r=r, one_sided=one_sided)) - threshold

    if excess(s_max) < 0.0:
        return math.inf
    tolerance = 1e-10 * max(1.0, s_max)
    root = optimize.brentq(excess, 0.0, s_max, xtol=tolerance)
    return min(float(root) + tolerance, s_max)


def double_stitching_bound(
    p: float,
    t: float,
    *,
    alpha: float,
    t_opt: float,
    delta: float = STITCHING_DELTA,
    s: float = STITCHING_S,
    eta: float = STITCHING_ETA,
) -> float:
    """Upper deviation bound u(p, t) of ``t * (F_t(Q(p)) - p)``, uniform over p and t.

    Howard & Ramdas 2022, Theorem 3 (STATS.md 8.1)::

        u = delta sqrt(eta t_m sigma_r^2 / t_opt) + sqrt(k1^2 sigma_r^2 t_m l + (k2 c_p l)^2)
            + k2 c_p l

    with ``t_m = max(t, t_opt)``; ``r = p`` if ``p >= 1/2`` else
    ``min(1/2, expit(logit p + 2 delta sqrt(t_opt eta / t_m)))``; ``sigma_r^2 = r(1-r)``;
    ``j = sqrt(t_m/t_opt) |logit p| / (2 delta) + 1``;
    ``l = s ln ln(eta t_m/t_opt) + s ln j + ln(2 zeta(s)(2 zeta(s)+1) / (alpha (ln eta)^s))``;
    ``c_p = (1-2p)/3``; ``k1 = (eta^(1/4) + eta^(-1/4))/sqrt 2``; ``k2 = (sqrt eta + 1)/2``.
    """
    check_probability("p", p)
    check_probability("alpha", alpha)
    check_t_opt(t_opt)
    t_m = max(t, t_opt)
    logit_p = math.log(p / (1.0 - p))
    if p >= 0.5:
        r = p
    else:
        r = min(0.5, float(special.expit(logit_p + 2.0 * delta * math.sqrt(t_opt * eta / t_m))))
    sigma_squared = r * (1.0 - r)
    j = math.sqrt(t_m / t_opt) * abs(logit_p) / (2.0 * delta) + 1.0
    zeta_s = float(special.zeta(s))
    ell = (
        s * math.log(math.log(eta * t_m / t_opt))
        + s * math.log(j)
        + math.log(2.0 * zeta_s * (2.0 * zeta_s + 1.0) / (alpha * math.log(eta) ** s))
    )
    c_p = (1.0 - 2.0 * p) / 3.0
    k1 = (eta**0.25 + eta**-0.25) / math.sqrt(2.0)
    k2 = (math.sqrt(eta) + 1.0) / 2.0
    sub_gamma_term = k2 * c_p * ell
    return (
        delta * math.sqrt(eta * t_m * sigma_squared / t_opt)
        + math.sqrt(k1 * k1 * sigma_squared * t_m * ell + sub_gamma_term * sub_gamma_term)
        + sub_gamma_term
    )
