"""Anytime-valid, contemporaneous quantile guardrail: a threshold-exceedance e-process.

STATS.md 8 and 12.2 are the spec; Rampart issue 12 items 2, 3 and 5 the motivation. The test
compares canary and control on data from the same time windows (the proxy's per-(arm,
10-second bucket) log histograms, merged into windows of at least ``min_window`` requests), and
its running maximum gives the always-valid p-value.

Construction, for a lower-is-better quantile ``p`` with relative margin ``m`` (one bet per window)
    1. *Margin as a shift.* Histogram bucket ``i`` holds ``(g^(i-1), g^i]`` (``g`` = the bucket
       ratio). The canary's bucket indices are lowered by ``s = ceil(log(1 + m) / log g)``, which
       divides every canary value by at least ``1 + m``.
    2. *Label-blind threshold.* In the window, pool control and the shifted canary
       (``n = n_A + n_B`` requests) and take the top ``K = n - ceil(p n)`` of them (the values
       above the pooled ``p``-quantile), ties inside the threshold bucket broken uniformly at
       random. ``x_B`` = how many of the top ``K`` are canary requests. This is Mood's median
       test generalised to the ``p``-quantile (Mood 1950, "Introduction to the Theory of
       Statistics", ch. 16).
    3. *Exact conditional bet.* If the window's requests are exchangeable between arms (the
       null's boundary), then given the pooled values the arm labels are a uniformly random
       assignment of ``n_B`` canary labels, so ``x_B ~ Hypergeometric(n, n_B, K)``. The window's
       e-value is Fisher's noncentral hypergeometric likelihood ratio
       ``E_w = psi^x_B / E_1[psi^X]`` (Fisher 1935 conditional test; the normaliser is the
       hypergeometric moment generating function, computed exactly), averaged over the
       tie-breaking (``psi^a E[psi^Y]``, ``Y`` hypergeometric inside the threshold bucket), so it
       is deterministic. ``psi >= 1`` comes from earlier windows only: the Mantel-Haenszel
       common odds ratio (Mantel & Haenszel 1959, JNCI 22(4)) with a prior pseudo-count,
       clipped to ``[1, MAX_ODDS_RATIO]`` (Robbins' predictable plug-in; Ramdas, Grünwald, Vovk &
       Shafer 2023, "Game-theoretic statistics and safe anytime-valid inference", Statist.
       Sci. 38(4), section 5).
    4. The wealth ``W_t = prod_{w <= t} E_w`` is a test supermartingale; the guardrail fires
       when ``W_t >= 1/alpha``, and the always-valid p-value is ``min(1, 1 / max_{s<=t} W_s)``
       (Ville's inequality: ``P(sup_t W_t >= 1/alpha) <= alpha``).

Null hypothesis and guarantee
    H0: in every window the canary's latency is stochastically no larger than ``1 + m`` times
    control's (``P_B(X > (1+m)c) <= P_A(X > c)`` for every ``c``), requests being independent
    given the past. It contains every A/A test, every drift or ramp step that moves both arms
    together (a comparison never leaves its window, so load drift cannot bias it), and any
    canary that is nowhere slower than ``1 + m`` times control. Why it is valid: bucketing rounds
    ``(1+m) X`` up by at most ``s`` buckets, so the shifted canary indices are stochastically no
    larger than control's; couple them with an exchangeable copy that is pointwise larger.
    Lowering one canary value can only swap it out of the fixed-size top-``K`` set for another
    value, so ``x_B`` only falls, and ``psi^x`` is increasing: ``E[E_w | past, counts] <= 1``.
    The threshold never looks at the labels, so it cannot inflate the error, and none of
    this needs a burn-in: ``P(ever fires) <= alpha`` at any number of looks.
    Not covered: requests that are not independent given the past, i.e. sticky users with
    their own latency levels (a per-request test then over-counts evidence; measured in
    ``bench/quantile_power.py``; guardrails therefore use ``analysis.stats.quantile_users``,
    which takes the user as the unit), and a canary that is better at ``p`` but slower elsewhere
    near the pooled threshold, which is flagged because it *does* put more requests above it.

Degenerate data needs no special case: a canary at a constant 1,000 ms against a variable
100 ms control owns the whole top ``K``; two constant, equal arms tie in one bucket, where the
tie-averaged e-value is exactly 1.

The reverse e-process (canary shifted by ``floor(log(1 + m) / log g)``, ``psi <= 1``) tests the
opposite null, "the canary is at least ``1 + m`` times slower", and shows non-inferiority. Both
are inverted over shifts for the always-valid bounds on the harm factor, in bucket steps.
Higher-is-better quantiles reverse the bucket axis (the low tail is the bad one).

Reported effect (contemporaneous): the canary's ``p``-quantile over control's histogram
reweighted to the canary's time profile, ``h~_A = sum_w (n_B,w / n_A,w) h_A,w`` (STATS.md 12.2,
standardisation), minus one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import special

from analysis.stats.quantile_boundaries import check_probability
from analysis.stats.quantiles import LatencyHistogram

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

METHOD = "exceedance e-process, per time window"
# Largest odds ratio a window bets on: caps the loss when an early estimate is noisy.
MAX_ODDS_RATIO = 20.0
# Pseudo-count of the Mantel-Haenszel sums (the weight of the prior odds ratio below).
ODDS_PSEUDO_COUNT = 2.0
# Prior odds ratio of the harm bet before any window is seen (its inverse for the safety bet).
# Tuning only (validity holds for any predictable choice): 2 rather than 1 cut the median
# stopping size for p95 +20% from 1.3x to 0.9x the fixed-horizon size (bench/quantile_power.py).
PRIOR_ODDS_RATIO = 2.0
# Bounds are searched over canary shifts of up to this many buckets (2% each at 1% accuracy).
MAX_SHIFT = 256


def default_min_window(p: float) -> int:
    """Fewest pooled requests per window: about 10 above (or below) the quantile."""
    return math.ceil(10.0 / min(p, 1.0 - p))


class WindowedLatencyHistogram(LatencyHistogram, Protocol):
    """A cumulative histogram that also keeps its per-time-window parts (keys sort by time)."""

    @property
    def windows(self) -> Mapping[object, LatencyHistogram]: ...


@dataclass(frozen=True, slots=True)
class DenseWindows:
    """Per-window bucket counts of both arms on one contiguous bucket axis, in time order.

    Column ``j`` is bucket ``first_index + j``; ``log_ratio`` is the log of the bucket ratio.
    """

    control: IntArray  # windows x buckets
    treatment: IntArray
    first_index: int
    log_ratio: float
    lower_edges: FloatArray
    upper_edges: FloatArray
    representatives: FloatArray


def hypergeometric_log_mgf(
    n_a: IntArray, n_b: IntArray, k: IntArray, log_psi: FloatArray
) -> FloatArray:
    """``log E[psi^X]`` per row, X ~ Hypergeometric(k draws, n_b marked among n_a + n_b)."""
    n_a, n_b, k = (np.asarray(v, dtype=np.int64) for v in (n_a, n_b, k))
    log_psi = np.asarray(log_psi, dtype=np.float64)
    if len(k) == 0:
        return np.zeros(0, dtype=np.float64)
    low = np.maximum(0, k - n_a)
    high = np.minimum(k, n_b)
    lengths = high - low + 1
    rows = np.repeat(np.arange(len(k)), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    x = low[rows] + np.arange(int(lengths.sum())) - starts[rows]

    def log_choose(n: IntArray, r: IntArray) -> FloatArray:
        return np.asarray(
            special.gammaln(n + 1.0) - special.gammaln(r + 1.0) - special.gammaln(n - r + 1.0),
            dtype=np.float64,
        )

    terms = (
        log_choose(n_b[rows], x)
        + log_choose(n_a[rows], k[rows] - x)
        - log_choose(n_a[rows] + n_b[rows], k[rows])
        + x * log_psi[rows]
    )
    peak = np.maximum.reduceat(terms, starts)
    sums = np.add.reduceat(np.exp(terms - peak[rows]), starts)
    return np.asarray(peak + np.log(sums), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class WindowBets:
    """Per window: arm sizes, top-``K`` size, canary count strictly above the threshold
    bucket, and the threshold bucket's composition and draws (ties)."""

    n_control: IntArray
    n_treatment: IntArray
    top: IntArray
    above_treatment: IntArray
    tie_total: IntArray
    tie_treatment: IntArray
    tie_draws: IntArray
    threshold: IntArray  # column of the threshold bucket on the unshifted axis

    @property
    def expected_treatment(self) -> FloatArray:
        share = self.tie_treatment / np.maximum(self.tie_total, 1)
        return np.asarray(self.above_treatment + self.tie_draws * share, dtype=np.float64)


def window_bets(control: IntArray, treatment: IntArray, *, shift: int, level: float) -> WindowBets:
    """The top-``K`` sets of every window, with the canary lowered by ``shift`` buckets."""
    windows, width = control.shape
    pad = abs(shift)
    padded_control = np.zeros((windows, width + 2 * pad), dtype=np.int64)
    padded_treatment = np.zeros_like(padded_control)
    padded_control[:, pad : pad + width] = control
    padded_treatment[:, pad - shift : pad - shift + width] = treatment
    pooled = np.cumsum(padded_control + padded_treatment, axis=1)
    cumulative_treatment = np.cumsum(padded_treatment, axis=1)
    n_a = control.sum(axis=1)
    n_b = treatment.sum(axis=1)
    n = n_a + n_b
    rank = np.maximum(np.ceil(level * n - 1e-9).astype(np.int64), 1)
    column = np.argmax(pooled >= rank[:, None], axis=1)
    rows = np.arange(windows)
    at_or_below = pooled[rows, column]
    below = at_or_below - (padded_control + padded_treatment)[rows, column]
    treatment_at_or_below = cumulative_treatment[rows, column]
    tie_treatment = padded_treatment[rows, column]
    active = (n_a > 0) & (n_b > 0)
    return WindowBets(
        n_control=np.where(active, n_a, 0),
        n_treatment=np.where(active, n_b, 0),
        top=np.where(active, n - rank, 0),
        above_treatment=np.where(active, n_b - treatment_at_or_below, 0),
        tie_total=np.where(active, at_or_below - below, 0),
        tie_treatment=np.where(active, tie_treatment, 0),
        tie_draws=np.where(active, at_or_below - rank, 0),
        threshold=np.clip(column - pad, 0, width - 1),
    )


def fisher_log_e_values(bets: WindowBets, log_psi: FloatArray) -> FloatArray:
    """``log E_w = a log psi + log E[psi^Y] - log E_1[psi^X]`` per window (0 if no bet)."""
    active = (bets.top > 0) & (bets.n_control > 0) & (bets.n_treatment > 0) & (log_psi != 0.0)
    result = np.zeros(len(bets.top), dtype=np.float64)
    if not active.any():
        return result
    log_psi = log_psi[active]
    tie_total, tie_treatment = bets.tie_total[active], bets.tie_treatment[active]
    tie = hypergeometric_log_mgf(
        tie_total - tie_treatment, tie_treatment, bets.tie_draws[active], log_psi
    )
    whole = hypergeometric_log_mgf(
        bets.n_control[active], bets.n_treatment[active], bets.top[active], log_psi
    )
    result[active] = bets.above_treatment[active] * log_psi + tie - whole
    return result


def predictable_log_odds(bets: WindowBets, *, harm: bool) -> FloatArray:
    """Per window, the log Mantel-Haenszel odds ratio of the *earlier* windows, clipped.

    ``harm`` bets on larger canary odds of being in the top (``[0, log MAX]``), otherwise on
    smaller ones (``[-log MAX, 0]``).
    """
    n = (bets.n_control + bets.n_treatment).astype(np.float64)
    safe_n = np.maximum(n, 1.0)
    x_b = bets.expected_treatment
    x_a = bets.top - x_b
    numerator = x_b * (bets.n_control - x_a) / safe_n
    denominator = x_a * (bets.n_treatment - x_b) / safe_n
    before_num = np.concatenate(([0.0], np.cumsum(numerator)[:-1]))
    before_den = np.concatenate(([0.0], np.cumsum(denominator)[:-1]))
    prior = PRIOR_ODDS_RATIO if harm else 1.0 / PRIOR_ODDS_RATIO
    log_odds = np.log((before_num + ODDS_PSEUDO_COUNT * prior) / (before_den + ODDS_PSEUDO_COUNT))
    cap = math.log(MAX_ODDS_RATIO)
    return np.clip(log_odds, 0.0, cap) if harm else np.clip(log_odds, -cap, 0.0)


def _oriented(dense: DenseWindows, lower_is_better: bool) -> tuple[IntArray, IntArray]:
    if lower_is_better:
        return dense.control, dense.treatment
    return dense.control[:, ::-1], dense.treatment[:, ::-1]


def _level(p: float, lower_is_better: bool) -> float:
    return p if lower_is_better else 1.0 - p


def log_wealth_path(
    dense: DenseWindows, *, p: float, shift: int, harm: bool, lower_is_better: bool = True
) -> FloatArray:
    """The log wealth after each window, with the canary lowered by ``shift`` buckets."""
    control, treatment = _oriented(dense, lower_is_better)
    bets = window_bets(control, treatment, shift=shift, level=_level(p, lower_is_better))
    return np.cumsum(fisher_log_e_values(bets, predictable_log_odds(bets, harm=harm)))


def margin_shift(dense: DenseWindows, margin: float, *, harm: bool, lower_is_better: bool) -> int:
    """Buckets to lower the canary by for the null "harm factor = 1 + m" (conservatively)."""
    factor = 1.0 + margin if lower_is_better else 1.0 / (1.0 - margin)
    steps = math.log(factor) / dense.log_ratio
    return math.ceil(steps - 1e-9) if harm else math.floor(steps + 1e-9)


def harm_log_e_path(
    dense: DenseWindows, *, p: float, margin: float = 0.0, lower_is_better: bool = True
) -> FloatArray:
    """The harm e-process's log wealth after each window (the guardrail; for simulations)."""
    shift = margin_shift(dense, margin, harm=True, lower_is_better=lower_is_better)
    return log_wealth_path(dense, p=p, shift=shift, harm=True, lower_is_better=lower_is_better)


@dataclass(frozen=True, slots=True)
class ExceedanceResult:
    """Both e-processes after the last window, the bounds and the contemporaneous effect.

    ``p_value`` = ``min(1, 1 / max wealth)`` of the harm e-process at the margin (always valid);
    ``safe_p_value`` the same for the reverse e-process. ``harm_lower_bound`` and
    ``harm_upper_bound`` bound the relative harm (``+0.2`` = 20% worse) at ``alpha`` each.
    """

    max_log_e_value: float
    p_value: float
    safe_max_log_e_value: float
    safe_p_value: float
    harm_lower_bound: float
    harm_upper_bound: float
    windows: int
    windows_bet: int
    n_control: int
    n_treatment: int
    top_treatment: float
    top_expected: float
    threshold_ms: float
    relative_effect: float
    method: str = METHOD

    def fired(self, alpha: float) -> bool:
        return self.max_log_e_value >= math.log(1.0 / alpha)

    def safe(self, alpha: float) -> bool:
        return self.safe_max_log_e_value >= math.log(1.0 / alpha)


def standardised_effect(dense: DenseWindows, p: float) -> float:
    """Canary p-quantile over control's reweighted to the canary's time profile, minus 1."""
    n_a = dense.control.sum(axis=1)
    n_b = dense.treatment.sum(axis=1)
    both = (n_a > 0) & (n_b > 0)
    if not both.any():
        return math.nan
    weights = np.where(both, n_b / np.maximum(n_a, 1), 0.0)
    control = (dense.control * weights[:, None]).sum(axis=0)
    treatment = dense.treatment[both].sum(axis=0).astype(np.float64)

    def quantile(counts: FloatArray) -> float:
        cumulative = np.cumsum(counts)
        position = int(np.searchsorted(cumulative, p * cumulative[-1] * (1 - 1e-12)))
        return float(dense.representatives[min(position, len(counts) - 1)])

    return quantile(treatment) / quantile(control) - 1.0


def _largest_firing_shift(fires: Callable[[int], bool], low: int, high: int) -> int | None:
    """Largest s in [low, high] with fires(s) (assumed to hold below some s), None if none."""
    if not fires(low):
        return None
    if fires(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if fires(middle):
            low = middle
        else:
            high = middle
    return low


def exceedance_test_dense(
    dense: DenseWindows,
    *,
    p: float,
    alpha: float,
    margin: float = 0.0,
    lower_is_better: bool = True,
) -> ExceedanceResult:
    """Run the harm and the safety e-processes over the windows (see the module docstring)."""
    check_probability("p", p)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not (math.isfinite(margin) and margin >= 0) or (not lower_is_better and margin >= 1):
        raise ValueError(f"margin must be >= 0 (and < 1 if higher is better), got {margin}")
    windows = int(dense.control.shape[0])
    if windows == 0 or dense.control.shape[1] == 0:
        return ExceedanceResult(
            0.0, 1.0, 0.0, 1.0, -math.inf, math.inf, windows, 0, 0, 0, 0.0, 0.0, math.nan, math.nan
        )
    level = _level(p, lower_is_better)
    control, treatment = _oriented(dense, lower_is_better)
    target = math.log(1.0 / alpha)

    def max_log_wealth(shift: int, harm: bool) -> float:
        bets = window_bets(control, treatment, shift=shift, level=level)
        path = np.cumsum(fisher_log_e_values(bets, predictable_log_odds(bets, harm=harm)))
        return max(0.0, float(path.max()))

    harm_shift = margin_shift(dense, margin, harm=True, lower_is_better=lower_is_better)
    safe_shift = margin_shift(dense, margin, harm=False, lower_is_better=lower_is_better)
    harm_max = max_log_wealth(harm_shift, True)
    safe_max = max_log_wealth(safe_shift, False)
    # Bounds on the harm factor f (canary = f x control), in bucket steps g^s: the harm test at
    # shift s rejects every f <= g^s; the safety test at shift s rejects every f >= g^s.
    lowest = _largest_firing_shift(
        lambda s: max_log_wealth(s, True) >= target, -MAX_SHIFT, MAX_SHIFT
    )
    highest = _largest_firing_shift(
        lambda s: max_log_wealth(-s, False) >= target, -MAX_SHIFT, MAX_SHIFT
    )

    def harm_of(factor_log: float) -> float:
        factor = math.exp(factor_log)
        return factor - 1.0 if lower_is_better else 1.0 - 1.0 / factor

    lower = -math.inf if lowest is None else harm_of(lowest * dense.log_ratio)
    upper = math.inf if highest is None else harm_of(-highest * dense.log_ratio)
    bets = window_bets(control, treatment, shift=harm_shift, level=level)
    used = bets.top > 0
    threshold_column = int(bets.threshold[used][-1]) if used.any() else -1
    threshold_ms = math.nan
    if threshold_column >= 0:
        if lower_is_better:
            threshold_ms = float(dense.upper_edges[threshold_column])
        else:
            threshold_ms = float(dense.lower_edges[::-1][threshold_column])
    expected = bets.top * bets.n_treatment / np.maximum(bets.n_control + bets.n_treatment, 1)
    return ExceedanceResult(
        max_log_e_value=harm_max,
        p_value=min(1.0, math.exp(-harm_max)),
        safe_max_log_e_value=safe_max,
        safe_p_value=min(1.0, math.exp(-safe_max)),
        harm_lower_bound=lower,
        harm_upper_bound=upper,
        windows=windows,
        windows_bet=int(used.sum()),
        n_control=int(dense.control.sum()),
        n_treatment=int(dense.treatment.sum()),
        top_treatment=float(bets.expected_treatment.sum()),
        top_expected=float(expected.sum()),
        threshold_ms=threshold_ms,
        relative_effect=standardised_effect(dense, p),
    )


def merge_windows(
    pairs: Sequence[tuple[LatencyHistogram | None, LatencyHistogram | None]], min_window: int
) -> list[list[tuple[LatencyHistogram | None, LatencyHistogram | None]]]:
    """Group consecutive (control, canary) buckets until each group pools ``min_window`` requests.

    The grouping looks only at request counts (never at latencies or at which arm is slower),
    and a trailing group that is still short is left out until it fills up.
    """
    groups: list[list[tuple[LatencyHistogram | None, LatencyHistogram | None]]] = []
    current: list[tuple[LatencyHistogram | None, LatencyHistogram | None]] = []
    size = 0
    for pair in pairs:
        current.append(pair)
        size += sum(int(h.count) for h in pair if h is not None)
        if size >= min_window:
            groups.append(current)
            current, size = [], 0
    return groups


def dense_windows(
    groups: Sequence[Sequence[tuple[LatencyHistogram | None, LatencyHistogram | None]]],
) -> DenseWindows:
    """Per-window (control, canary) bucket counts on one contiguous bucket axis."""
    indices: set[int] = set()
    source: LatencyHistogram | None = None
    for group in groups:
        for pair in group:
            for histogram in pair:
                if histogram is not None and histogram.count:
                    if source is None:
                        source = histogram
                    elif histogram.relative_accuracy != source.relative_accuracy:
                        raise ValueError("histograms must share their bucketing")
                    indices.update(index for index, _ in histogram)
    if source is None:
        empty_counts = np.zeros((len(groups), 0), dtype=np.int64)
        empty = np.zeros(0, dtype=np.float64)
        return DenseWindows(empty_counts, empty_counts.copy(), 0, 1.0, empty, empty, empty)
    first, last = min(indices), max(indices)
    axis = range(first, last + 1)
    control = np.zeros((len(groups), len(axis)), dtype=np.int64)
    treatment = np.zeros((len(groups), len(axis)), dtype=np.int64)
    for row, group in enumerate(groups):
        for pair in group:
            for target, histogram in zip((control, treatment), pair, strict=True):
                if histogram is not None:
                    for index, count in histogram:
                        target[row, index - first] += count
    gamma = (1.0 + source.relative_accuracy) / (1.0 - source.relative_accuracy)
    return DenseWindows(
        control=control,
        treatment=treatment,
        first_index=first,
        log_ratio=math.log(gamma),
        lower_edges=np.array([source.lower_edge(i) for i in axis], dtype=np.float64),
        upper_edges=np.array([source.upper_edge(i) for i in axis], dtype=np.float64),
        representatives=np.array([source.representative(i) for i in axis], dtype=np.float64),
    )


def exceedance_test(
    control: WindowedLatencyHistogram,
    treatment: WindowedLatencyHistogram,
    *,
    p: float,
    alpha: float,
    margin: float = 0.0,
    lower_is_better: bool = True,
    min_window: int | None = None,
) -> ExceedanceResult:
    """The exceedance e-processes of two windowed histograms (windows paired by key)."""
    keys = sorted(set(control.windows) | set(treatment.windows))  # type: ignore[type-var]
    pairs = [(control.windows.get(key), treatment.windows.get(key)) for key in keys]
    groups = merge_windows(pairs, min_window if min_window is not None else default_min_window(p))
    return exceedance_test_dense(
        dense_windows(groups), p=p, alpha=alpha, margin=margin, lower_is_better=lower_is_better
    )
