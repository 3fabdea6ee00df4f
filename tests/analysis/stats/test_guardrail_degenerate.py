"""Degenerate data is evidence: constant arms in mean guardrails (issue 12, item 2)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.moments import MeanStats

SETTINGS = GuardrailSettings(alpha=0.05, n_star=5000)
LATENCY = GuardrailSpec("latency_ms", "mean", "lower_is_better", margin=0.1)


def _stats(values: np.ndarray) -> MeanStats:
    return MeanStats(n=len(values), sum=float(values.sum()), sum_squares=float(values @ values))


def _evaluate(control: np.ndarray, canary: np.ndarray, spec: GuardrailSpec = LATENCY):
    snapshot = ExperimentSnapshot(
        control="control",
        treatments=("canary",),
        metrics={"latency_ms": {"control": _stats(control), "canary": _stats(canary)}},
    )
    return evaluate_guardrails([spec], snapshot, settings=SETTINGS)


def test_constant_slow_canary_against_variable_control_rolls_back() -> None:
    control = 100.0 * np.exp(0.3 * np.random.default_rng(1).standard_normal(200))
    decision = _evaluate(control, np.full(200, 1_000.0))
    assert decision.action is GuardrailAction.ROLLBACK
    evidence = decision.evaluations[0]
    # One constant arm: the ordinary harm test with the control's variance alone.
    assert evidence.status is GuardrailStatus.HARM and evidence.note == ""
    assert evidence.harm_lower_bound > 5 and evidence.p_value < 1e-10


def test_constant_fast_canary_against_variable_control_is_safe() -> None:
    control = 100.0 * np.exp(0.3 * np.random.default_rng(2).standard_normal(2_000))
    decision = _evaluate(control, np.full(2_000, 60.0))
    assert decision.action is GuardrailAction.CONTINUE and decision.safe_to_promote
    assert decision.evaluations[0].status is GuardrailStatus.SAFE


def test_one_constant_arm_matches_the_welch_statistic() -> None:
    # With the canary constant the contrast is (mu_B - r mu_A) / (r s_A / sqrt(n_A)).
    control = 100.0 * np.exp(0.3 * np.random.default_rng(3).standard_normal(500))
    evidence = _evaluate(control, np.full(500, 115.0)).evaluations[0]
    expected = (115.0 - 1.1 * control.mean()) / (1.1 * scipy_stats.sem(control))
    assert evidence.statistic == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("control_ms", "canary_ms", "status", "action"),
    [
        (100.0, 1_000.0, GuardrailStatus.HARM, GuardrailAction.ROLLBACK),
        (100.0, 111.0, GuardrailStatus.HARM, GuardrailAction.ROLLBACK),
        (100.0, 109.0, GuardrailStatus.SAFE, GuardrailAction.CONTINUE),
        (100.0, 100.0, GuardrailStatus.SAFE, GuardrailAction.CONTINUE),
        (100.0, 110.0, GuardrailStatus.INCONCLUSIVE, GuardrailAction.CONTINUE),
    ],
)
def test_both_arms_constant_compare_the_exact_difference_with_the_margin(
    control_ms: float, canary_ms: float, status: GuardrailStatus, action: GuardrailAction
) -> None:
    decision = _evaluate(np.full(150, control_ms), np.full(120, canary_ms))
    evidence = decision.evaluations[0]
    assert decision.action is action and evidence.status is status
    assert evidence.note == "both arms constant: the difference is exact"
    assert evidence.relative_effect == pytest.approx(canary_ms / control_ms - 1)
    assert evidence.interval[0] == evidence.interval[1] == evidence.relative_effect
    assert evidence.p_value == (0.0 if status is GuardrailStatus.HARM else 1.0)


def test_both_arms_constant_higher_is_better() -> None:
    spec = GuardrailSpec("latency_ms", "mean", "higher_is_better", margin=0.1)
    assert _evaluate(np.full(100, 10.0), np.full(100, 8.0), spec).action == "rollback"
    assert _evaluate(np.full(100, 10.0), np.full(100, 9.5), spec).action == "continue"


def test_constant_arms_wait_for_the_burn_in() -> None:
    decision = _evaluate(np.full(99, 100.0), np.full(500, 1_000.0))
    assert decision.action is GuardrailAction.HOLD
    assert decision.evaluations[0].status is GuardrailStatus.BURN_IN


def test_rounding_noise_on_constant_data_counts_as_constant() -> None:
    # sum_squares - sum^2 / n leaves a tiny positive variance on some constant values.
    values = np.full(1_000, 1_000.3)
    assert _stats(values).variance >= 0
    evidence = _evaluate(np.full(1_000, 1_000.3), values).evaluations[0]
    assert evidence.note == "both arms constant: the difference is exact"
    assert evidence.status is GuardrailStatus.SAFE


def test_aa_with_discretised_latencies_keeps_alpha() -> None:
    # Latencies rounded to a 10 ms clock: 10 ms except 0.8% at 20 ms and 0.2% at 50 ms, so
    # either arm (or both) is often constant early (each with probability 0.37 at n = 100).
    # Looks every 25 units per arm from 100 to 1,000 with margin 0 (the hardest case). Before
    # the change the looks with a constant arm were not evaluable.
    rng = np.random.default_rng(20261204)
    runs, rolled_back, constant_looks = 500, 0, 0
    spec = GuardrailSpec("latency_ms", "mean", "lower_is_better", margin=0.0)
    for _ in range(runs):
        arms = rng.choice([10.0, 20.0, 50.0], p=[0.99, 0.008, 0.002], size=(2, 1_000))
        for n in range(100, 1_001, 25):
            decision = _evaluate(arms[0, :n], arms[1, :n], spec)
            constant_looks += bool(np.ptp(arms[0, :n]) == 0 or np.ptp(arms[1, :n]) == 0)
            if decision.action is GuardrailAction.ROLLBACK:
                rolled_back += 1
                break
    _, high = _wilson(rolled_back, runs)
    assert constant_looks > 0  # the degenerate branch was exercised
    assert high <= 0.05, (rolled_back, runs, high)


def _wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
