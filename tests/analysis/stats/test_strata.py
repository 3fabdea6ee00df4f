"""Cohorts combined with Mantel-Haenszel weights: formulas, one-arm cohorts, Simpson's paradox."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.moments import MeanStats, ProportionStats, RatioStats
from analysis.stats.strata import POOLED, STRATIFIED, standardize


def _rate(n: int, hits: int) -> ProportionStats:
    return ProportionStats(n=n, sum=float(hits))


def test_one_cohort_is_the_pooled_analysis_unchanged() -> None:
    strata = {"a": {0: _rate(500, 40)}, "b": {0: _rate(480, 52)}}
    result = standardize(strata, arms=["a", "b"], construction=POOLED)
    assert result.stats == {"a": _rate(500, 40), "b": _rate(480, 52)}
    assert not result.standardized and result.cohorts_used == 1
    assert result.weights == {0: 1.0} and result.left_out == {"a": 0, "b": 0}


def test_cohorts_with_a_single_arm_contribute_nothing() -> None:
    strata = {
        "a": {0: _rate(900, 90), 1: _rate(300, 30), 2: _rate(50, 40)},  # 2: a pause, control only
        "b": {1: _rate(300, 33), 3: _rate(1, 1)},  # 3: one canary unit
    }
    result = standardize(strata, arms=["a", "b"], construction=STRATIFIED)
    assert result.cohorts_used == 1 and result.cohorts_seen == 4
    assert result.weights == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}
    assert result.left_out == {"a": 950, "b": 1}
    assert result.stats == {"a": _rate(300, 30), "b": _rate(300, 33)}
    nobody = standardize(
        {"a": {0: _rate(10, 1)}, "b": {1: _rate(10, 1)}}, arms=["a", "b"], construction=STRATIFIED
    )
    assert nobody.stats == {} and nobody.cohorts_used == 0


def test_standardised_means_match_the_mantel_haenszel_formulas() -> None:
    rng = np.random.default_rng(8)
    sizes = {"a": [990, 950, 500], "b": [10, 50, 500]}
    shifts = [0.0, 3.0, 7.0]  # the level drifts from cohort to cohort
    values = {
        arm: [
            rng.normal(20 + shift, 4 + s, n)
            for s, (n, shift) in enumerate(zip(ns, shifts, strict=True))
        ]
        for arm, ns in sizes.items()
    }
    strata = {
        arm: {s: MeanStats.from_values(v) for s, v in enumerate(parts)}
        for arm, parts in values.items()
    }
    result = standardize(strata, arms=["a", "b"], construction=STRATIFIED)
    # Independent recomputation: w_s = n_a n_b / (n_a + n_b) (Mantel & Haenszel 1959; Greenland
    # & Robins 1985), normalised; mean and variance of the standardised mean of each arm.
    w = np.array([na * nb / (na + nb) for na, nb in zip(sizes["a"], sizes["b"], strict=True)])
    w = w / w.sum()
    for arm, parts in values.items():
        mean = sum(wi * p.mean() for wi, p in zip(w, parts, strict=True))
        variance = sum(wi**2 * p.var(ddof=1) / len(p) for wi, p in zip(w, parts, strict=True))
        stats = result.stats[arm]
        assert isinstance(stats, MeanStats)
        assert stats.n == sum(sizes[arm])
        assert stats.mean == pytest.approx(mean, rel=1e-12)
        assert stats.variance / stats.n == pytest.approx(variance, rel=1e-9)
    assert result.standardized and result.weights[0] == pytest.approx(w[0])
    # The difference is the Mantel-Haenszel weighted mean of the within-cohort differences.
    within = [pb.mean() - pa.mean() for pa, pb in zip(values["a"], values["b"], strict=True)]
    assert result.stats["b"].mean - result.stats["a"].mean == pytest.approx(
        float(np.dot(w, within)), rel=1e-9
    )


def test_rates_standardise_to_the_mantel_haenszel_risk_difference() -> None:
    cohorts = [(990, 198, 10, 2), (950, 285, 50, 15), (500, 200, 500, 200)]
    strata = {
        "a": {s: _rate(n0, x0) for s, (n0, x0, _, _) in enumerate(cohorts)},
        "b": {s: _rate(n1, x1) for s, (_, _, n1, x1) in enumerate(cohorts)},
    }
    result = standardize(strata, arms=["a", "b"], construction=STRATIFIED)
    # RD_MH = sum((x1 n0 - x0 n1) / N) / sum(n1 n0 / N) (Greenland & Robins 1985).
    numerator = sum((x1 * n0 - x0 * n1) / (n0 + n1) for n0, x0, n1, x1 in cohorts)
    denominator = sum(n1 * n0 / (n0 + n1) for n0, _, n1, _ in cohorts)
    assert result.stats["b"].mean - result.stats["a"].mean == pytest.approx(
        numerator / denominator, abs=1e-12
    )


def test_ratio_metrics_standardise_numerator_and_denominator() -> None:
    rng = np.random.default_rng(3)
    parts = {
        arm: {
            s: (rng.poisson(2 + s, n).astype(float), rng.poisson(5 + 2 * s, n).astype(float) + 1)
            for s, n in enumerate(ns)
        }
        for arm, ns in {"a": [400, 300], "b": [40, 300]}.items()
    }
    strata = {
        arm: {s: RatioStats.from_values(m, d) for s, (m, d) in cohorts.items()}
        for arm, cohorts in parts.items()
    }
    result = standardize(strata, arms=["a", "b"], construction=STRATIFIED)
    w = np.array([400 * 40 / 440, 300 * 300 / 600])
    w = w / w.sum()
    for arm, cohorts in parts.items():
        num = sum(w[s] * m.mean() for s, (m, _) in cohorts.items())
        den = sum(w[s] * d.mean() for s, (_, d) in cohorts.items())
        cov = sum(
            w[s] ** 2 * np.cov(np.vstack([m, d]), ddof=1) / len(m) for s, (m, d) in cohorts.items()
        )
        stats = result.stats[arm]
        assert isinstance(stats, RatioStats)
        assert stats.mean == pytest.approx(num / den, rel=1e-12)
        # Delta method on the standardised means (STATS.md 6).
        r = num / den
        delta = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / den**2
        assert stats.variance / stats.n == pytest.approx(delta, rel=1e-9)


def test_simpsons_paradox_in_an_a_a_ramp_is_removed() -> None:
    # A/A: the conversion rate rises from 20% to 40% between steps, the same in both arms.
    # Control's units come mostly from the early step, the canary's from the late one.
    strata = {
        "v1": {0: _rate(9_900, 1_980), 1: _rate(5_000, 2_000)},
        "v2": {0: _rate(100, 20), 1: _rate(5_000, 2_000)},
    }
    spec = GuardrailSpec(metric_key="conversion", kind="proportion", direction="lower_is_better")
    pooled = {arm: by[0] + by[1] for arm, by in strata.items()}
    fired = evaluate_guardrails(
        [spec], ExperimentSnapshot(control="v1", treatments=("v2",), metrics={"conversion": pooled})
    )
    assert fired.evaluations[0].status is GuardrailStatus.HARM  # a false rollback
    result = standardize(strata, arms=["v1", "v2"], construction=STRATIFIED)
    assert result.stats["v2"].mean == pytest.approx(result.stats["v1"].mean, abs=1e-12)
    mean_spec = GuardrailSpec(metric_key="conversion", kind="mean", direction="lower_is_better")
    kept = evaluate_guardrails(
        [mean_spec],
        ExperimentSnapshot(control="v1", treatments=("v2",), metrics={"conversion": result.stats}),
    )
    assert kept.evaluations[0].status is not GuardrailStatus.HARM
    assert math.isclose(kept.evaluations[0].relative_effect, 0.0, abs_tol=1e-12)
