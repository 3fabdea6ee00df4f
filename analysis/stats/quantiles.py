"""Anytime-valid inference on latency quantiles (p50/p95/p99) from histograms.

Everything here works on bucket counts of a log-bucketed latency histogram
(``routing.observe.histogram.LogHistogram``, or anything with the same bucket interface, see
:class:`LatencyHistogram`), never on raw request rows. STATS.md section 8 is the spec.

Anytime-valid confidence sequences (CS) for one arm's quantile, Howard & Ramdas 2022,
"Sequential estimation of quantiles with applications to A/B-testing and best-arm
identification", Bernoulli 28(3) (arXiv 1906.09712):

* The CS is a pair of order statistics (their fixed-quantile CS; STATS.md 8.1, confseq demo):
  ``[X_(k_lo), X_(k_hi)]`` with ``k_lo = floor(t*p - u_lo + 1)`` and ``k_hi = ceil(t*p + u_up)``,
  where ``u_up``/``u_lo`` are uniform boundaries for the centred count
  ``S_t = sum_i (1{X_i <= q_p} - p)``, whose increments lie in ``[-p, 1-p]`` (sub-Bernoulli with
  range ``g = p``, ``h = 1 - p``; the lower side uses ``-S_t``, i.e. ``g = 1 - p``, ``h = p``).
* ``method="beta_binomial"``: the beta-binomial mixture boundary of Howard, Ramdas, McAuliffe &
  Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist.
  49(2), section 3 (beta-binomial mixture): the root in ``s`` of ``log M(s, v) = log(1/alpha)`` with
  ``v = p(1-p)t`` (formula in :func:`beta_binomial_log_mixture`), tuned to be tightest at
  ``t_opt``. Valid for one fixed ``p`` at every ``t``. Two-sided: one two-sided mixture at level
  ``alpha`` bounds both sides at once (its value at ``(s; g, h)`` equals its value at
  ``(-s; h, g)``, so the upper and the lower boundary are the two ends of one level set of one
  supermartingale, and Ville's inequality covers both). One-sided: the half mixture
  (incomplete beta at ``x = h/(g+h)``) and ``2 * alpha_opt`` in the tuning, each side at
  ``alpha``; that is about 4-7% tighter (STATS.md 8.4).
* ``method="stitching"``: the double-stitching boundary of Howard & Ramdas 2022, Theorem 3,
  valid uniformly over all quantiles and all times (for monitoring many quantiles at once).
  Two-sided CSs give each side ``alpha/2``: that is valid whether or not the theorem's ``alpha``
  already covers both tails, and costs a few percent of width.
* When the boundary has no root (the mixture cannot reach ``1/alpha`` even when every
  observation is on one side, i.e. too few observations), the bound is infinite. confseq returns
  the sample maximum (minimum) there (STATS.md 8.4), which is not a valid bound: with one
  observation the sample maximum is below the median half the time.

From histogram counts (STATS.md 8.4): order statistic ``k`` lies in the bucket holding cumulative
count ``k``. Lower bounds use that bucket's lower edge and upper bounds its upper edge, so the
bucketing (1% relative accuracy) widens the CS by at most one bucket on each side and never
narrows it: the CS stays exactly valid, with no rank-error term needed. Latencies are
non-negative, so a missing lower bound is reported as 0 (not -inf) and a missing upper bound as
+inf.

Guardrail (STATS.md 8.1 rule, 9.1): for lower-is-better latency, harm is the relative increase
``q_B / q_A - 1``; ``quantile_guardrail`` returns ``L_B / U_A - 1`` as an always-valid lower bound
on it, where ``L_B`` and ``U_A`` are one-sided bounds at ``alpha/2`` each (union bound: the chance
that the lower bound ever exceeds the true harm is at most ``alpha``). The caller rolls back when
it exceeds the margin ``m``, i.e. ``L_B > (1 + m) U_A``. We use the one-sided mixtures because
each arm contributes only one side to each harm bound; two-sided arm CSs at ``alpha/2`` would
also be valid but wider. This rule pools each arm over time, so drift biases it (every one of
500 A/A ramps with latency doubling fired, bench/quantile_power.py) and its median stopping size
for p95 +20% is 2.2x the fixed-horizon size: the analysis' quantile guardrail is the
contemporaneous exceedance e-process of :mod:`analysis.stats.quantile_exceedance`, and this one
is kept for histograms without time windows.

The always-valid two-sample test (reporting only; confseq's ``quantile_ab_p_value``, STATS.md
8.2) is in :mod:`analysis.stats.quantile_ab`, and the fixed-horizon (Deng, Knoblich & Yu 2018)
interval on a quantile difference in :mod:`analysis.stats.quantiles_fixed`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import optimize, special

QuantileMethod = Literal["beta_binomial", "stitching"]

# Defaults of the double-stitching boundary (Howard & Ramdas 2022, Theorem 3; confseq).
STITCHING_DELTA = 0.5
STITCHING_S = 1.4
STITCHING_ETA = 2.0

FloatArray = NDArray[np.float64]


class LatencyHistogram(Protocol):
    """What the statistics need from a histogram (``routing.observe.histogram.LogHistogram``)."""

    @property
    def count(self) -> int: ...

    @property
    def relative_accuracy(self) -> float: ...

    def __iter__(self) -> Iterator[tuple[int, int]]: ...

    def lower_edge(self, index: int) -> float: ...

    def upper_edge(self, index: int) -> float: ...

    def quantile(self, p: float) -> float: ...

    def representative(self, index: int) -> float: ...


# --------------------------------------------------------------------------- argument checks


def check_probability(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def check_t_opt(t_opt: float) -> None:
    if not t_opt >= 1.0:
        raise ValueError(f"t_opt must be >= 1, got {t_opt!r}")


# --------------------------------------------------------------------------- boundaries


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


# --------------------------------------------------------------------------- ranks


@lru_cache(maxsize=8192)
def quantile_cs_ranks(
    t: int,
    p: float,
    *,
    alpha: float,
    t_opt: float,
    one_sided: bool = False,
    method: QuantileMethod = "beta_binomial",
) -> tuple[int, int]:
    """Order-statistic indices ``(k_lo, k_hi)`` (1-based) of the quantile CS after ``t`` samples.

    ``X_(k_lo) <= Q(p) <= X_(k_hi)`` at every ``t`` with probability at least ``1 - alpha``
    (two-sided), or each side separately with probability ``1 - alpha`` (``one_sided=True``).
    ``k_lo = 0`` means no lower bound and ``k_hi = t + 1`` no upper bound. The indices depend only
    on ``(t, p, alpha, t_opt)``, never on the data, so they are cached: simulations and the worker
    reuse them across experiments.
    """
    check_probability("p", p)
    check_probability("alpha", alpha)
    check_t_opt(t_opt)
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if t == 0:
        return 0, 1
    if method == "beta_binomial":
        v = p * (1.0 - p) * t
        v_opt = p * (1.0 - p) * t_opt
        # alpha_opt = alpha: the mixture is tuned for the level it is used at.
        upper_radius = beta_binomial_mixture_bound(
            v, alpha=alpha, g=p, h=1.0 - p, v_opt=v_opt, alpha_opt=alpha, one_sided=one_sided
        )
        lower_radius = beta_binomial_mixture_bound(
            v, alpha=alpha, g=1.0 - p, h=p, v_opt=v_opt, alpha_opt=alpha, one_sided=one_sided
        )
    elif method == "stitching":
        side_alpha = alpha if one_sided else alpha / 2.0
        upper_radius = double_stitching_bound(p, t, alpha=side_alpha, t_opt=t_opt)
        lower_radius = double_stitching_bound(1.0 - p, t, alpha=side_alpha, t_opt=t_opt)
    else:
        raise ValueError(f"unknown method {method!r}")
    center = t * p
    lower_rank = 0 if math.isinf(lower_radius) else math.floor(center - lower_radius + 1.0)
    upper_rank = t + 1 if math.isinf(upper_radius) else math.ceil(center + upper_radius)
    return max(lower_rank, 0), min(upper_rank, t + 1)


# --------------------------------------------------------------------------- histogram bounds


def _sorted_buckets(histogram: LatencyHistogram) -> tuple[list[int], list[int]]:
    """Bucket indices in increasing order and their cumulative counts."""
    indices: list[int] = []
    cumulative: list[int] = []
    running = 0
    for index, bucket_count in histogram:
        running += bucket_count
        indices.append(index)
        cumulative.append(running)
    return indices, cumulative


def _bucket_holding(indices: list[int], cumulative: list[int], rank: int) -> int:
    """Index of the bucket holding order statistic ``rank`` (1 <= rank <= total)."""
    position = int(np.searchsorted(cumulative, rank, side="left"))
    return indices[position]


def _bounds_from_ranks(
    histogram: LatencyHistogram,
    indices: list[int],
    cumulative: list[int],
    ranks: tuple[int, int],
) -> tuple[float, float]:
    lower_rank, upper_rank = ranks
    total = cumulative[-1] if cumulative else 0
    lower = (
        histogram.lower_edge(_bucket_holding(indices, cumulative, lower_rank))
        if lower_rank >= 1
        else 0.0
    )
    upper = (
        histogram.upper_edge(_bucket_holding(indices, cumulative, upper_rank))
        if upper_rank <= total
        else math.inf
    )
    return lower, upper


def quantile_cs(
    histogram: LatencyHistogram,
    p: float,
    *,
    alpha: float,
    t_opt: float,
    one_sided: bool = False,
    method: QuantileMethod = "beta_binomial",
) -> tuple[float, float]:
    """Always-valid confidence sequence ``(lower, upper)`` for one arm's ``p``-quantile (ms).

    Two-sided (default): ``lower <= Q(p) <= upper`` at every look with probability at least
    ``1 - alpha``. ``one_sided=True``: each bound holds on its own with probability at least
    ``1 - alpha`` (so jointly ``1 - 2 alpha``). ``t_opt`` is the per-arm sample size at which the
    beta-binomial boundary is tightest; keep it fixed for the life of an experiment.
    Missing bounds are 0 (lower) and +inf (upper).
    """
    indices, cumulative = _sorted_buckets(histogram)
    total = cumulative[-1] if cumulative else 0
    ranks = quantile_cs_ranks(
        total, p, alpha=alpha, t_opt=t_opt, one_sided=one_sided, method=method
    )
    return _bounds_from_ranks(histogram, indices, cumulative, ranks)


def _safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator for non-negative bounds, with x/0 = +inf and x/inf = 0."""
    if denominator == 0.0:
        return math.inf if numerator > 0.0 else math.nan
    if math.isinf(denominator):
        return 0.0 if math.isfinite(numerator) else math.nan
    return numerator / denominator


def quantile_difference_cs(
    control: LatencyHistogram,
    treatment: LatencyHistogram,
    *,
    p: float,
    alpha: float,
    t_opt: float,
    method: QuantileMethod = "beta_binomial",
) -> tuple[float, float]:
    """Always-valid CS for ``Q_B(p) - Q_A(p)`` in ms (union bound: each arm's CS at ``alpha/2``)."""
    control_lower, control_upper = quantile_cs(
        control, p, alpha=alpha / 2.0, t_opt=t_opt, method=method
    )
    treatment_lower, treatment_upper = quantile_cs(
        treatment, p, alpha=alpha / 2.0, t_opt=t_opt, method=method
    )
    return treatment_lower - control_upper, treatment_upper - control_lower


def quantile_ratio_cs(
    control: LatencyHistogram,
    treatment: LatencyHistogram,
    *,
    p: float,
    alpha: float,
    t_opt: float,
    method: QuantileMethod = "beta_binomial",
) -> tuple[float, float]:
    """Always-valid CS for ``Q_B(p) / Q_A(p)`` (union bound: each arm's CS at ``alpha/2``)."""
    control_lower, control_upper = quantile_cs(
        control, p, alpha=alpha / 2.0, t_opt=t_opt, method=method
    )
    treatment_lower, treatment_upper = quantile_cs(
        treatment, p, alpha=alpha / 2.0, t_opt=t_opt, method=method
    )
    lower = _safe_ratio(treatment_lower, control_upper)
    upper = _safe_ratio(treatment_upper, control_lower)
    return (0.0 if math.isnan(lower) else lower), (math.inf if math.isnan(upper) else upper)


# --------------------------------------------------------------------------- guardrail


@dataclass(frozen=True, slots=True)
class QuantileGuardrailResult:
    """Always-valid comparison of one latency quantile between control (A) and treatment (B).

    Harm is the relative change in the bad direction: ``q_B/q_A - 1`` when lower is better,
    ``1 - q_B/q_A`` otherwise. ``harm_lower_bound`` exceeds the true harm at some look with
    probability at most ``alpha`` (roll back when it exceeds the margin); ``harm_upper_bound`` is
    below the true harm at some look with probability at most ``alpha`` (declare non-inferior
    when it is below the margin). Per-arm intervals are the one-sided bounds at ``alpha/2`` each
    that make up the harm bounds, so each is a two-sided ``1 - alpha`` CS for that arm.
    """

    p: float
    n_control: int
    n_treatment: int
    control_estimate: float
    treatment_estimate: float
    control_interval: tuple[float, float]
    treatment_interval: tuple[float, float]
    harm_lower_bound: float
    harm_upper_bound: float
    relative_effect: float


def _point_quantile(histogram: LatencyHistogram, p: float) -> float:
    return histogram.quantile(p) if histogram.count > 0 else math.nan


def quantile_guardrail(
    control: LatencyHistogram,
    treatment: LatencyHistogram,
    *,
    p: float,
    alpha: float,
    t_opt: float,
    lower_is_better: bool = True,
) -> QuantileGuardrailResult:
    """Sequential quantile guardrail: always-valid bounds on the relative harm (STATS.md 8.1).

    Each arm's bounds are one-sided beta-binomial mixture bounds at ``alpha/2`` (Howard & Ramdas
    2022 with the one-sided mixture of Howard et al. 2021), so by the union bound
    ``P(harm_lower_bound ever exceeds the true harm) <= alpha`` over all looks, and likewise for
    ``harm_upper_bound`` falling below it. Roll back when ``harm_lower_bound > margin``, i.e.
    ``L_B > (1 + margin) U_A`` for lower-is-better latency. Bounds may be -inf/+inf when an arm
    has too few observations.
    """
    check_probability("p", p)
    check_probability("alpha", alpha)
    side_alpha = alpha / 2.0
    control_interval = quantile_cs(control, p, alpha=side_alpha, t_opt=t_opt, one_sided=True)
    treatment_interval = quantile_cs(treatment, p, alpha=side_alpha, t_opt=t_opt, one_sided=True)
    control_lower, control_upper = control_interval
    treatment_lower, treatment_upper = treatment_interval
    # Ratio bounds: smallest plausible q_B/q_A and largest plausible q_B/q_A.
    smallest_ratio = _safe_ratio(treatment_lower, control_upper)
    largest_ratio = _safe_ratio(treatment_upper, control_lower)
    smallest_ratio = 0.0 if math.isnan(smallest_ratio) else smallest_ratio
    largest_ratio = math.inf if math.isnan(largest_ratio) else largest_ratio
    if lower_is_better:
        harm_lower, harm_upper = smallest_ratio - 1.0, largest_ratio - 1.0
    else:
        harm_lower, harm_upper = 1.0 - largest_ratio, 1.0 - smallest_ratio
    control_estimate = _point_quantile(control, p)
    treatment_estimate = _point_quantile(treatment, p)
    relative_effect = (
        treatment_estimate / control_estimate - 1.0 if control_estimate > 0.0 else math.nan
    )
    return QuantileGuardrailResult(
        p=p,
        n_control=control.count,
        n_treatment=treatment.count,
        control_estimate=control_estimate,
        treatment_estimate=treatment_estimate,
        control_interval=control_interval,
        treatment_interval=treatment_interval,
        harm_lower_bound=harm_lower,
        harm_upper_bound=harm_upper,
        relative_effect=relative_effect,
    )
