"""The guardrail decision: harm tests, alpha split, holds, promotion and quantile dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as scipy_stats

from analysis.stats.effects import estimate_effect
from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.harm import (
    harm_p_value,
    harm_threshold,
    mean_harm_z,
    proportion_harm_z,
    restricted_rates,
)
from analysis.stats.moments import MeanStats, ProportionStats, RatioStats
from analysis.stats.sequential import asymptotic_one_sided_bound
from routing.observe.histogram import LogHistogram


def _mean_stats(n: int, mean: float, sd: float) -> MeanStats:
    total = n * mean
    return MeanStats(n=n, sum=total, sum_squares=(n - 1) * sd * sd + total * total / n)


LATENCY = GuardrailSpec("latency_ms", "mean", "lower_is_better")
ERRORS = GuardrailSpec("error_rate", "proportion", "lower_is_better")
SETTINGS = GuardrailSettings(alpha=0.05, n_star=5000)


def _snapshot(**metrics: dict[str, object]) -> ExperimentSnapshot:
    return ExperimentSnapshot(control="control", treatments=("canary",), metrics=metrics)


def test_latency_reference_case_rolls_back() -> None:
    # STATS.md 9.1 GBH-GUARDRAIL-LATENCY-MEAN-ABS: 120 -> 122 ms at 20k per arm rolls back with
    # p = 2.3084e-5. With margin 0 the contrast statistic is the absolute-difference z.
    snapshot = _snapshot(
        latency_ms={"control": _mean_stats(20_000, 120, 40), "canary": _mean_stats(20_000, 122, 41)}
    )
    decision = evaluate_guardrails([LATENCY], snapshot, settings=SETTINGS)
    assert decision.action is GuardrailAction.ROLLBACK
    tripped = decision.tripped
    assert tripped is not None and tripped.metric_key == "latency_ms" and tripped.arm == "canary"
    assert tripped.p_value == pytest.approx(2.3084e-5, rel=5e-3)
    assert tripped.harm_lower_bound > 0 and tripped.alpha == 0.05
    assert (tripped.n_control, tripped.n_treatment) == (20_000, 20_000)
    assert tripped.relative_effect == pytest.approx(2 / 120)
    assert not decision.safe_to_promote


def test_error_rate_reference_case_does_not_roll_back_yet() -> None:
    # GBH-GUARDRAIL-ERROR-RATE: 1.0% -> 1.3% at 20k per arm is not yet a sequential alarm.
    snapshot = _snapshot(
        error_rate={"control": ProportionStats(20_000, 200), "canary": ProportionStats(20_000, 260)}
    )
    decision = evaluate_guardrails([ERRORS], snapshot, settings=SETTINGS)
    assert decision.action is GuardrailAction.CONTINUE
    assert decision.evaluations[0].status is GuardrailStatus.INCONCLUSIVE


def test_margin_is_relative_and_direction_matters() -> None:
    control, canary = _mean_stats(50_000, 100, 20), _mean_stats(50_000, 105, 20)
    snapshot = _snapshot(latency_ms={"control": control, "canary": canary})
    # 5% slower: harm with a 2% margin, not with a 10% margin.
    tight = GuardrailSpec("latency_ms", "mean", "lower_is_better", margin=0.02)
    loose = GuardrailSpec("latency_ms", "mean", "lower_is_better", margin=0.10)
    assert evaluate_guardrails([tight], snapshot, settings=SETTINGS).action == "rollback"
    decision = evaluate_guardrails([loose], snapshot, settings=SETTINGS)
    assert decision.action == "continue" and decision.safe_to_promote
    # Higher is better (e.g. revenue): a 5% rise is never harm.
    revenue = GuardrailSpec("latency_ms", "mean", "higher_is_better", margin=0.0)
    evidence = evaluate_guardrails([revenue], snapshot, settings=SETTINGS).evaluations[0]
    assert evidence.status is GuardrailStatus.SAFE and evidence.harm_estimate == pytest.approx(
        -0.05
    )


def test_conversion_drop_rolls_back_for_higher_is_better() -> None:
    spec = GuardrailSpec("conversion", "proportion", "higher_is_better", margin=0.05)
    snapshot = _snapshot(
        conversion={
            "control": ProportionStats(40_000, 4000),
            "canary": ProportionStats(40_000, 3400),
        }
    )
    decision = evaluate_guardrails([spec], snapshot, settings=SETTINGS)
    assert decision.action is GuardrailAction.ROLLBACK
    evidence = decision.evaluations[0]
    assert evidence.harm_estimate == pytest.approx(0.15)
    assert evidence.harm_lower_bound > 0.05
    low, high = evidence.interval
    assert low < -0.15 < high < -0.05


def test_evidence_bounds_agree_with_the_decision_rule() -> None:
    # The reported harm lower bound is the margin at which the statistic meets the threshold.
    control, canary = ProportionStats(30_000, 330), ProportionStats(3_000, 52)
    for margin in (0.0, 0.1, 0.3):
        spec = GuardrailSpec("error_rate", "proportion", "lower_is_better", margin=margin)
        evidence = evaluate_guardrails(
            [spec], _snapshot(error_rate={"control": control, "canary": canary}), settings=SETTINGS
        ).evaluations[0]
        at_bound = proportion_harm_z(
            330, 30_000, 52, 3_000, ratio=1 + evidence.harm_lower_bound, lower_is_better=True
        )
        assert float(at_bound) == pytest.approx(evidence.threshold, rel=1e-6)
        assert (evidence.status is GuardrailStatus.HARM) == (evidence.harm_lower_bound > margin)


def test_alpha_is_split_across_guardrails_and_arms() -> None:
    specs = [LATENCY, GuardrailSpec("error_rate", "proportion", "lower_is_better", weight=2)]
    snapshot = ExperimentSnapshot(
        control="control",
        treatments=("b", "c"),
        metrics={
            "latency_ms": {k: _mean_stats(5000, 100, 10) for k in ("control", "b", "c")},
            "error_rate": {k: ProportionStats(5000, 60) for k in ("control", "b", "c")},
        },
    )
    decision = evaluate_guardrails(specs, snapshot, settings=SETTINGS)
    alphas = {(e.metric_key, e.arm): e.alpha for e in decision.evaluations}
    assert alphas[("latency_ms", "b")] == pytest.approx(0.05 / 6)
    assert alphas[("error_rate", "c")] == pytest.approx(0.05 * 2 / 6)
    assert math.fsum(alphas.values()) == pytest.approx(0.05)
    assert decision.action is GuardrailAction.CONTINUE


def test_burn_in_and_missing_data_hold() -> None:
    few_units = _snapshot(
        latency_ms={"control": _mean_stats(5000, 100, 10), "canary": _mean_stats(50, 300, 10)}
    )
    decision = evaluate_guardrails([LATENCY], few_units, settings=SETTINGS)
    assert decision.action is GuardrailAction.HOLD
    assert decision.evaluations[0].status is GuardrailStatus.BURN_IN
    few_events = _snapshot(
        error_rate={"control": ProportionStats(5000, 40), "canary": ProportionStats(500, 9)}
    )
    assert evaluate_guardrails([ERRORS], few_events, settings=SETTINGS).action == "hold"
    missing = _snapshot(latency_ms={"control": _mean_stats(5000, 100, 10)})
    assert evaluate_guardrails([LATENCY], missing, settings=SETTINGS).action == "hold"


def test_harm_fires_even_while_another_guardrail_is_in_burn_in() -> None:
    snapshot = _snapshot(
        latency_ms={
            "control": _mean_stats(20_000, 120, 40),
            "canary": _mean_stats(20_000, 130, 41),
        },
        error_rate={"control": ProportionStats(20_000, 5), "canary": ProportionStats(20_000, 6)},
    )
    decision = evaluate_guardrails([LATENCY, ERRORS], snapshot, settings=SETTINGS)
    assert decision.action is GuardrailAction.ROLLBACK


def test_srm_holds_without_evaluating_guardrails() -> None:
    snapshot = ExperimentSnapshot(
        control="control",
        treatments=("canary",),
        metrics={
            "latency_ms": {
                "control": _mean_stats(9000, 120, 40),
                "canary": _mean_stats(1500, 150, 41),
            }
        },
        exposures={"control": 9000, "canary": 1500},
        expected_weights={"control": 0.9, "canary": 0.1},
    )
    decision = evaluate_guardrails([LATENCY], snapshot, settings=SETTINGS)
    assert decision.action is GuardrailAction.HOLD and "sample ratio" in decision.reason
    assert decision.evaluations == () and decision.srm_sequential is not None
    assert decision.srm_sequential.flagged and decision.srm is not None
    balanced = ExperimentSnapshot(
        control="control",
        treatments=("canary",),
        metrics=snapshot.metrics,
        exposures={"control": 9000, "canary": 1000},
        expected_weights={"control": 0.9, "canary": 0.1},
    )
    decision = evaluate_guardrails([LATENCY], balanced, settings=SETTINGS)
    assert decision.action is GuardrailAction.ROLLBACK
    assert decision.srm_max_log_e_value == decision.srm_sequential.max_log_e_value  # type: ignore[union-attr]


def test_ratio_guardrail() -> None:
    rng = np.random.default_rng(8)
    sessions_a, sessions_b = rng.poisson(3, 20_000) + 1.0, rng.poisson(3, 20_000) + 1.0
    crashes_a = rng.binomial(sessions_a.astype(int), 0.02) * 1.0
    crashes_b = rng.binomial(sessions_b.astype(int), 0.03) * 1.0
    spec = GuardrailSpec("crashes_per_session", "ratio", "lower_is_better", margin=0.1)
    snapshot = _snapshot(
        crashes_per_session={
            "control": RatioStats.from_values(crashes_a, sessions_a),
            "canary": RatioStats.from_values(crashes_b, sessions_b),
        }
    )
    assert evaluate_guardrails([spec], snapshot, settings=SETTINGS).action == "rollback"


def test_quantile_guardrail_dispatch() -> None:
    rng = np.random.default_rng(12)
    control, slow = LogHistogram(), LogHistogram()
    control.add_many(rng.lognormal(4.6, 0.5, 20_000))
    slow.add_many(rng.lognormal(4.6 + math.log(1.3), 0.5, 20_000))
    spec = GuardrailSpec("latency_hist", "quantile", "lower_is_better", margin=0.05, quantile=0.95)
    decision = evaluate_guardrails(
        [spec], _snapshot(latency_hist={"control": control, "canary": slow}), settings=SETTINGS
    )
    assert decision.action is GuardrailAction.ROLLBACK
    evidence = decision.tripped
    assert evidence is not None and evidence.harm_lower_bound > 0.05
    assert evidence.relative_effect == pytest.approx(0.3, abs=0.05)
    same = LogHistogram()
    same.add_many(rng.lognormal(4.6, 0.5, 20_000))
    decision = evaluate_guardrails(
        [spec], _snapshot(latency_hist={"control": control, "canary": same}), settings=SETTINGS
    )
    assert decision.action is GuardrailAction.CONTINUE
    small = LogHistogram()
    small.add_many(rng.lognormal(4.6, 0.5, 50))
    decision = evaluate_guardrails(
        [spec], _snapshot(latency_hist={"control": control, "canary": small}), settings=SETTINGS
    )
    assert decision.action is GuardrailAction.HOLD


def test_wrong_statistic_kind_is_an_error() -> None:
    snapshot = _snapshot(
        latency_ms={"control": ProportionStats(500, 5), "canary": ProportionStats(500, 5)}
    )
    with pytest.raises(ValueError, match="MeanStats"):
        evaluate_guardrails([LATENCY], snapshot, settings=SETTINGS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"margin": -0.1}, "margin"),
        ({"weight": 0}, "weight"),
        ({"quantile": 0.95}, "quantile"),
        ({"direction": "sideways"}, "direction"),
    ],
)
def test_invalid_specs(kwargs: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {
        "metric_key": "m",
        "kind": "mean",
        "direction": "lower_is_better",
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=field):
        GuardrailSpec(**arguments)  # type: ignore[arg-type]


def test_restricted_rates_maximise_the_constrained_likelihood() -> None:
    x_a, n_a, x_b, n_b, ratio = 120, 9000, 31, 1000, 1.4

    def negative_log_likelihood(p: float) -> float:
        return -(
            scipy_stats.binom.logpmf(x_a, n_a, p) + scipy_stats.binom.logpmf(x_b, n_b, ratio * p)
        )

    best = optimize.minimize_scalar(
        negative_log_likelihood, bounds=(1e-6, 0.7), method="bounded", options={"xatol": 1e-12}
    )
    p_a, p_b = restricted_rates(x_a, n_a, x_b, n_b, ratio=ratio)
    assert float(p_a) == pytest.approx(best.x, rel=1e-6)
    assert float(p_b) == pytest.approx(ratio * best.x, rel=1e-6)
    pooled, _ = restricted_rates(x_a, n_a, x_b, n_b, ratio=1.0)
    assert float(pooled) == pytest.approx((x_a + x_b) / (n_a + n_b), rel=1e-12)


def test_harm_statistics_reduce_to_the_one_sided_bound_at_margin_zero() -> None:
    a, b = _mean_stats(8000, 50, 9), _mean_stats(2000, 51, 10)
    z = mean_harm_z(
        a.mean, a.variance, a.n, b.mean, b.variance, b.n, ratio=1.0, lower_is_better=True
    )
    threshold = harm_threshold(10_000, alpha=0.05, n_star=5000)
    bound = asymptotic_one_sided_bound(
        estimate_effect(a, b, relative=False), alpha=0.05, n_star=5000
    )
    assert (float(z) > float(threshold)) == (bound.bound > 0)
    assert float(z) * bound.se - float(threshold) * bound.se == pytest.approx(bound.bound, rel=1e-9)
    assert float(harm_p_value(z, 10_000, alpha=0.05, n_star=5000)) == pytest.approx(
        bound.p_value, rel=1e-9
    )
