"""Scores of one prediction against its label, and their per-unit averages (model quality).

A quality guardrail compares arms on the mean per unit of a per-prediction score, so a heavy
user counts once (STATS.md 12.1, "the user is the unit"): unit u with m_u scored predictions
contributes x_u = (1/m_u) * sum_i s(p_i, y_i), and each arm's statistic is the mean of the x_u
(``MeanStats``), tested with the sequential machinery of the other mean guardrails.

Per-prediction scores s(p, y), each the summand of the scikit-learn metric of the same name
(the tests check the means against ``sklearn.metrics``):

* accuracy: 1 if the predicted class equals the label, else 0 (``accuracy_score``). For a
  score vector the predicted class is its argmax (first on ties, as ``numpy.argmax``); for a
  single probability p of class 1, the class is 1 when p > 0.5.
* absolute error |p - y| and squared error (p - y)^2 for numbers (``mean_absolute_error``,
  ``mean_squared_error``).
* log loss -ln q, with q the probability given to the true class, clipped to [eps, 1 - eps],
  eps = 2.220446049250313e-16 (float64 machine epsilon, ``log_loss``'s default since
  scikit-learn 1.5; Bishop 2006, *Pattern Recognition and Machine Learning*, eq. 4.108).
  A vector is used as given (not renormalised): a model that does not sum to 1 is scored on
  what it said.
* Brier score: for one probability p of class 1, (p - y)^2 (Brier 1950, *Monthly Weather
  Review* 78(1), eq. 1 with two classes counted once; ``brier_score_loss``); for a vector,
  sum_k (p_k - [k = y])^2, Brier's original multi-class form, which is twice the binary form
  for a two-class vector.

A label that cannot be scored against a prediction (a text label for a score vector, an index
outside the vector, a class label for a number) gives None: the prediction is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

EPS: Final = 2.220446049250313e-16

Score = Callable[[Any, Any], "float | None"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _class_index(label: Any, size: int) -> int | None:
    """A label as an index into a score vector of ``size`` (booleans are 0 and 1)."""
    if isinstance(label, bool):
        label = int(label)
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, int) and 0 <= label < size:
        return label
    return None


def _probabilities(prediction: Any) -> list[float] | None:
    """A score vector, or [1 - p, p] for a single probability p of class 1."""
    if isinstance(prediction, list):
        values = [_number(item) for item in prediction]
        if not values or any(v is None for v in values):
            return None
        return [float(v) for v in values if v is not None]
    p = _number(prediction)
    if p is None or not 0.0 <= p <= 1.0:
        return None
    return [1.0 - p, p]


def accuracy(prediction: Any, label: Any) -> float | None:
    # A class prediction is a string, an integer or a boolean (routing.proxy.predictions);
    # a float or a list is a probability or a score vector.
    if isinstance(prediction, list) or type(prediction) is float:
        probabilities = _probabilities(prediction)
        if probabilities is None:
            return None
        index = _class_index(label, len(probabilities))
        if index is None:
            return None
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return 1.0 if best == index else 0.0
    return 1.0 if prediction == label else 0.0


def absolute_error(prediction: Any, label: Any) -> float | None:
    p, y = _number(prediction), _number(label)
    return None if p is None or y is None else abs(p - y)


def squared_error(prediction: Any, label: Any) -> float | None:
    p, y = _number(prediction), _number(label)
    return None if p is None or y is None else (p - y) ** 2


def log_loss(prediction: Any, label: Any) -> float | None:
    probabilities = _probabilities(prediction)
    if probabilities is None:
        return None
    index = _class_index(label, len(probabilities))
    if index is None:
        return None
    q = min(max(probabilities[index], EPS), 1.0 - EPS)
    return -math.log(q)


def brier(prediction: Any, label: Any) -> float | None:
    probabilities = _probabilities(prediction)
    if probabilities is None:
        return None
    index = _class_index(label, len(probabilities))
    if index is None:
        return None
    if not isinstance(prediction, list):
        return (probabilities[1] - float(index)) ** 2
    return sum((p - (1.0 if k == index else 0.0)) ** 2 for k, p in enumerate(probabilities))


SCORES: Final[dict[str, Score]] = {
    "quality:accuracy": accuracy,
    "quality:absolute_error": absolute_error,
    "quality:squared_error": squared_error,
    "quality:log_loss": log_loss,
    "quality:brier": brier,
}


def unit_means(scores: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Per unit, the mean of its scores: x_u = (1/m_u) * sum of the unit's scores."""
    totals: dict[str, list[float]] = {}
    for unit, score in scores:
        entry = totals.get(unit)
        if entry is None:
            totals[unit] = [score, 1.0]
        else:
            entry[0] += score
            entry[1] += 1.0
    return {unit: total / count for unit, (total, count) in totals.items()}
