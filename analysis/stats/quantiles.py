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

The boundaries themselves are in :mod:`analysis.stats.quantile_boundaries`. The always-valid
two-sample test (reporting only; confseq's ``quantile_ab_p_value``, STATS.md 8.2) is in
:mod:`analysis.stats.quantile_ab`, and the fixed-horizon (Deng, Knoblich & Yu 2018) interval
on a quantile difference in :mod:`analysis.stats.quantiles_fixed`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

import numpy as np

from analysis.stats.quantile_boundaries import (
    beta_binomial_mixture_bound,
    check_probability,
    check_t_opt,
    double_stitching_bound,
)

QuantileMethod = Literal["beta_binomial", "stitching"]


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
