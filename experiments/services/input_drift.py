"""Validation of an experiment's input-drift settings: request fields, reference, response.

The setting is one JSON object, validated whole (nothing is stored when any part is wrong);
each error names its place, e.g. ``input_drift.fields[2].path`` or
``input_drift.reference.distributions.amount.counts``::

    {
      "fields": [{"path": "amount", "kind": "number", "threshold": 0.2, "edges": [10, 50, 100]},
                 {"path": "country", "kind": "category"}],
      "sample_rate": 0.1,
      "action": "warn",
      "reference": {"type": "window", "start": "2026-12-01T00:00:00Z",
                    "end": "2026-12-02T00:00:00Z"}
                 | {"type": "training",
                    "distributions": {"amount": {"edges": [10, 50, 100], "counts": [5, 40, 30, 25]},
                                      "country": {"counts": {"DE": 40, "FR": 60}}}}
    }

``{}`` turns the check off. Without ``reference`` the reference is the experiment's first
``INPUT_DRIFT_REFERENCE_S`` seconds. Numbers without ``edges`` are binned by the proxy on a
fixed signed log grid (``routing.proxy.inputs``); a training distribution of a number gives
the field its edges.
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime
from typing import Any, Final

from experiments.models import HealthResponse
from experiments.prediction_path import PathError, parse_prediction_path
from experiments.services.common import Errors

FIELD = "input_drift"
MAX_FIELDS: Final = 10
MAX_EDGES: Final = 100
MAX_CATEGORIES: Final = 200
KINDS: Final = ("number", "category")
DEFAULT_THRESHOLD: Final = 0.2
DEFAULT_SAMPLE_RATE: Final = 0.1
_KEYS: Final = {"fields", "sample_rate", "action", "reference"}
_FIELD_KEYS: Final = {"path", "kind", "threshold", "edges"}


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _edges(value: Any, where: str, errors: Errors) -> list[float] | None:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_EDGES
        or not all(_number(v) for v in value)
        or any(b <= a for a, b in itertools.pairwise(value))
    ):
        errors.add(where, f"1 to {MAX_EDGES} finite numbers in increasing order.")
        return None
    return [float(v) for v in value]


def _counts_ok(values: list[Any]) -> bool:
    return all(_number(v) and v >= 0 for v in values) and sum(values) > 0


def _distribution(
    value: Any, kind: str, edges: list[float] | None, where: str, errors: Errors
) -> list[float] | None:
    """Check one training distribution; returns the edges a number field takes from it."""
    if not isinstance(value, dict):
        errors.add(where, "An object with the field's counts.")
        return None
    counts = value.get("counts")
    if kind == "category":
        if set(value) - {"counts"}:
            errors.add(where, "A category field's distribution has only 'counts'.")
        if (
            not isinstance(counts, dict)
            or not 1 <= len(counts) <= MAX_CATEGORIES
            or not _counts_ok(list(counts.values()))
        ):
            errors.add(
                f"{where}.counts",
                f"An object of 1 to {MAX_CATEGORIES} categories with counts >= 0, not all 0.",
            )
        return None
    if set(value) - {"counts", "edges"}:
        errors.add(where, "A number field's distribution has 'edges' and 'counts'.")
    found = _edges(value.get("edges"), f"{where}.edges", errors)
    if found is None:
        return None
    if edges is not None and found != edges:
        errors.add(f"{where}.edges", "Must equal the field's edges.")
    if not isinstance(counts, list) or len(counts) != len(found) + 1 or not _counts_ok(counts):
        errors.add(
            f"{where}.counts",
            f"{len(found) + 1} counts (one more than the edges) >= 0, not all 0.",
        )
    return found


def _timestamp(value: Any, where: str, errors: Errors) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if not isinstance(value, str) or moment is None or moment.tzinfo is None:
        errors.add(where, "An ISO 8601 time with a time zone, e.g. 2026-12-01T00:00:00Z.")
        return None
    return moment


def validate_input_drift(value: Any, errors: Errors) -> dict[str, Any]:
    """Check the setting; returns it normalised (defaults filled in) when it is valid."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        errors.add(FIELD, "An object with 'fields' (or {} to turn input drift off).")
        return {}
    for unknown in sorted(set(value) - _KEYS):
        errors.add(f"{FIELD}.{unknown}", "Unknown key.")
    fields = value.get("fields")
    if not isinstance(fields, list) or not 1 <= len(fields) <= MAX_FIELDS:
        errors.add(f"{FIELD}.fields", f"A list of 1 to {MAX_FIELDS} request fields.")
        fields = []
    normalised: list[dict[str, Any]] = []
    for index, item in enumerate(fields):
        where = f"{FIELD}.fields[{index}]"
        if not isinstance(item, dict):
            errors.add(where, "An object with 'path' and 'kind'.")
            continue
        for unknown in sorted(set(item) - _FIELD_KEYS):
            errors.add(f"{where}.{unknown}", "Unknown key.")
        path = item.get("path")
        try:
            parse_prediction_path(path if isinstance(path, str) else "")
        except PathError as error:
            errors.add(f"{where}.path", str(error))
        if path in [f["path"] for f in normalised]:
            errors.add(f"{where}.path", "Each field once.")
        kind = item.get("kind")
        if kind not in KINDS:
            errors.add(f"{where}.kind", f"Must be one of {', '.join(KINDS)}.")
        threshold = item.get("threshold", DEFAULT_THRESHOLD)
        if not _number(threshold) or threshold <= 0:
            errors.add(f"{where}.threshold", "The PSI that counts as drift: a number > 0.")
        edges = None
        if item.get("edges") is not None:
            if kind != "number":
                errors.add(f"{where}.edges", "Only number fields have edges.")
            else:
                edges = _edges(item["edges"], f"{where}.edges", errors)
        normalised.append({"path": path, "kind": kind, "threshold": threshold, "edges": edges})
    rate = value.get("sample_rate", DEFAULT_SAMPLE_RATE)
    if not _number(rate) or not 0 < rate <= 1:
        errors.add(f"{FIELD}.sample_rate", "Share of requests read: above 0, at most 1.")
    action = value.get("action", HealthResponse.WARN.value)
    if action not in HealthResponse.values:
        errors.add(f"{FIELD}.action", f"Must be one of {', '.join(HealthResponse.values)}.")
    reference = value.get("reference")
    result: dict[str, Any] = {"fields": normalised, "sample_rate": rate, "action": action}
    if reference is not None:
        result["reference"] = _reference(reference, normalised, errors)
    return result


def _reference(value: Any, fields: list[dict[str, Any]], errors: Errors) -> dict[str, Any]:
    where = f"{FIELD}.reference"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "window":
        for unknown in sorted(set(value) - {"type", "start", "end"}):
            errors.add(f"{where}.{unknown}", "Unknown key.")
        start = _timestamp(value.get("start"), f"{where}.start", errors)
        end = _timestamp(value.get("end"), f"{where}.end", errors)
        if start is not None and end is not None and end <= start:
            errors.add(f"{where}.end", "Must be after start.")
        return {"type": "window", "start": value.get("start"), "end": value.get("end")}
    if kind == "training":
        for unknown in sorted(set(value) - {"type", "distributions"}):
            errors.add(f"{where}.{unknown}", "Unknown key.")
        given = value.get("distributions")
        if not isinstance(given, dict):
            errors.add(f"{where}.distributions", "An object: field path -> bins and counts.")
            return {"type": "training", "distributions": {}}
        paths = [f["path"] for f in fields]
        for unknown in sorted(set(given) - set(paths)):
            errors.add(f"{where}.distributions.{unknown}", "Not one of the fields.")
        for field in fields:
            path = field["path"]
            if path not in given:
                errors.add(f"{where}.distributions", f"No distribution for field {path!r}.")
                continue
            if field["kind"] not in KINDS:
                continue
            edges = _distribution(
                given[path], field["kind"], field["edges"], f"{where}.distributions.{path}", errors
            )
            if edges is not None:
                field["edges"] = edges
        return {"type": "training", "distributions": given}
    errors.add(f"{where}.type", "Either 'window' (start, end) or 'training' (distributions).")
    return {}
