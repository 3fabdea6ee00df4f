"""The mean-latency guardrail on users, within strata (analysis.stats.latency_mean)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.latency_mean import (
    UserLatencyMeans,
    comparison,
    method_text,
    user_latency_means,
)
from analysis.stats.moments import RatioStats
from analysis.stats.strata import POOLED, STRATIFIED

SPEC = GuardrailSpec(metric_key="latency-mean", kind="mean", direction="lower_is_better")


def _users(rng: np.random.Generator, n: int, *, level: float, sigma: float = 0.5):
    """Per user: request count (Pareto(1.2), capped), latencies with a user factor."""
    counts = np.minimum(np.floor(rng.pareto(1.2, n) + 1), 60).astype(int)
    factor = np.exp(sigma * rng.standard_normal(n))
    user = np.repeat(np.arange(n), counts)
    latency = level * factor[user] * np.exp(0.3 * rng.standard_normal(user.size))
    return user, latency


def _ratio(user: np.ndarray, latency: np.ndarray) -> RatioStats:
    m = np.bincount(user, weights=latency)
    d = np.bincount(user).astype(float)
    return RatioStats.from_values(m, d)


def test_the_delta_method_variance_is_statsmodels_cluster_robust_variance_by_user():
    rng = np.random.default_rng(12)
    user, latency = _users(rng, 400, level=100.0)
    stats = _ratio(user, latency)
    # Reference: OLS of every request's latency on a constant with standard errors clustered
    # by user (statsmodels, small-sample correction G/(G-1) (N-1)/(N-K), K = 1), and WLS of the
    # users' mean latencies weighted by their request counts with HC1.
    ols = sm.OLS(latency, np.ones(latency.size)).fit(cov_type="cluster", cov_kwds={"groups": user})
    assert stats.mean == pytest.approx(ols.params[0], rel=1e-12)
    assert stats.variance / stats.n == pytest.approx(ols.bse[0] ** 2, rel=1e-9)
    counts = np.bincount(user)
    means = np.bincount(user, weights=latency) / counts
    wls = sm.WLS(means, np.ones(means.size), weights=counts).fit(cov_type="HC1")
    assert stats.variance / stats.n == pytest.approx(wls.bse[0] ** 2, rel=1e-9)
    # Per request, the same data look several times more precise than they are.
    assert np.var(latency, ddof=1) / latency.size < 0.5 * stats.variance / stats.n


def test_strata_compare_the_arms_within_each_step():
    rng = np.random.default_rng(5)
    # Step 0 (10% canary) at 100 ms, step 1 (50%) at 200 ms: an A/A ramp slowing down.
    strata: dict[str, dict[int, RatioStats]] = {"A": {}, "B": {}}
    for step, (n_a, n_b, level) in enumerate(((900, 100, 100.0), (500, 500, 200.0))):
        for arm, n in (("A", n_a), ("B", n_b)):
            strata[arm][step] = _ratio(*_users(rng, n, level=level))
    combined = user_latency_means(strata, arms=("A", "B"))
    assert combined.construction == STRATIFIED and combined.cohorts_used == 2
    means = comparison(combined, control="A", arm="B")
    assert means.control is not None and means.treatment is not None
    assert means.control.n == 1400 and means.treatment.n == 600
    assert abs(means.treatment.mean / means.control.mean - 1) < 0.1
    pooled_a = strata["A"][0] + strata["A"][1]
    pooled_b = strata["B"][0] + strata["B"][1]
    assert pooled_b.mean / pooled_a.mean - 1 > 0.25  # what pooling over the ramp shows
    # The weights are Mantel-Haenszel's n_A n_B / (n_A + n_B), normalised.
    raw = [
        strata["A"][s].n * strata["B"][s].n / (strata["A"][s].n + strata["B"][s].n) for s in (0, 1)
    ]
    assert combined.weights[0] == pytest.approx(raw[0] / sum(raw))
    # Each arm's standardised ratio is sum_s w_s Mbar_s / sum_s w_s Dbar_s.
    for arm in ("A", "B"):
        numerator = sum(combined.weights[s] * strata[arm][s].numerator_mean for s in (0, 1))
        denominator = sum(combined.weights[s] * strata[arm][s].denominator_mean for s in (0, 1))
        assert combined.stats[arm].mean == pytest.approx(numerator / denominator, rel=1e-9)


def test_a_single_stratum_is_the_arms_own_sums():
    rng = np.random.default_rng(6)
    strata = {arm: {0: _ratio(*_users(rng, 300, level=100.0))} for arm in ("A", "B")}
    combined = user_latency_means(strata, arms=("A", "B"))
    assert combined.construction == POOLED
    assert combined.stats["A"] is strata["A"][0]


def _evaluate(means: UserLatencyMeans, spec: GuardrailSpec = SPEC, **settings):
    snapshot = ExperimentSnapshot(
        control="A", treatments=("B",), metrics={spec.metric_key: {"B": means}}
    )
    decision = evaluate_guardrails([spec], snapshot, settings=GuardrailSettings(**settings))
    return decision.evaluations[0]


def test_a_constant_1000_ms_canary_against_a_variable_100_ms_control_is_harm():
    rng = np.random.default_rng(7)
    control = _ratio(*_users(rng, 300, level=100.0))
    canary = RatioStats.from_values(np.full(120, 1000.0) * 3, np.full(120, 3.0))
    evidence = _evaluate(UserLatencyMeans(control, canary, POOLED, 1, 1))
    assert evidence.status is GuardrailStatus.HARM
    assert evidence.kind == "mean"
    assert evidence.method == method_text(POOLED)
    assert evidence.relative_effect > 5
    assert evidence.p_value < 1e-6


@pytest.mark.parametrize(("canary_ms", "status"), [(105.0, "safe"), (130.0, "harm")])
def test_two_constant_arms_compare_the_exact_difference_with_the_margin(canary_ms, status):
    control = RatioStats.from_values(np.full(200, 200.0), np.full(200, 2.0))
    canary = RatioStats.from_values(np.full(200, 2 * canary_ms), np.full(200, 2.0))
    spec = GuardrailSpec("latency-mean", "mean", "lower_is_better", margin=0.1)
    evidence = _evaluate(UserLatencyMeans(control, canary, STRATIFIED, 2, 2), spec)
    assert evidence.status == status
    assert evidence.note == "both arms constant: the difference is exact"
    assert "stratified by ramp step" in evidence.method


def test_no_stratum_with_both_arms_is_burn_in_and_holds():
    evidence = _evaluate(UserLatencyMeans(None, None, STRATIFIED, 0, 3))
    assert evidence.status is GuardrailStatus.BURN_IN
    assert "latency window has closed" in evidence.note


def test_a_canary_twenty_percent_slower_is_detected_with_users_as_the_unit():
    rng = np.random.default_rng(8)
    control = _ratio(*_users(rng, 1500, level=100.0))
    canary = _ratio(*_users(rng, 1500, level=120.0))
    evidence = _evaluate(UserLatencyMeans(control, canary, POOLED, 1, 1))
    assert evidence.status is GuardrailStatus.HARM
    assert evidence.harm_lower_bound > 0


def test_each_treatment_arm_gets_its_share_of_alpha():
    rng = np.random.default_rng(9)
    stats = {arm: _ratio(*_users(rng, 300, level=100.0)) for arm in ("A", "B", "C")}
    combined = user_latency_means({arm: {0: s} for arm, s in stats.items()}, arms=("A", "B", "C"))
    snapshot = ExperimentSnapshot(
        control="A",
        treatments=("B", "C"),
        metrics={"latency-mean": {arm: comparison(combined, control="A", arm=arm) for arm in "BC"}},
    )
    decision = evaluate_guardrails([SPEC], snapshot, settings=GuardrailSettings(alpha=0.05))
    assert [e.arm for e in decision.evaluations] == ["B", "C"]
    assert all(math.isclose(e.alpha, 0.025) for e in decision.evaluations)
    assert all(e.status is not GuardrailStatus.HARM for e in decision.evaluations)
