"""Rampart's experiments as a GrowthBook SDK payload: one feature per experiment.

``GET /api/features/{client_key}`` (``routing.edge.features_api``) serves this document, which
GrowthBook's official SDKs fetch and evaluate locally (JavaScript ``@growthbook/growthbook``
reads ``features`` from ``{apiHost}/api/features/{clientKey}``, and so does the Python
``growthbook`` package; both evaluate a feature's rules in order, falling back to its
``defaultValue``). The aim: for every unit, an SDK's feature value equals the ``variant``
that ``/v1/decide`` answers, and the SDK's tracking callback fires exactly for the units the
edge counts (``in_experiment``).

Each experiment, whatever its status, becomes the feature named by its key, whose values are
variant keys::

    "ranker-v2": {
      "defaultValue": "v1",                 # control; the winner once completed
      "rules": [
        {"id": "ranker-v2/override/v2",     # forced overrides (QA allowlists) first
         "condition": {"id": {"$in": ["qa-anna"]}}, "force": "v2"},
        {"id": "ranker-v2/experiment",      # the experiment rule
         "key": "ranker-v2", "seed": "ranker-v2", "hashAttribute": "id", "hashVersion": 2,
         "variations": ["v1", "v2"], "weights": [0.95, 0.05], "coverage": 1.0,
         "ranges": [[0.0, 0.95], [0.95, 1.0]],
         "namespace": ["search", 0.0, 0.5],  # only when the experiment has one
         "meta": [{"key": "v1", "name": "Control"}, {"key": "v2", "name": "Ranker v2"}],
         "disableStickyBucketing": true, "name": "Ranker v2"}
      ]
    }

Why each part:
  * The unit id is the attribute ``id`` (``hashAttribute``), as a string.
  * ``ranges`` are Rampart's own bucket intervals (``AssignmentSpec.ranges``, coverage
    folded in), so the SDK needs no weight arithmetic of its own; ``weights`` and
    ``coverage`` are there for people reading the payload (GrowthBook ignores both when
    ``ranges`` is given). A unit outside every range (coverage) or outside the namespace is
    not in the experiment; GrowthBook then moves on to the default value, control, as the
    edge does (reasons ``not_in_coverage``, ``not_in_namespace``).
  * Overrides are ``force`` rules, which GrowthBook applies without tracking, as the edge
    serves an override with ``in_experiment`` false.
  * ``disableStickyBucketing``: with a sticky-bucket service, GrowthBook would keep a unit on
    its first variation, so a ramp step could not move control units to the canary and
    SDKs would disagree with the edge. Rampart's assignment is sticky by hashing alone.
  * Draft, paused, rolled-back and completed experiments (and one whose configuration cannot
    be built) have no rules: every unit gets ``defaultValue``, the variant ``/v1/decide``
    answers (control, or the winner), untracked.

What GrowthBook cannot express: a canary ramp with three or more canaries gives control
several bucket intervals (``rampart_sdk.canary.canary_ranges``), and a GrowthBook experiment
gives each variation one. The closest correct form, served here, is one experiment rule per
interval of control, all with the experiment's key, seed and namespace: rule i gives each
variation its i-th interval (an empty ``[0, 0]`` when it has fewer). A unit's bucket falls
in exactly one rule's ranges; the rules before it leave the unit out and fall through, so
values and tracking are exactly the edge's. The payload says so in ``rampart.notes`` and in
the rules' names; SDK tooling that shows one experiment rule per experiment shows several.

Nothing here is secret: no upstream URLs, no keys; the payload is meant for front ends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from routing.route import ExperimentRoute
from routing.snapshot import RoutingSnapshot

PAYLOAD_FORMAT: Final = 1
# The attribute that holds the unit id in the SDK's attributes.
HASH_ATTRIBUTE: Final = "id"
EMPTY_RANGE: Final = (0.0, 0.0)


def features_payload(snapshot: RoutingSnapshot) -> dict[str, Any]:
    """The GrowthBook SDK payload of every experiment in ``snapshot`` (see module docstring)."""
    features: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for route in sorted(snapshot.routes(), key=lambda r: r.key):
        feature, note = experiment_feature(route)
        features[route.key] = feature
        if note:
            notes[route.key] = note
    return {
        "features": features,
        "experiments": [],
        "dateUpdated": datetime.fromtimestamp(snapshot.built_at, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "rampart": {
            "format": PAYLOAD_FORMAT,
            "version": snapshot.version,
            "hashAttribute": HASH_ATTRIBUTE,
            "notes": notes,
        },
    }


def experiment_feature(route: ExperimentRoute) -> tuple[dict[str, Any], str]:
    """One experiment as a GrowthBook feature, and a note when GrowthBook needs a workaround."""
    fixed = route.fixed_variant
    spec = route.spec
    if fixed is not None or spec is None:
        served = fixed.key if fixed is not None else route.control.key
        return {"defaultValue": served, "rules": []}, ""
    view = route.view
    rules: list[dict[str, Any]] = []
    forced: dict[str, list[str]] = {}
    for unit, variant in sorted(spec.overrides.items()):
        forced.setdefault(variant, []).append(unit)
    for variant in spec.variant_keys:
        if variant in forced:
            rules.append(
                {
                    "id": f"{route.key}/override/{variant}",
                    "condition": {HASH_ATTRIBUTE: {"$in": forced[variant]}},
                    "force": variant,
                }
            )
    names = {v.key: v.name or v.key for v in route.routed}
    parts = max(len(intervals) for intervals in spec.ranges)
    for part in range(parts):
        rule: dict[str, Any] = {
            "id": f"{route.key}/experiment" + (f"/{part + 1}" if parts > 1 else ""),
            "key": route.key,
            "seed": spec.seed,
            "hashAttribute": HASH_ATTRIBUTE,
            "hashVersion": spec.hash_version,
            "variations": list(spec.variant_keys),
            "weights": list(spec.weights),
            "coverage": spec.coverage,
            "ranges": [
                list(intervals[part]) if part < len(intervals) else list(EMPTY_RANGE)
                for intervals in spec.ranges
            ],
            "meta": [{"key": key, "name": names.get(key, key)} for key in spec.variant_keys],
            "disableStickyBucketing": True,
            "name": view.name + (f" (part {part + 1} of {parts})" if parts > 1 else ""),
        }
        if spec.namespace is not None:
            namespace = spec.namespace
            rule["namespace"] = [namespace.namespace_id, namespace.start, namespace.end]
        rules.append(rule)
    note = ""
    if parts > 1:
        note = (
            f"control holds {parts} bucket intervals ({len(spec.variant_keys) - 1} canaries in "
            f"lanes), which one GrowthBook experiment cannot express; served as {parts} "
            "experiment rules with the same key and seed, one per interval of control, which "
            "assign and track exactly as /v1/decide"
        )
    return {"defaultValue": route.control.key, "rules": rules}, note
