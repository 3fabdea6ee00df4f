"""Validation of an experiment's model-quality settings (where the proxy reads predictions)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from experiments.contracts import QUALITY_SOURCES
from experiments.models import Experiment, HealthResponse, MetricKind, PredictionKind
from experiments.prediction_path import PathError, parse_prediction_path
from experiments.services.common import Errors

QUALITY_FIELDS: Final = (
    "quality_enabled",
    "quality_prediction_path",
    "quality_prediction_kind",
    "quality_request_id_header",
    "quality_sample_rate",
    "prediction_drift_enabled",
    "prediction_drift_tolerance",
    "prediction_drift_action",
)
_DEFAULTS: Final[Mapping[str, Any]] = {
    "quality_enabled": False,
    "quality_prediction_path": "",
    "quality_prediction_kind": PredictionKind.CLASS.value,
    "quality_request_id_header": "",
    "quality_sample_rate": 1.0,
    "prediction_drift_enabled": False,
    "prediction_drift_tolerance": 0.02,
    "prediction_drift_action": HealthResponse.HOLD.value,
}
# An HTTP field name (RFC 9110 section 5.1: a token).
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
# Headers the proxy reads or sets itself: a caller's id cannot come from them.
_RESERVED_HEADERS: Final = frozenset(
    {
        "authorization",
        "connection",
        "content-length",
        "cookie",
        "host",
        "transfer-encoding",
        "x-rampart-key",
    }
)


def quality_state(experiment: Experiment) -> dict[str, Any]:
    """The experiment's quality settings as stored, by field name."""
    return {name: getattr(experiment, name) for name in QUALITY_FIELDS}


def validate_quality(values: Mapping[str, Any], errors: Errors) -> None:
    """Check the quality settings ``values`` would leave (missing ones take their defaults).

    Each error names its field: a path that cannot be parsed, tracking switched on without
    a path, an unknown kind, a header name that is not a token, a rate outside [0, 1].
    """
    merged = {**_DEFAULTS, **{k: v for k, v in values.items() if k in _DEFAULTS}}
    path = str(merged["quality_prediction_path"])
    if path:
        try:
            parse_prediction_path(path)
        except PathError as error:
            errors.add("quality_prediction_path", str(error))
    elif merged["quality_enabled"]:
        errors.add(
            "quality_prediction_path",
            "Quality tracking needs the JSON path of the prediction in the model's answer.",
        )
    if merged["quality_prediction_kind"] not in PredictionKind.values:
        errors.add("quality_prediction_kind", f"Must be one of {', '.join(PredictionKind.values)}.")
    header = str(merged["quality_request_id_header"])
    if header:
        if not _HEADER_NAME.fullmatch(header):
            errors.add("quality_request_id_header", "Must be an HTTP header name.")
        elif header.lower() in _RESERVED_HEADERS:
            errors.add("quality_request_id_header", f"The proxy uses {header!r} itself.")
    rate = merged["quality_sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        # NaN fails the comparison too.
        errors.add("quality_sample_rate", "Must be between 0 and 1.")
    _validate_drift(merged, errors)


def _validate_drift(merged: Mapping[str, Any], errors: Errors) -> None:
    """Prediction drift reads the predictions quality tracking records."""
    if merged["prediction_drift_enabled"] and not merged["quality_enabled"]:
        errors.add(
            "prediction_drift_enabled",
            "Prediction drift needs quality tracking on (quality_enabled and a prediction path).",
        )
    tolerance = merged["prediction_drift_tolerance"]
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not 0.0 <= tolerance < 0.5
    ):
        errors.add(
            "prediction_drift_tolerance",
            "The tolerated total variation distance: at least 0 and below 0.5.",
        )
    if merged["prediction_drift_action"] not in HealthResponse.values:
        errors.add("prediction_drift_action", f"Must be one of {', '.join(HealthResponse.values)}.")


def validate_quality_metric(values: Mapping[str, Any], errors: Errors) -> None:
    """A quality metric (source ``quality:...``) is a per-unit mean with a fixed direction.

    ``missing_label`` (only for quality metrics) is JSON text of the label a prediction
    counts with when its window passes without one: a string, a number or a boolean.
    """
    source = str(values.get("source", ""))
    missing = str(values.get("missing_label", "") or "")
    if source.startswith("quality:"):
        direction = QUALITY_SOURCES.get(source)
        if direction is None:
            errors.add("source", f"Quality metrics are {', '.join(QUALITY_SOURCES)}.")
            return
        if values.get("kind") != MetricKind.MEAN:
            errors.add("kind", "A quality metric is a per-unit mean: use kind 'mean'.")
        if "direction" in values and values["direction"] != direction:
            errors.add("direction", f"{source} is {direction}-is-better.")
        if missing:
            try:
                label = orjson.loads(missing)
            except orjson.JSONDecodeError:
                label = None
            if isinstance(label, dict | list) or label is None:
                errors.add(
                    "missing_label",
                    'JSON text of a string, number or boolean, e.g. "legitimate" (quoted) or 0.',
                )
    elif missing:
        errors.add("missing_label", "Only quality metrics have a missing-label rule.")
