"""The threshold-exceedance e-process for quantile guardrails (analysis.stats.quantile_exceedance).

Golden values come from scipy's hypergeometric and Fisher noncentral hypergeometric laws; the
false-rollback checks are seeded simulations (the same simulator as bench/quantile_power.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
from scipy import stats

from analysis.stats.quantile_exceedance import (
    WindowCounts,
    exceedance_test,
    fisher_log_e_values,
    hypergeometric_log_mgf,
)
from bench.quantile_power import Ramp, first_crossing, ramp_false_rollbacks
from routing.histogram import LogHistogram

SEED = 20261204


class Windowed(LogHistogram):
    """A cumulative LogHistogram that also keeps its per-window parts (as the aggregation does)."""

    __slots__ = ("_windows",)

    def __init__(self, windows: Mapping[int, LogHistogram]) -> None:
        super().__init__()
        self._windows = dict(windows)
        for part in self._windows.values():
            self.merge(part)

    @property
    def windows(self) -> Mapping[object, LogHistogram]:
        return self._windows


def windowed(parts: list[np.ndarray]) -> Windowed:
    histograms = {}
    for key, values in enumerate(parts):
        histogram = LogHistogram()
        histogram.add_many(values.tolist())
        histograms[key] = histogram
    return Windowed(histograms)


def test_log_mgf_matches_scipy_hypergeometric() -> None:
    n_a = np.array([30, 5, 100, 1])
    n_b = np.array([10, 20, 3, 1])
    k = np.array([7, 12, 50, 1])
    log_psi = np.log(np.array([2.0, 0.5, 3.0, 7.0]))
    got = hypergeometric_log_mgf(n_a, n_b, k, log_psi)
    for i in range(4):
        support = np.arange(0, k[i] + 1)
        pmf = stats.hypergeom.pmf(support, n_a[i] + n_b[i], n_b[i], k[i])
        assert got[i] == pytest.approx(math.log(np.sum(pmf * np.exp(log_psi[i] * support))))


def test_window_e_value_is_fishers_likelihood_ratio() -> None:
    counts = WindowCounts(
        n_control=np.array([40]),
        x_control=np.array([3]),
        n_treatment=np.array([12]),
        x_treatment=np.array([4]),
    )
    log_e = fisher_log_e_values(counts, np.array([math.log(2.5)]))
    # scipy: Fisher's noncentral hypergeometric pmf at odds 2.5 over the central one.
    ratio = stats.nchypergeom_fisher.pmf(4, 52, 12, 7, 2.5) / stats.hypergeom.pmf(4, 52, 12, 7)
    assert math.exp(log_e[0]) == pytest.approx(ratio, rel=1e-10)


@pytest.mark.parametrize("true_odds", [1.0, 0.7, 0.2])
def test_window_e_value_has_mean_at_most_one_under_the_null(true_odds: float) -> None:
    n_a, n_b, k = 25, 9, 8
    support = np.arange(0, k + 1)
    counts = WindowCounts(
        n_control=np.full(len(support), n_a),
        x_control=k - support,
        n_treatment=np.full(len(support), n_b),
        x_treatment=support,
    )
    e_values = np.exp(fisher_log_e_values(counts, np.full(len(support), math.log(3.0))))
    pmf = stats.nchypergeom_fisher.pmf(support, n_a + n_b, n_b, k, true_odds)
    mean = float(np.sum(pmf * e_values))
    assert mean == pytest.approx(1.0) if true_odds == 1.0 else mean < 1.0


def test_constant_slow_canary_against_variable_control_fires() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 450) for _ in range(6)])
    canary = windowed([np.full(50, 1_000.0) for _ in range(6)])
    result = exceedance_test(control, canary, p=0.95, margin=0.1)
    assert result.fired(0.01)
    assert result.p_value < 1e-6
    assert result.relative_effect > 3.0
    assert result.windows_bet == 5  # the first window has no earlier control data to set c


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_constant_equal_latencies_continue(margin: float) -> None:
    control = windowed([np.full(450, 100.0) for _ in range(20)])
    canary = windowed([np.full(50, 100.0) for _ in range(20)])
    result = exceedance_test(control, canary, p=0.95, margin=margin)
    assert result.p_value == 1.0
    assert not result.fired(0.05)
    assert result.exceed_control == result.exceed_treatment == 0


def test_canary_faster_by_a_constant_within_margin_is_shown_safe() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 900) for _ in range(20)])
    canary = windowed([rng.lognormal(math.log(90), 0.5, 100) for _ in range(20)])
    result = exceedance_test(control, canary, p=0.95, margin=0.1)
    assert not result.fired(0.05)
    assert result.safe(0.05)


def test_higher_is_better_quantile_detects_a_drop() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 450) for _ in range(30)])
    canary = windowed([rng.lognormal(math.log(70), 0.5, 50) for _ in range(30)])
    lower = exceedance_test(control, canary, p=0.05, lower_is_better=False)
    assert lower.fired(0.05)
    assert not exceedance_test(control, canary, p=0.95, lower_is_better=True).fired(0.05)


def test_p95_regression_is_caught_and_p_value_is_monotone_in_time() -> None:
    rng = np.random.default_rng(SEED)
    control_parts = [rng.lognormal(math.log(100), 0.5, 450) for _ in range(40)]
    canary_parts = [rng.lognormal(math.log(120), 0.5, 50) for _ in range(40)]
    p_values = [
        exceedance_test(windowed(control_parts[:w]), windowed(canary_parts[:w]), p=0.95).p_value
        for w in (10, 20, 40)
    ]
    assert p_values == sorted(p_values, reverse=True)
    assert p_values[-1] < 0.05


def test_aa_ramp_with_doubling_latency_keeps_alpha_where_pooling_does_not() -> None:
    # 120 seeded A/A ramps 1 -> 5 -> 10 -> 25 -> 50% with latency doubling over the run.
    rates = ramp_false_rollbacks(
        Ramp(requests_per_window=500), runs=120, alpha=0.05, seed=SEED, pooled=True
    )
    assert rates.exceedance <= 12  # alpha = 5% of 120 is 6; 12 is beyond 2.7 binomial SDs
    assert rates.pooled is not None and rates.pooled >= 60  # pooling is biased by the drift


def test_first_crossing_finds_the_first_window_past_one_over_alpha() -> None:
    assert first_crossing(np.array([0.5, 3.1, 2.0, 4.0]), 0.05) == 1
    assert first_crossing(np.array([0.5, 1.0]), 0.05) is None
