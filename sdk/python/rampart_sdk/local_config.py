"""The /v1/config document compiled for local decisions: one ``LocalRoute`` per experiment."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from rampart_sdk.assignment import AssignmentSpec, Namespace, assign
from rampart_sdk.errors import RampartError
from rampart_sdk.exposures import FIELDS, ExposureQueue
from rampart_sdk.records import Decision, fast_decision

logger = logging.getLogger("rampart_sdk")

CONFIG_FORMAT: Final = 1
REASON_INVALID_CONFIG: Final = "invalid_config"


class LocalRoute:
    """One experiment of the config document, ready for decisions; immutable."""

    __slots__ = ("_fixed", "_spec", "_upstreams", "control", "is_running", "key")

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.key: str = entry["key"]
        self.control: str = entry["control"]
        self._upstreams: dict[str, str] = {
            item["key"]: item["upstream"] for item in (*entry["variants"], *entry["shadows"])
        }
        self._spec: AssignmentSpec | None = None
        fixed = entry["fixed"]
        self._fixed: Decision | None = None
        if fixed is not None:
            self._fixed = self._decision_template(fixed["variant"], fixed["reason"])
        else:
            try:
                self._spec = _spec_from_entry(entry)
            except (ValueError, KeyError, TypeError) as exc:
                # The edge serves control for a configuration it cannot build; do the same.
                logger.error("rampart: experiment %s: cannot evaluate locally: %s", self.key, exc)
                self._fixed = self._decision_template(self.control, REASON_INVALID_CONFIG)
        self.is_running = self._fixed is None

    def _decision_template(self, variant: str, reason: str) -> Decision:
        return Decision(self.key, "", variant, False, reason, self._upstreams.get(variant, ""))

    def decide(self, unit: str) -> Decision:
        """The edge's decision for ``unit`` (a valid unit id); pure, no I/O."""
        fixed = self._fixed
        if fixed is not None:
            return fast_decision(self.key, unit, fixed.variant, False, fixed.reason, fixed.upstream)
        outcome = assign(self._spec, unit)  # type: ignore[arg-type]
        variant = outcome.variant_key
        if variant is None:
            variant = self.control
        return fast_decision(
            self.key, unit, variant, outcome.in_experiment, outcome.reason, self._upstreams[variant]
        )

    def decider(self, exposures: ExposureQueue | None) -> Callable[[str], Decision]:
        """``decide``, or with ``exposures`` a copy of it that also queues the exposure of a
        unit in the experiment unless it was sent already.

        The copy is a closure, not a call around ``decide``: it runs for every local
        decision, and closure cells are cheaper to read than attributes. A unit already sent
        costs one dict lookup more than ``decide``; a new one the append of its exposure.
        """
        spec = self._spec
        if exposures is None or spec is None:
            return self.decide  # a fixed variant: never in the experiment, nothing to send
        key = self.key
        control = self.control
        upstreams = self._upstreams
        sent_variant = exposures.seen_units(key).recent.get
        pending = exposures.pending
        queue = pending.extend
        queue_limit = exposures.max_buffered * FIELDS
        wake_at = (exposures.batch_size - 1) * FIELDS
        drop = exposures.drop
        wake = exposures.wake
        now = time.time

        def decide_and_track(unit: str) -> Decision:
            outcome = assign(spec, unit)
            variant = outcome.variant_key
            if variant is None:
                variant = control
            # "is not": a config's variant keys are the very strings ``take`` remembers,
            # so identity suffices; after a config change a remembered unit is queued once
            # more, and ``take`` drops it as a repeat.
            elif outcome.in_experiment and sent_variant(unit) is not variant:
                size = len(pending)
                if size < queue_limit:
                    # One extend, atomic under the GIL: racing deciders keep the four
                    # fields of each exposure together.
                    queue((key, unit, variant, now()))
                    if size == wake_at:
                        wake()
                else:
                    drop(1, "the exposure queue is full")
            return fast_decision(
                key, unit, variant, outcome.in_experiment, outcome.reason, upstreams[variant]
            )

        return decide_and_track


def _spec_from_entry(entry: Mapping[str, Any]) -> AssignmentSpec:
    variants = entry["variants"]
    namespace = entry["namespace"]
    return AssignmentSpec(
        experiment_key=entry["key"],
        seed=entry["seed"],
        hash_version=int(entry["hash_version"]),
        variant_keys=tuple(item["key"] for item in variants),
        weights=tuple(float(item["weight"]) for item in variants),
        coverage=float(entry["coverage"]),
        namespace=(
            None
            if namespace is None
            else Namespace(namespace["id"], float(namespace["start"]), float(namespace["end"]))
        ),
        overrides=dict(entry["overrides"]),
        ranges=tuple(
            tuple((float(start), float(end)) for start, end in item["ranges"]) for item in variants
        ),
    )


class LocalConfig:
    """A /v1/config document compiled for decisions; immutable.

    With ``exposures``, decisions queue the exposures of units in an experiment there.
    """

    __slots__ = ("deciders", "routes", "version")

    def __init__(self, document: Mapping[str, Any], exposures: ExposureQueue | None = None) -> None:
        if document.get("format") != CONFIG_FORMAT:
            raise RampartError(
                f"unsupported /v1/config format {document.get('format')!r} "
                f"(this SDK reads format {CONFIG_FORMAT})"
            )
        self.version: int = int(document["version"])
        self.routes: dict[str, LocalRoute] = {
            entry["key"]: LocalRoute(entry) for entry in document["experiments"]
        }
        # Bound methods, looked up once: decide() is the hot path of local evaluation.
        self.deciders: dict[str, Callable[[str], Decision]] = {
            key: route.decider(exposures) for key, route in self.routes.items()
        }
