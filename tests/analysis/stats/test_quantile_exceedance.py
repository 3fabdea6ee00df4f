"""The threshold-exceedance e-process for quantile guardrails (analysis.stats.quantile_exceedance).

Golden values come from scipy's hypergeometric and Fisher noncentral hypergeometric laws; the
false-rollback checks are seeded simulations (the same simulator as bench/quantile_power.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
import pytest
from scipy import stats

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailDecision,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.quantile_exceedance import (
    METHOD,
    WindowBets,
    exceedance_test,
    fisher_log_e_values,
    harm_log_e_path,
    hypergeometric_log_mgf,
    window_bets,
)
from bench.quantile_power import Ramp, first_crossing, ramp_false_rollbacks, to_windows
from routing.observe.histogram import LogHistogram

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


def _bets(n_a: int, n_b: int, top: int, above: int, tie=(1, 0, 0)) -> WindowBets:
    def one(value: int) -> np.ndarray:
        return np.array([value], dtype=np.int64)

    total, canary, draws = tie
    return WindowBets(
        n_control=one(n_a),
        n_treatment=one(n_b),
        top=one(top),
        above_treatment=one(above),
        tie_total=one(total),
        tie_treatment=one(canary),
        tie_draws=one(draws),
        threshold=one(0),
    )


def test_window_e_value_is_fishers_likelihood_ratio() -> None:
    log_e = fisher_log_e_values(_bets(40, 12, 7, 4), np.array([math.log(2.5)]))
    # scipy: Fisher's noncentral hypergeometric pmf at odds 2.5 over the central one.
    ratio = stats.nchypergeom_fisher.pmf(4, 52, 12, 7, 2.5) / stats.hypergeom.pmf(4, 52, 12, 7)
    assert math.exp(log_e[0]) == pytest.approx(ratio, rel=1e-10)


def test_ties_are_averaged_over_random_tie_breaking() -> None:
    # 2 canary requests above the threshold bucket; the bucket holds 6 requests (2 canary), of
    # which 3 join the top: the e-value is the mean of psi^(2 + Y) / E_1[psi^X] over Y.
    psi = 3.0
    log_e = fisher_log_e_values(_bets(30, 10, 8, 2, tie=(6, 2, 3)), np.array([math.log(psi)]))
    support = np.arange(0, 3)
    tie_mean = np.sum(stats.hypergeom.pmf(support, 6, 2, 3) * psi**support)
    whole = np.sum(stats.hypergeom.pmf(np.arange(0, 9), 40, 10, 8) * psi ** np.arange(0, 9))
    assert math.exp(log_e[0]) == pytest.approx(psi**2 * tie_mean / whole, rel=1e-10)


@pytest.mark.parametrize("true_odds", [1.0, 0.7, 0.2])
def test_window_e_value_has_mean_at_most_one_under_the_null(true_odds: float) -> None:
    n_a, n_b, k = 25, 9, 8
    e_values = np.array(
        [
            math.exp(fisher_log_e_values(_bets(n_a, n_b, k, x), np.array([math.log(3.0)]))[0])
            for x in range(k + 1)
        ]
    )
    pmf = stats.nchypergeom_fisher.pmf(np.arange(k + 1), n_a + n_b, n_b, k, true_odds)
    mean = float(np.sum(pmf * e_values))
    assert mean == pytest.approx(1.0) if true_odds == 1.0 else mean < 1.0


def test_constant_slow_canary_against_variable_control_fires() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 450) for _ in range(6)])
    canary = windowed([np.full(50, 1_000.0) for _ in range(6)])
    result = exceedance_test(control, canary, p=0.95, alpha=0.01, margin=0.1)
    assert result.fired(0.01)
    assert result.p_value < 1e-6
    assert result.relative_effect > 3.0
    assert result.windows_bet == 6  # the threshold is label-blind: even the first window bets


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_constant_equal_latencies_continue(margin: float) -> None:
    control = windowed([np.full(450, 100.0) for _ in range(20)])
    canary = windowed([np.full(50, 100.0) for _ in range(20)])
    result = exceedance_test(control, canary, p=0.95, alpha=0.05, margin=margin)
    assert result.p_value == 1.0
    assert not result.fired(0.05)


def test_canary_faster_by_a_constant_within_margin_is_shown_safe() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 900) for _ in range(20)])
    canary = windowed([rng.lognormal(math.log(90), 0.5, 100) for _ in range(20)])
    result = exceedance_test(control, canary, p=0.95, alpha=0.05, margin=0.1)
    assert not result.fired(0.05)
    assert result.safe(0.05)


def test_higher_is_better_quantile_detects_a_drop() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 450) for _ in range(30)])
    canary = windowed([rng.lognormal(math.log(70), 0.5, 50) for _ in range(30)])
    lower = exceedance_test(control, canary, p=0.05, alpha=0.05, lower_is_better=False)
    assert lower.fired(0.05)
    assert not exceedance_test(control, canary, p=0.95, alpha=0.05).fired(0.05)


def test_p95_regression_is_caught_and_p_value_is_monotone_in_time() -> None:
    rng = np.random.default_rng(SEED)
    control_parts = [rng.lognormal(math.log(100), 0.5, 450) for _ in range(40)]
    canary_parts = [rng.lognormal(math.log(120), 0.5, 50) for _ in range(40)]
    p_values = [
        exceedance_test(
            windowed(control_parts[:w]), windowed(canary_parts[:w]), p=0.95, alpha=0.05
        ).p_value
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


def test_bounds_cover_a_uniform_slowdown_and_agree_with_the_decision() -> None:
    rng = np.random.default_rng(SEED + 1)
    control = windowed([rng.lognormal(math.log(100), 0.5, 900) for _ in range(30)])
    canary = windowed([rng.lognormal(math.log(130), 0.5, 100) for _ in range(30)])
    result = exceedance_test(control, canary, p=0.95, alpha=0.025, margin=0.1)
    assert result.fired(0.025)
    assert 0.1 <= result.harm_lower_bound < 0.3 < result.harm_upper_bound
    assert result.relative_effect == pytest.approx(0.3, abs=0.1)


@pytest.mark.parametrize(("canary_factor", "margin"), [(1.0, 0.0), (1.08, 0.1)])
def test_aa_with_heavy_ties_and_small_windows_keeps_alpha(
    canary_factor: float, margin: float
) -> None:
    # Three latency levels only (ties everywhere), 40 requests per window, 10% canary; under
    # H0 (canary at most 1 + margin times control) the harm e-process rarely reaches 1/alpha.
    rng = np.random.default_rng(SEED + 2)
    runs, windows, per_window, fired = 300, 40, 40, 0
    window = np.repeat(np.arange(windows), per_window)
    for _ in range(runs):
        canary = rng.random(windows * per_window) < 0.1
        values = rng.choice([100.0, 200.0, 300.0], size=windows * per_window, p=[0.7, 0.25, 0.05])
        values = np.where(canary, values * canary_factor, values)
        path = harm_log_e_path(
            to_windows(window, canary, values, windows).dense, p=0.9, margin=margin
        )
        fired += first_crossing(path, 0.05) is not None
    assert fired <= 24  # alpha = 5% of 300 is 15; 24 is beyond 2.4 binomial SDs


def _decide(control: Windowed, canary: Windowed, margin: float) -> GuardrailDecision:
    spec = GuardrailSpec(
        metric_key="latency-p95",
        kind="quantile",
        direction="lower_is_better",
        margin=margin,
        quantile=0.95,
    )
    snapshot = ExperimentSnapshot(
        control="v1", treatments=("v2",), metrics={"latency-p95": {"v1": control, "v2": canary}}
    )
    return evaluate_guardrails([spec], snapshot)


def test_guardrail_rolls_back_a_constant_slow_canary_with_p_value_and_method() -> None:
    rng = np.random.default_rng(SEED)
    control = windowed([rng.lognormal(math.log(100), 0.5, 450) for _ in range(3)])
    canary = windowed([np.full(50, 1_000.0) for _ in range(3)])
    decision = _decide(control, canary, margin=0.1)
    assert decision.action is GuardrailAction.ROLLBACK
    (evidence,) = decision.evaluations
    assert evidence.status is GuardrailStatus.HARM
    assert evidence.p_value < 1e-6 and evidence.method == METHOD
    assert evidence.harm_lower_bound > 1.0  # at least twice as slow, always-valid
    assert "always-valid p" in decision.reason and METHOD in decision.reason


def test_guardrail_continues_on_constant_equal_latencies_within_margin() -> None:
    control = windowed([np.full(450, 100.0) for _ in range(10)])
    canary = windowed([np.full(50, 100.0) for _ in range(10)])
    decision = _decide(control, canary, margin=0.1)
    assert decision.action is GuardrailAction.CONTINUE
    (evidence,) = decision.evaluations
    assert evidence.status is not GuardrailStatus.HARM and evidence.p_value == 1.0


def test_guardrail_waits_for_a_window_with_both_arms() -> None:
    control = Windowed({0: LogHistogram()})
    control.add_many([100.0] * 300)
    canary = Windowed({})
    canary.add_many([100.0] * 30)
    decision = _decide(control, canary, margin=0.1)
    assert decision.action is GuardrailAction.HOLD
    assert decision.evaluations[0].status is GuardrailStatus.BURN_IN


@pytest.mark.parametrize(("shift", "level"), [(0, 0.75), (0, 0.5), (1, 0.75)])
def test_window_e_value_averages_to_one_over_all_label_assignments(
    shift: int, level: float
) -> None:
    # Exact check of the whole per-window bet, ties included: under exchangeability every
    # choice of which 3 of these 8 requests are the canary's is equally likely, so the mean
    # e-value over all 56 choices is exactly 1 without a margin and at most 1 with one.
    buckets = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    rows = []
    for canary in itertools.combinations(range(len(buckets)), 3):
        is_canary = np.isin(np.arange(len(buckets)), canary)
        rows.append(
            (
                np.bincount(buckets[~is_canary], minlength=4),
                np.bincount(buckets[is_canary], minlength=4),
            )
        )
    control = np.array([r[0] for r in rows], dtype=np.int64)
    treatment = np.array([r[1] for r in rows], dtype=np.int64)
    bets = window_bets(control, treatment, shift=shift, level=level)
    e_values = np.exp(fisher_log_e_values(bets, np.full(len(rows), math.log(4.0))))
    if shift == 0:
        assert e_values.mean() == pytest.approx(1.0, rel=1e-12)
        assert e_values.max() > 1.5  # the bet is not trivial
    else:
        assert e_values.mean() < 1.0
