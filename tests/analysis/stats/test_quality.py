"""Quality scores against scikit-learn, and the per-unit quality guardrail in seeded simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from analysis.stats.guardrail_types import (
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailSettings,
    GuardrailSpec,
)
from analysis.stats.guardrails import evaluate_guardrails
from analysis.stats.moments import MeanStats
from analysis.stats.quality import SCORES, unit_means

RNG_SEED = 20261204


def _mean(source: str, predictions: list, labels: list) -> float:
    scores = [SCORES[source](p, y) for p, y in zip(predictions, labels, strict=True)]
    assert all(score is not None for score in scores)
    return float(np.mean(scores))


def test_scores_average_to_the_sklearn_metrics() -> None:
    rng = np.random.default_rng(RNG_SEED)
    n, k = 500, 4
    labels = rng.integers(0, k, n)
    raw = rng.random((n, k)) + 0.05
    probabilities = raw / raw.sum(axis=1, keepdims=True)
    vectors = [[float(x) for x in row] for row in probabilities]
    ints = [int(y) for y in labels]
    # Classes: accuracy of the argmax and of class labels given as text.
    assert _mean("quality:accuracy", vectors, ints) == pytest.approx(
        skm.accuracy_score(labels, probabilities.argmax(axis=1)), rel=1e-12
    )
    names = [f"c{int(c)}" for c in rng.integers(0, k, n)]
    truth = [f"c{int(c)}" for c in labels]
    assert _mean("quality:accuracy", names, truth) == pytest.approx(
        skm.accuracy_score(truth, names), rel=1e-12
    )
    # Multi-class log loss (sklearn's eps is float64 machine epsilon since 1.5).
    assert _mean("quality:log_loss", vectors, ints) == pytest.approx(
        skm.log_loss(labels, probabilities, labels=list(range(k))), rel=1e-10
    )
    # Binary probabilities: log loss and Brier score.
    p = rng.random(n)
    p[:3] = [0.0, 1.0, 0.5]  # clipped at eps, and a tie
    y = rng.integers(0, 2, n)
    singles, binary = [float(x) for x in p], [int(v) for v in y]
    assert _mean("quality:log_loss", singles, binary) == pytest.approx(
        skm.log_loss(y, p, labels=[0, 1]), rel=1e-10
    )
    assert _mean("quality:brier", singles, binary) == pytest.approx(
        skm.brier_score_loss(y, p), rel=1e-12
    )
    assert _mean("quality:accuracy", singles, binary) == pytest.approx(
        skm.accuracy_score(y, (p > 0.5).astype(int)), rel=1e-12
    )
    # Numbers.
    truth_numbers = rng.normal(10, 3, n)
    predicted = truth_numbers + rng.normal(0.5, 2, n)
    pairs = ([float(x) for x in predicted], [float(x) for x in truth_numbers])
    assert _mean("quality:absolute_error", *pairs) == pytest.approx(
        skm.mean_absolute_error(truth_numbers, predicted), rel=1e-12
    )
    assert _mean("quality:squared_error", *pairs) == pytest.approx(
        skm.mean_squared_error(truth_numbers, predicted), rel=1e-12
    )


def test_multiclass_brier_is_the_original_sum_over_classes() -> None:
    # Brier (1950) eq. 1 for one forecast: sum_k (p_k - o_k)^2.
    assert SCORES["quality:brier"]([0.7, 0.2, 0.1], 0) == pytest.approx(0.09 + 0.04 + 0.01)
    # Two classes as a vector: twice the binary form.
    assert SCORES["quality:brier"]([0.3, 0.7], 1) == pytest.approx(2 * 0.09)
    assert SCORES["quality:brier"](0.7, 1) == pytest.approx(0.09)


@pytest.mark.parametrize(
    ("source", "prediction", "label"),
    [
        ("quality:log_loss", [0.5, 0.5], 2),
        ("quality:log_loss", [0.5, 0.5], "cat"),
        ("quality:accuracy", [0.5, 0.5], -1),
        ("quality:brier", 1.5, 1),
        ("quality:absolute_error", 1.0, "3"),
        ("quality:squared_error", "cat", 1.0),
        ("quality:log_loss", 0.5, 1.5),
    ],
)
def test_labels_that_cannot_be_scored_give_none(
    source: str, prediction: object, label: object
) -> None:
    assert SCORES[source](prediction, label) is None


def test_unit_means_weigh_each_unit_once() -> None:
    means = unit_means([("a", 1.0), ("a", 0.0), ("a", 1.0), ("b", 0.0)])
    assert means == {"a": pytest.approx(2 / 3), "b": 0.0}


# --- the guardrail on per-unit accuracy, in seeded simulations -------------------------------


def _arm(rng: np.random.Generator, units: int, accuracy: float) -> np.ndarray:
    """Per-unit accuracies: heavy-tailed request counts and user-specific difficulty."""
    requests = 1 + rng.poisson(2.0, units) + (rng.pareto(1.5, units) * 2).astype(int)
    # Each user has their own accuracy (Beta around the model's), so units differ.
    concentration = 20.0
    own = rng.beta(accuracy * concentration, (1 - accuracy) * concentration, units)
    correct = rng.binomial(requests, own)
    return correct / requests


def _stats(values: np.ndarray) -> MeanStats:
    return MeanStats(n=len(values), sum=float(values.sum()), sum_squares=float(values @ values))


def _first_rollback(
    rng: np.random.Generator, control: float, canary: float, *, margin: float
) -> int | None:
    """Units per arm at the first look that rolls back (looks every 100 units), or None."""
    a, b = _arm(rng, 2000, control), _arm(rng, 2000, canary)
    spec = GuardrailSpec("accuracy", "mean", "higher_is_better", margin=margin)
    settings = GuardrailSettings(alpha=0.05, n_star=2000)
    for n in range(100, 2001, 100):
        snapshot = ExperimentSnapshot(
            control="v1",
            treatments=("v2",),
            metrics={"accuracy": {"v1": _stats(a[:n]), "v2": _stats(b[:n])}},
        )
        if evaluate_guardrails([spec], snapshot, settings=settings).action == (
            GuardrailAction.ROLLBACK
        ):
            return n
    return None


def test_aa_false_rollbacks_stay_under_alpha() -> None:
    rng = np.random.default_rng(RNG_SEED)
    runs = 300
    false = sum(_first_rollback(rng, 0.9, 0.9, margin=0.0) is not None for _ in range(runs))
    rate = false / runs
    # Wilson lower bound of the rate must not exceed alpha (observed: printed for the README).
    z = 1.959963984540054
    centre = (rate + z * z / (2 * runs)) / (1 + z * z / runs)
    half = z * math.sqrt(rate * (1 - rate) / runs + z * z / (4 * runs * runs)) / (1 + z * z / runs)
    print(f"A/A false rollbacks: {false}/{runs} = {rate:.3f}")
    assert centre - half <= 0.05
    assert rate <= 0.05


def test_a_degraded_model_is_rolled_back_and_a_small_drop_within_the_margin_is_not() -> None:
    rng = np.random.default_rng(RNG_SEED + 1)
    caught = [_first_rollback(rng, 0.9, 0.75, margin=0.01) for _ in range(40)]
    assert all(n is not None for n in caught)
    print(f"degraded 0.90 -> 0.75: median rollback at {np.median(caught):.0f} units per arm")
    within = [_first_rollback(rng, 0.9, 0.897, margin=0.02) for _ in range(40)]
    assert sum(n is not None for n in within) <= 2
