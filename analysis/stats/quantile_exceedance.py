"""Anytime-valid, contemporaneous quantile guardrail: a threshold-exceedance e-process.

STATS.md 8 and 12.2 are the spec; Rampart issue 12 items 2, 3 and 5 the motivation. The test
compares canary and control on data from the same time windows (the proxy's per-(arm,
10-second bucket) histograms), and its running maximum gives the always-valid p-value.

Construction (one bet per time window ``w``, in time order)
    1. *Predictable threshold.* ``c_w`` is control's ``p``-quantile over the latest control
       observations of *earlier* windows (at least ``min_reference``, at most about
       ``reference_size`` of them): the upper edge of the histogram bucket that holds rank
       ``ceil(p n)``. It is fixed before window ``w`` is looked at.
    2. *Binary outcomes.* In window ``w`` control has ``n_A`` requests of which ``x_A`` are
       above ``c_w``; the canary has ``n_B`` requests of which ``x_B`` are above
       ``(1 + m) c_w`` (``m`` = the relative margin). Bucketing is handled conservatively: a
       canary bucket counts only if its lower edge is at or above ``(1 + m) c_w``, so ``x_B``
       can only be under-counted; ``c_w`` is a bucket edge, so ``x_A`` is exact.
    3. *Exact conditional bet.* Given the window's counts ``n_A, n_B`` and the number of
       exceedances ``k = x_A + x_B``, ``x_B`` follows Fisher's noncentral hypergeometric law
       with odds ratio ``psi`` (the canary's exceedance odds over control's); ``psi = 1`` is
       the central hypergeometric. The window's e-value is the likelihood ratio
       ``E_w = psi_w^x_B / E_1[psi_w^X]`` (Fisher 1935 conditional test; the normaliser is the
       hypergeometric moment generating function, computed exactly), with ``psi_w >= 1``
       chosen from earlier windows only: the Mantel-Haenszel common odds ratio (Mantel &
       Haenszel 1959, JNCI 22, eq. for ``OR_MH``) with a pseudo-count, clipped to
       ``[1, MAX_ODDS_RATIO]`` (Robbins' predictable plug-in, see Ramdas, Grünwald, Vovk &
       Shafer 2023, "Game-theoretic statistics and safe anytime-valid inference", Statist.
       Sci. 38(4), section 5).
    4. The wealth ``W_t = prod_{w <= t} E_w`` is a test supermartingale; the guardrail fires
       when ``W_t >= 1/alpha`` and the always-valid p-value is ``min(1, 1 / max_{s<=t} W_s)``
       (Ville's inequality: ``P(sup_t W_t >= 1/alpha) <= alpha``).

Null hypothesis and guarantee
    H0: in every window, the canary's latency divided by ``1 + m`` is stochastically no larger
    than control's (``P_B(X > (1+m)c) <= P_A(X > c)`` for every ``c``), requests of one window
    being independent given the past. It contains every A/A test, every drift or ramp that
    moves both arms together (the comparison never leaves its window), and any canary no
    slower than ``1 + m`` times control at every level. Under H0, given the past and the
    window's counts, the true odds ratio at the predictable ``c_w`` is ``<= 1``; Fisher's law is
    stochastically increasing in its odds ratio and ``psi_w^x`` is increasing in ``x``, so
    ``E[E_w | past, counts] <= 1``. Hence ``P(ever fires) <= alpha`` at any number of looks,
    for every window size and with no burn-in. The threshold must be predictable: a threshold
    taken from the window's own control data could correlate with ``x_A`` and inflate the
    error. What is *not* covered: a canary whose distribution crosses control's right at the
    estimated threshold (better p95 but a heavier tail just above it is flagged, since that
    *is* more requests above the threshold), and requests that are not independent given the
    past (sticky users with their own latency levels: measured in ``bench/quantile_power.py``).

Degenerate data needs no special case: a canary at a constant 1,000 ms against a variable
100 ms control has every request above ``c_w`` while control has about ``1 - p`` of them; two
constant, equal arms have no exceedances at all (``k = 0``, ``E_w = 1``).

The reverse e-process (``psi_w <= 1``, canary buckets counted if their upper edge is above
``(1 + m) c_w``) tests the opposite null and shows non-inferiority ("safe").

Reported effect (contemporaneous): the canary's ``p``-quantile over control's histogram
reweighted to the canary's time profile, ``h~_A = sum_w (n_B,w / n_A,w) h_A,w`` (STATS.md 12.2,
standardisation), minus one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import special

from analysis.stats.quantiles import LatencyHistogram, check_probability

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

METHOD = "exceedance e-process (per time window)"
# Largest odds ratio a window bets on: caps the loss when an early estimate is noisy.
MAX_ODDS_RATIO = 20.0
# Pseudo-count of the Mantel-Haenszel sums (weight of the prior odds ratio below).
ODDS_PSEUDO_COUNT = 2.0
# Prior odds ratio of the harm bet before any window is seen (its inverse for the safety bet).
# Tuning only (validity holds for any predictable choice): 2 cut the median stopping size
# for p95 +20% from 1.3x to 0.9x the fixed-horizon size in bench/quantile_power.py.
PRIOR_ODDS_RATIO = 2.0


def default_reference_size(p: float) -> int:
    """Control observations behind each window's threshold: ~100 expected exceedances."""
    return math.ceil(100.0 / min(p, 1.0 - p))


def default_min_reference(p: float) -> int:
    """Fewest control observations before any bet: ~10 expected exceedances."""
    return math.ceil(10.0 / min(p, 1.0 - p))


class WindowedLatencyHistogram(LatencyHistogram, Protocol):
    """A cumulative histogram that also keeps its per-time-window parts (keys sort by time)."""

    @property
    def windows(self) -> Mapping[object, LatencyHistogram]: ...


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Per window: requests and exceedances of each arm (``n_*``, ``x_*``)."""

    n_control: IntArray
    x_control: IntArray
    n_treatment: IntArray
    x_treatment: IntArray


def hypergeometric_log_mgf(
    n_a: IntArray, n_b: IntArray, k: IntArray, log_psi: FloatArray
) -> FloatArray:
    """``log E[psi^X]`` for X ~ Hypergeometric(draws k from n_b marked among n_a + n_b), per row."""
    n_a, n_b, k = (np.asarray(v, dtype=np.int64) for v in (n_a, n_b, k))
    log_psi = np.asarray(log_psi, dtype=np.float64)
    low = np.maximum(0, k - n_a)
    high = np.minimum(k, n_b)
    lengths = high - low + 1
    rows = np.repeat(np.arange(len(k)), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    x = low[rows] + np.arange(int(lengths.sum())) - starts[rows]
    total = n_a + n_b

    def log_choose(n: IntArray, r: IntArray) -> FloatArray:
        return np.asarray(
            special.gammaln(n + 1.0) - special.gammaln(r + 1.0) - special.gammaln(n - r + 1.0),
            dtype=np.float64,
        )

    terms = (
        log_choose(n_b[rows], x)
        + log_choose(n_a[rows], k[rows] - x)
        - log_choose(total[rows], k[rows])
        + x * log_psi[rows]
    )
    peak = np.maximum.reduceat(terms, starts) if len(terms) else np.zeros(0)
    sums = np.add.reduceat(np.exp(terms - peak[rows]), starts) if len(terms) else np.zeros(0)
    return np.asarray(peak + np.log(sums), dtype=np.float64)


def fisher_log_e_values(counts: WindowCounts, log_psi: FloatArray) -> FloatArray:
    """``log E_w = x_B log psi_w - log E_1[psi_w^X]`` per window (0 where nothing is bet)."""
    n_a, x_a = counts.n_control, counts.x_control
    n_b, x_b = counts.n_treatment, counts.x_treatment
    k = x_a + x_b
    active = (n_a > 0) & (n_b > 0) & (k > 0) & (k < n_a + n_b) & (log_psi != 0.0)
    result = np.zeros(len(k), dtype=np.float64)
    if active.any():
        log_mgf = hypergeometric_log_mgf(n_a[active], n_b[active], k[active], log_psi[active])
        result[active] = x_b[active] * log_psi[active] - log_mgf
    return result


def predictable_log_odds(counts: WindowCounts, *, harm: bool) -> FloatArray:
    """Per window, the log Mantel-Haenszel odds ratio of the *earlier* windows, clipped.

    ``harm`` bets on a larger canary exceedance odds (clip to ``[0, log MAX]``), otherwise on
    a smaller one (clip to ``[-log MAX, 0]``).
    """
    n = (counts.n_control + counts.n_treatment).astype(np.float64)
    safe_n = np.where(n > 0, n, 1.0)
    numerator = counts.x_treatment * (counts.n_control - counts.x_control) / safe_n
    denominator = counts.x_control * (counts.n_treatment - counts.x_treatment) / safe_n
    before_num = np.concatenate(([0.0], np.cumsum(numerator)[:-1]))
    before_den = np.concatenate(([0.0], np.cumsum(denominator)[:-1]))
    prior = PRIOR_ODDS_RATIO if harm else 1.0 / PRIOR_ODDS_RATIO
    log_odds = np.log((before_num + ODDS_PSEUDO_COUNT * prior) / (before_den + ODDS_PSEUDO_COUNT))
    cap = math.log(MAX_ODDS_RATIO)
    return np.clip(log_odds, 0.0, cap) if harm else np.clip(log_odds, -cap, 0.0)


@dataclass(frozen=True, slots=True)
class DenseWindows:
    """Per-window bucket counts of both arms on a common sorted bucket axis."""

    control: IntArray  # windows x buckets
    treatment: IntArray
    lower_edges: FloatArray
    upper_edges: FloatArray
    representatives: FloatArray


def window_thresholds(
    control: IntArray, *, p: float, lower_is_better: bool, reference_size: int, min_reference: int
) -> IntArray:
    """Per window, the bucket (axis position) of control's predictable p-quantile, -1 if none.

    The reference is control's most recent earlier windows holding at least
    ``reference_size`` observations (all earlier ones while fewer exist).
    """
    windows = control.shape[0]
    per_window = control.sum(axis=1)
    prefix = np.concatenate(([0], np.cumsum(per_window)))
    cumulative = np.vstack(
        [np.zeros((1, control.shape[1]), dtype=np.int64), np.cumsum(control, axis=0)]
    )
    result = np.full(windows, -1, dtype=np.int64)
    for w in range(windows):
        start = int(np.searchsorted(prefix, prefix[w] - reference_size, side="right")) - 1
        start = min(max(start, 0), w)
        size = int(prefix[w] - prefix[start])
        if size < max(min_reference, 1):
            continue
        reference = cumulative[w] - cumulative[start]
        rank = max(1, math.ceil(p * size))
        result[w] = int(np.searchsorted(np.cumsum(reference), rank, side="left"))
    del lower_is_better  # the same bucket holds the quantile for either direction
    return result


def exceedance_counts(
    dense: DenseWindows,
    thresholds: IntArray,
    *,
    margin: float,
    lower_is_better: bool,
    harm: bool,
) -> WindowCounts:
    """Per window, requests and threshold exceedances of both arms (conservative bucketing).

    Lower is better: control exceeds when above ``c`` (the upper edge of the threshold bucket),
    the canary when above ``(1 + m) c``. Higher is better: control when at or below ``c`` (the
    threshold bucket's lower edge), the canary when at or below ``(1 - m) c``. For the harm
    test a canary bucket counts only if all of it is past the canary's threshold; for the
    safety test, if any of it may be.
    """
    n_a = dense.control.sum(axis=1)
    n_b = dense.treatment.sum(axis=1)
    x_a = np.zeros_like(n_a)
    x_b = np.zeros_like(n_b)
    buckets = dense.control.shape[1]
    positions = np.arange(buckets)
    for w in np.flatnonzero(thresholds >= 0):
        i = int(thresholds[w])
        if lower_is_better:
            canary_cut = (1.0 + margin) * dense.upper_edges[i]
            control_mask = positions > i
            edges = dense.lower_edges if harm else dense.upper_edges
            canary_mask = edges >= canary_cut if harm else edges > canary_cut
        else:
            canary_cut = (1.0 - margin) * dense.lower_edges[i]
            control_mask = positions < i
            edges = dense.upper_edges if harm else dense.lower_edges
            canary_mask = edges <= canary_cut if harm else edges < canary_cut
        x_a[w] = dense.control[w, control_mask].sum()
        x_b[w] = dense.treatment[w, canary_mask].sum()
    skip = thresholds < 0
    return WindowCounts(
        n_control=np.where(skip, 0, n_a),
        x_control=np.where(skip, 0, x_a),
        n_treatment=np.where(skip, 0, n_b),
        x_treatment=np.where(skip, 0, x_b),
    )


@dataclass(frozen=True, slots=True)
class ExceedanceResult:
    """The e-processes after the last window, and the contemporaneous effect estimate.

    ``p_value`` = ``min(1, 1 / max wealth)`` of the harm e-process (always valid);
    ``safe_p_value`` the same for the reverse e-process (non-inferiority).
    """

    log_e_value: float
    max_log_e_value: float
    p_value: float
    safe_log_e_value: float
    safe_p_value: float
    windows: int
    windows_bet: int
    n_control: int
    n_treatment: int
    exceed_control: int
    exceed_treatment: int
    threshold_ms: float
    relative_effect: float
    method: str = METHOD

    def fired(self, alpha: float) -> bool:
        return self.max_log_e_value >= math.log(1.0 / alpha)

    def safe(self, alpha: float) -> bool:
        return self.safe_log_e_value >= math.log(1.0 / alpha)


def _standardised_effect(dense: DenseWindows, p: float) -> float:
    """Canary p-quantile over control's reweighted to the canary's time profile, minus 1."""
    n_a = dense.control.sum(axis=1)
    n_b = dense.treatment.sum(axis=1)
    both = (n_a > 0) & (n_b > 0)
    if not both.any():
        return math.nan
    weights = np.where(both, n_b / np.where(n_a > 0, n_a, 1), 0.0)
    control = (dense.control * weights[:, None]).sum(axis=0)
    treatment = dense.treatment[both].sum(axis=0).astype(np.float64)

    def quantile(counts: FloatArray) -> float:
        cumulative = np.cumsum(counts)
        position = int(np.searchsorted(cumulative, p * cumulative[-1] * (1 - 1e-12), side="left"))
        return float(dense.representatives[min(position, len(counts) - 1)])

    return quantile(treatment) / quantile(control) - 1.0


def harm_log_e_path(
    dense: DenseWindows,
    *,
    p: float,
    margin: float = 0.0,
    lower_is_better: bool = True,
    reference_size: int | None = None,
    min_reference: int | None = None,
) -> FloatArray:
    """The harm e-process's log wealth after each window (for simulations)."""
    thresholds = window_thresholds(
        dense.control,
        p=p,
        lower_is_better=lower_is_better,
        reference_size=reference_size or default_reference_size(p),
        min_reference=min_reference if min_reference is not None else default_min_reference(p),
    )
    harm = exceedance_counts(
        dense, thresholds, margin=margin, lower_is_better=lower_is_better, harm=True
    )
    return np.cumsum(fisher_log_e_values(harm, predictable_log_odds(harm, harm=True)))


def exceedance_test_dense(
    dense: DenseWindows,
    *,
    p: float,
    margin: float = 0.0,
    lower_is_better: bool = True,
    reference_size: int | None = None,
    min_reference: int | None = None,
) -> ExceedanceResult:
    """Run the harm and the safety e-processes over the windows (see the module docstring)."""
    check_probability("p", p)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    reference_size = reference_size or default_reference_size(p)
    min_reference = min_reference if min_reference is not None else default_min_reference(p)
    thresholds = window_thresholds(
        dense.control,
        p=p,
        lower_is_better=lower_is_better,
        reference_size=reference_size,
        min_reference=min_reference,
    )
    harm = exceedance_counts(
        dense, thresholds, margin=margin, lower_is_better=lower_is_better, harm=True
    )
    safe = exceedance_counts(
        dense, thresholds, margin=margin, lower_is_better=lower_is_better, harm=False
    )
    path = np.cumsum(fisher_log_e_values(harm, predictable_log_odds(harm, harm=True)))
    safe_log_e = fisher_log_e_values(safe, predictable_log_odds(safe, harm=False))
    max_log_e = max(0.0, float(path.max())) if len(path) else 0.0
    bet = thresholds >= 0
    last = int(thresholds[bet][-1]) if bet.any() else -1
    threshold_ms = math.nan
    if last >= 0:
        threshold_ms = float(
            dense.upper_edges[last] if lower_is_better else dense.lower_edges[last]
        )
    return ExceedanceResult(
        log_e_value=float(path[-1]) if len(path) else 0.0,
        max_log_e_value=max_log_e,
        p_value=min(1.0, math.exp(-max_log_e)),
        safe_log_e_value=float(safe_log_e.sum()),
        safe_p_value=min(1.0, math.exp(-max(0.0, float(np.cumsum(safe_log_e).max(initial=0.0))))),
        windows=int(dense.control.shape[0]),
        windows_bet=int(bet.sum()),
        n_control=int(harm.n_control.sum()),
        n_treatment=int(harm.n_treatment.sum()),
        exceed_control=int(harm.x_control.sum()),
        exceed_treatment=int(harm.x_treatment.sum()),
        threshold_ms=threshold_ms,
        relative_effect=_standardised_effect(dense, p),
    )


def dense_windows(
    windows: Sequence[tuple[LatencyHistogram | None, LatencyHistogram | None]],
) -> DenseWindows:
    """Per-window (control, canary) histograms, in time order, on one sorted bucket axis."""
    indices: set[int] = set()
    edge_source: LatencyHistogram | None = None
    for pair in windows:
        for histogram in pair:
            if histogram is not None and histogram.count:
                indices.update(index for index, _ in histogram)
                edge_source = edge_source or histogram
    axis = sorted(indices)
    position = {index: column for column, index in enumerate(axis)}
    control = np.zeros((len(windows), len(axis)), dtype=np.int64)
    treatment = np.zeros((len(windows), len(axis)), dtype=np.int64)
    accuracy = None
    for row, pair in enumerate(windows):
        for target, histogram in zip((control, treatment), pair, strict=True):
            if histogram is None:
                continue
            if accuracy is None and histogram.count:
                accuracy = histogram.relative_accuracy
            elif histogram.count and histogram.relative_accuracy != accuracy:
                raise ValueError("histograms must share their bucketing (relative accuracy)")
            for index, count in histogram:
                target[row, position[index]] += count
    if edge_source is None:
        empty = np.zeros(0, dtype=np.float64)
        return DenseWindows(control, treatment, empty, empty, empty)
    return DenseWindows(
        control=control,
        treatment=treatment,
        lower_edges=np.array([edge_source.lower_edge(i) for i in axis], dtype=np.float64),
        upper_edges=np.array([edge_source.upper_edge(i) for i in axis], dtype=np.float64),
        representatives=np.array([edge_source.representative(i) for i in axis], dtype=np.float64),
    )


def aligned_windows(
    control: WindowedLatencyHistogram, treatment: WindowedLatencyHistogram
) -> list[tuple[LatencyHistogram | None, LatencyHistogram | None]]:
    """The two arms' windows paired by key, in key (time) order."""
    keys = sorted(set(control.windows) | set(treatment.windows))  # type: ignore[type-var]
    return [(control.windows.get(key), treatment.windows.get(key)) for key in keys]


def exceedance_test(
    control: WindowedLatencyHistogram,
    treatment: WindowedLatencyHistogram,
    *,
    p: float,
    margin: float = 0.0,
    lower_is_better: bool = True,
    reference_size: int | None = None,
    min_reference: int | None = None,
) -> ExceedanceResult:
    """The exceedance e-processes of two windowed histograms (see the module docstring)."""
    return exceedance_test_dense(
        dense_windows(aligned_windows(control, treatment)),
        p=p,
        margin=margin,
        lower_is_better=lower_is_better,
        reference_size=reference_size,
        min_reference=min_reference,
    )
