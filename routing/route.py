"""One experiment prebuilt for decisions: which variant a unit gets, and why.

An ``ExperimentRoute`` is built once per routing snapshot (``routing.snapshot``) from the
experiment's view; the edge and the proxy ask it for every request.

Decision rules (``ExperimentRoute.decide``), in order:
  * status ``rolled_back``: control, reason ``rolled_back_to_control``;
  * status ``completed``: the winner (control if none), reason ``completed``;
  * status ``draft`` or ``paused``: control, reason ``not_running``;
  * no unit id: control, reason ``no_unit``;
  * otherwise ``rampart_sdk.assignment.assign`` on the spec precomputed at build time:
    ``override``, ``not_in_namespace``, ``not_in_coverage`` (all served control unless
    overridden) or ``assigned``.
Only ``assigned`` units of running experiments are ``in_experiment``; overrides are
allowlisted QA traffic and do not count (``rampart_sdk.assignment.Assignment``).

Specs: an A/B test uses its routed variants' weights (control first, then the others in
their configured order) and its coverage. A canary gives its current ramp step's
``canary_share`` to the non-control variants, split in proportion to their configured
weights, each in its own fixed lane (``rampart_sdk.canary.build_canary_spec``), so raising
the share only moves units from control to a canary. Lanes follow those weights: with two
or more canaries, changing their weights mid-ramp moves lane borders and can move units
between canaries. Canary specs have full coverage (coverage is an A/B setting).
Shadow variants never receive routed traffic; overrides that name one are ignored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Final

from experiments.contracts import ExperimentView, VariantView
from rampart_sdk.assignment import (
    AssignmentSpec,
    Namespace,
    assign,
    build_assignment_spec,
)
from rampart_sdk.canary import build_canary_spec
from routing.split import canary_lanes

logger = logging.getLogger(__name__)

REASON_ASSIGNED: Final = "assigned"
REASON_OVERRIDE: Final = "override"
REASON_NOT_IN_COVERAGE: Final = "not_in_coverage"
REASON_NOT_IN_NAMESPACE: Final = "not_in_namespace"
REASON_NOT_RUNNING: Final = "not_running"
REASON_ROLLED_BACK: Final = "rolled_back_to_control"
REASON_COMPLETED: Final = "completed"
REASON_NO_UNIT: Final = "no_unit"
# The stored configuration could not be turned into a spec (it should not happen: services
# validate it); the experiment serves control until it is fixed, and the error is logged.
REASON_INVALID_CONFIG: Final = "invalid_config"


@dataclass(frozen=True, slots=True)
class Decision:
    """The variant served to one unit: ``variant`` is its key, ``upstream`` its URL."""

    experiment: str
    unit: str | None
    variant: str
    in_experiment: bool
    reason: str
    upstream: str


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """Outcome of an API key check: ``status`` is 200, 401 (no valid key) or 403 (scope)."""

    ok: bool
    status: int
    error: str


KEY_OK: Final = KeyCheck(ok=True, status=200, error="")


class ExperimentRoute:
    """One experiment, prebuilt for decisions; immutable once built."""

    __slots__ = (
        "_by_key",
        "_fixed",
        "_fixed_reason",
        "_spec",
        "build_error",
        "control",
        "experiment_id",
        "key",
        "routed",
        "shadows",
        "spec",
        "view",
    )

    view: ExperimentView
    control: VariantView
    shadows: tuple[VariantView, ...]
    routed: tuple[VariantView, ...]
    spec: AssignmentSpec | None
    build_error: str

    def __init__(self, view: ExperimentView) -> None:
        self.view = view
        self.key = view.key
        self.experiment_id = view.id
        self.control = view.control
        self.shadows = tuple(v for v in view.variants if v.is_shadow)
        self.routed = (
            self.control,
            *(v for v in view.variants if not v.is_shadow and not v.is_control),
        )
        self._by_key = {v.key: v for v in view.variants}
        self.spec = None
        self.build_error = ""
        try:
            self.spec = _build_spec(view, self.routed)
        except ValueError as exc:
            self.build_error = str(exc)
            logger.error("experiment %s: cannot build its assignment spec: %s", view.key, exc)
        self._spec = self.spec
        fixed_reason = _fixed_reason(view.status)
        if fixed_reason is None and self.spec is None:
            fixed_reason = REASON_INVALID_CONFIG
        self._fixed_reason = fixed_reason
        self._fixed: VariantView | None = None
        if fixed_reason == REASON_COMPLETED and view.winner_key in self._by_key:
            self._fixed = self._by_key[view.winner_key]
        elif fixed_reason is not None:
            self._fixed = self.control

    @property
    def is_running(self) -> bool:
        return self._fixed is None

    @property
    def fixed_variant(self) -> VariantView | None:
        """The variant every unit gets when the experiment does not assign, else None."""
        return self._fixed

    @property
    def fixed_reason(self) -> str | None:
        return self._fixed_reason

    def variant(self, key: str) -> VariantView:
        """The variant with this key; KeyError if the experiment has none."""
        return self._by_key[key]

    def decide(self, unit_id: str | None) -> Decision:
        """The variant ``unit_id`` gets now; pure, no I/O."""
        fixed = self._fixed
        if fixed is not None:
            return Decision(
                self.key, unit_id, fixed.key, False, self._fixed_reason or "", fixed.upstream_url
            )
        if not unit_id:
            control = self.control
            return Decision(
                self.key, unit_id, control.key, False, REASON_NO_UNIT, control.upstream_url
            )
        outcome = assign(self._spec, unit_id)  # type: ignore[arg-type]
        served = self.control if outcome.variant_key is None else self._by_key[outcome.variant_key]
        return Decision(
            self.key,
            unit_id,
            served.key,
            outcome.in_experiment,
            outcome.reason,
            served.upstream_url,
        )

    def config_entry(self) -> dict[str, Any]:
        """This experiment in the /v1/config format (see routing.edge.app)."""
        view = self.view
        spec = self.spec
        weights = dict.fromkeys((v.key for v in self.routed), 0.0)
        ranges: dict[str, list[list[float]]] = {}
        if spec is not None:
            weights = dict(zip(spec.variant_keys, spec.weights, strict=True))
            ranges = {
                key: [[start, end] for start, end in intervals]
                for key, intervals in zip(spec.variant_keys, spec.ranges, strict=True)
            }
        namespace = None
        if view.namespace is not None:
            namespace = {
                "id": view.namespace[0],
                "start": view.namespace[1],
                "end": view.namespace[2],
            }
        fixed = self._fixed
        return {
            "id": view.id,
            "key": view.key,
            "kind": view.kind,
            "status": view.status,
            "seed": spec.seed if spec is not None else (view.seed or view.key),
            "hash_version": view.hash_version,
            "unit_source": view.unit_source,
            "unit_attribute": view.unit_attribute,
            "coverage": spec.coverage if spec is not None else view.coverage,
            "namespace": namespace,
            "control": self.control.key,
            "canary_share": view.canary_share,
            "ramp_position": view.ramp_position,
            "winner": view.winner_key,
            "variants": [
                {
                    "key": v.key,
                    "weight": weights.get(v.key, 0.0),
                    "is_control": v.is_control,
                    "upstream": v.upstream_url,
                    "ranges": ranges.get(v.key, []),
                }
                for v in self.routed
            ],
            "shadows": [{"key": v.key, "upstream": v.upstream_url} for v in self.shadows],
            "overrides": dict(spec.overrides) if spec is not None else {},
            "fixed": (
                None if fixed is None else {"variant": fixed.key, "reason": self._fixed_reason}
            ),
        }


def _fixed_reason(status: str) -> str | None:
    if status == "running":
        return None
    if status == "rolled_back":
        return REASON_ROLLED_BACK
    if status == "completed":
        return REASON_COMPLETED
    return REASON_NOT_RUNNING


def _build_spec(view: ExperimentView, routed: tuple[VariantView, ...]) -> AssignmentSpec:
    keys = [v.key for v in routed]
    routed_keys = set(keys)
    overrides = {unit: key for unit, key in view.overrides.items() if key in routed_keys}
    namespace = None if view.namespace is None else Namespace(*view.namespace)
    if view.kind == "canary":
        share = view.canary_share or 0.0
        lanes = canary_lanes(view)
        return build_canary_spec(
            experiment_key=view.key,
            variant_keys=keys,
            canary_shares=[min(share, 1.0) * lane for lane in lanes],
            lane_widths=lanes,
            seed=view.seed or None,
            hash_version=view.hash_version,
            namespace=namespace,
            overrides=overrides,
        )
    weights = [v.weight for v in routed]
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"weights: the routed variants' weights sum to {total}")
    # Services accept sums within 1e-6 of 1; the spec wants 1e-9. Dividing by an exact 1.0
    # leaves GrowthBook-identical weights unchanged.
    return build_assignment_spec(
        experiment_key=view.key,
        variant_keys=keys,
        weights=[w / total for w in weights],
        coverage=view.coverage,
        seed=view.seed or None,
        hash_version=view.hash_version,
        namespace=namespace,
        overrides=overrides,
    )
