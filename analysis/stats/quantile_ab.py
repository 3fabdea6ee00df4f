"""Always-valid two-sample test of equal latency quantiles (p50/p95/p99) between two arms.

Works on bucket counts of a log-bucketed latency histogram
(``routing.observe.histogram.LogHistogram``, or anything with the same bucket interface, see
:class:`analysis.stats.quantiles.LatencyHistogram`),
or on exact observations. Reporting only: two-sided, no margin; the guardrail and the one-arm
confidence sequences are in :mod:`analysis.stats.quantiles`. STATS.md 8.2 is the spec.

confseq's ``quantile_ab_p_value``: Howard & Ramdas 2022, "Sequential estimation of quantiles with
applications to A/B-testing and best-arm identification", Bernoulli 28(3) (arXiv 1906.09712),
A/B-testing section. Each arm contributes the two-sided beta-binomial mixture of Howard, Ramdas,
McAuliffe & Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann.
Statist. 49(2), section 3
(:func:`analysis.stats.quantile_boundaries.beta_binomial_log_mixture`), tuned at ``t_opt`` per
arm and at confseq's default level ``AB_TEST_ALPHA_OPT``. From histograms each bucket is
treated as an interval of possible empirical-CDF values (conservative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import optimize

from analysis.stats.quantile_boundaries import (
    FloatArray,
    beta_binomial_r,
    check_probability,
    check_t_opt,
    log_mixture_array,
)
from analysis.stats.quantiles import LatencyHistogram

# confseq's default tuning level for the two-sample test's mixture (STATS.md 8.2).
AB_TEST_ALPHA_OPT = 0.05


@dataclass(frozen=True, slots=True)
class _EmpiricalCdfCells:
    """For each cell of the value axis, the range of an arm's empirical CDF inside the cell."""

    total: int
    lowest: FloatArray  # smallest proportion of observations <= x for x in the cell
    highest: FloatArray  # largest such proportion


def _arm_log_mixture_minimum(cells: _EmpiricalCdfCells, p: float, t_opt: float) -> FloatArray:
    """Per cell, the smallest G(x) = log M((F(x) - p) N, p(1-p) N) over the cell's CDF range.

    log M of the two-sided mixture is convex in ``s`` (a log of a mixture of exponentials), so on
    an interval of proportions its minimum is at the unconstrained minimiser clipped to the
    interval. For exact samples this equals confseq's handling of the minimiser's "flat region".
    """
    g, h = p, 1.0 - p
    v = p * (1.0 - p) * cells.total
    r = beta_binomial_r(p * (1.0 - p) * t_opt, AB_TEST_ALPHA_OPT, g, h, one_sided=False)

    def log_mixture_of_proportion(proportion: float) -> float:
        s = (proportion - p) * cells.total
        return float(log_mixture_array(s, v, g=g, h=h, r=r, one_sided=False))

    minimiser = optimize.minimize_scalar(
        log_mixture_of_proportion, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}
    ).x
    proportions = np.clip(float(minimiser), cells.lowest, cells.highest)
    values = log_mixture_array((proportions - p) * cells.total, v, g=g, h=h, r=r, one_sided=False)
    return np.asarray(values, dtype=np.float64)


def _two_sample_p_value(
    control: _EmpiricalCdfCells, treatment: _EmpiricalCdfCells, p: float, t_opt: float
) -> float:
    if control.total == 0 or treatment.total == 0:
        return 1.0
    combined = _arm_log_mixture_minimum(control, p, t_opt) + _arm_log_mixture_minimum(
        treatment, p, t_opt
    )
    return min(1.0, math.exp(-float(np.min(combined))))


def _histogram_cells(
    histogram: LatencyHistogram, cell_indices: NDArray[np.int64]
) -> _EmpiricalCdfCells:
    counts = dict(histogram)
    total = histogram.count
    per_cell = np.array([counts.get(int(index), 0) for index in cell_indices], dtype=np.float64)
    at_or_below = np.cumsum(per_cell)
    below = at_or_below - per_cell
    scale = 1.0 / total if total else 0.0
    return _EmpiricalCdfCells(total=total, lowest=below * scale, highest=at_or_below * scale)


def quantile_ab_p_value(
    control: LatencyHistogram,
    treatment: LatencyHistogram,
    *,
    p: float,
    t_opt: float,
) -> float:
    """Always-valid two-sided p-value for equal ``p``-quantiles, from histograms (STATS.md 8.2).

    Howard & Ramdas 2022, A/B testing of quantiles (confseq ``quantile_ab_p_value``):
    ``p = min(1, exp(-min_x [G_A(x) + G_B(x)]))`` with
    ``G_a(x) = log M_a((F_a(x) - p) N_a, p(1-p) N_a)`` (two-sided beta-binomial mixture, tuned at
    ``t_opt`` per arm). Within a bucket the empirical CDFs are only known to lie between the
    bucket's cumulative counts, so each arm's ``G`` is minimised over that range: the minimum
    can only go down and the p-value only up (conservative). No margin, two-sided: for
    reporting, not for guardrails.
    """
    check_probability("p", p)
    check_t_opt(t_opt)
    if control.relative_accuracy != treatment.relative_accuracy:
        raise ValueError("histograms must share their bucketing (relative accuracy)")
    cell_indices = np.array(
        sorted({index for index, _ in control} | {index for index, _ in treatment}),
        dtype=np.int64,
    )
    return _two_sample_p_value(
        _histogram_cells(control, cell_indices),
        _histogram_cells(treatment, cell_indices),
        p,
        t_opt,
    )


def _sample_cells(sorted_values: FloatArray, cell_values: FloatArray) -> _EmpiricalCdfCells:
    total = len(sorted_values)
    scale = 1.0 / total if total else 0.0
    strictly_below = np.searchsorted(sorted_values, cell_values, side="left")
    at_or_below = np.searchsorted(sorted_values, cell_values, side="right")
    return _EmpiricalCdfCells(
        total=total,
        lowest=strictly_below.astype(np.float64) * scale,
        highest=at_or_below.astype(np.float64) * scale,
    )


def quantile_ab_p_value_from_samples(
    control_values: Sequence[float] | FloatArray,
    treatment_values: Sequence[float] | FloatArray,
    *,
    p: float,
    t_opt: float,
) -> float:
    """The same always-valid p-value from exact observations (each distinct value is a cell)."""
    check_probability("p", p)
    check_t_opt(t_opt)
    control_sorted = np.sort(np.asarray(control_values, dtype=np.float64))
    treatment_sorted = np.sort(np.asarray(treatment_values, dtype=np.float64))
    cell_values = np.unique(np.concatenate([control_sorted, treatment_sorted]))
    return _two_sample_p_value(
        _sample_cells(control_sorted, cell_values),
        _sample_cells(treatment_sorted, cell_values),
        p,
        t_opt,
    )
