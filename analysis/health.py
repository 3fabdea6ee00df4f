"""Health of one look: sample ratio mismatch, multiple exposure and no traffic.

`check_health` compares each arm's units with the split the routing aims for (in a canary,
the units first seen in the current ramp step) using the tests in `analysis.stats.health`.
`arms` and `expected_weights` name the arms an experiment compares and their planned split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from analysis.aggregation import Aggregates
from analysis.stats.health import multiple_exposure_check, srm_check
from experiments.contracts import ExperimentView
from routing.split import planned_split


@dataclass(frozen=True)
class HealthSettings:
    """How health is judged: thresholds and the waiting times that avoid false alarms."""

    srm_threshold: float = 0.001
    srm_min_units: int = 100
    multiple_exposure_threshold: float = 0.01
    no_traffic_after_s: float = 60.0


@dataclass(frozen=True)
class Health:
    srm_p: float
    srm_e_value: float
    srm_flagged: bool
    srm_max_log_e_value: float
    multiple_share: float
    multiple_units: int
    multiple_flagged: bool
    no_traffic: bool

    @property
    def failing(self) -> bool:
        return self.srm_flagged or self.multiple_flagged or self.no_traffic

    @property
    def problems(self) -> list[str]:
        found = []
        if self.srm_flagged:
            found.append(
                f"sample ratio mismatch (e-value {self.srm_e_value:.3g}, "
                f"chi-square p = {self.srm_p:.2g})"
            )
        if self.multiple_flagged:
            found.append(f"{self.multiple_share:.1%} of units saw more than one variant")
        if self.no_traffic:
            found.append("an arm receives no traffic")
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "srm": {
                "p": self.srm_p,
                "e_value": min(self.srm_e_value, 1e300),
                "flagged": self.srm_flagged,
            },
            "multiple_exposure": {
                "share": self.multiple_share,
                "units": self.multiple_units,
                "flagged": self.multiple_flagged,
            },
            "no_traffic": self.no_traffic,
        }


# --------------------------------------------------------------------------- inputs


def arms(experiment: ExperimentView) -> tuple[str, tuple[str, ...]]:
    control = experiment.control.key
    treatments = tuple(v.key for v in experiment.routed_variants if not v.is_control)
    return control, treatments


def expected_weights(experiment: ExperimentView) -> dict[str, float]:
    """The split the routing aims for now (one definition: `routing.split.planned_split`)."""
    return planned_split(experiment)


# --------------------------------------------------------------------------- health


def check_health(
    experiment: ExperimentView,
    aggregates: Aggregates,
    *,
    previous_srm_max_log_e_value: float,
    now: datetime,
    settings: HealthSettings,
) -> Health:
    control, treatments = arms(experiment)
    weights = expected_weights(experiment)
    canary = experiment.kind == "canary"
    counts = aggregates.exposures.new_in_step if canary else aggregates.exposures.per_variant
    # Arms the routing should not send anyone to (a 100% canary step leaves control empty,
    # apart from units first seen while the edges were still switching) are left out.
    tested = [arm for arm in (control, *treatments) if weights.get(arm, 0.0) > 0]
    srm_p, srm_flagged = 1.0, False
    srm_max = previous_srm_max_log_e_value
    if len(tested) >= 2:
        observed = [int(counts.get(arm, 0)) for arm in tested]
        shares = [weights[arm] for arm in tested]
        # The anytime-valid e-value decides; the chi-square p is shown (srm_check).
        srm = srm_check(
            observed,
            shares,
            alpha=settings.srm_threshold,
            min_units=settings.srm_min_units,
            previous_max_log_e_value=previous_srm_max_log_e_value,
        )
        srm_p, srm_max = srm.chi_square.p_value, srm.sequential.max_log_e_value
        srm_flagged = srm.flagged
    exposures = aggregates.exposures
    odd = exposures.unexpected_multiple if canary else exposures.multiple
    multiple = multiple_exposure_check(
        units_exposed=exposures.total_units,
        units_multiple=odd,
        threshold=settings.multiple_exposure_threshold,
    )
    started = experiment.started_at
    no_traffic = False
    if started is not None and now - started >= timedelta(seconds=settings.no_traffic_after_s):
        for arm in (control, *treatments):
            requests = aggregates.observations.get(arm)
            if exposures.per_variant.get(arm, 0) == 0 and (requests is None or not requests.count):
                no_traffic = True
    return Health(
        srm_p=srm_p,
        srm_e_value=math.exp(min(srm_max, 700.0)),
        srm_flagged=srm_flagged,
        srm_max_log_e_value=srm_max,
        multiple_share=multiple.share,
        multiple_units=exposures.multiple,
        multiple_flagged=multiple.flagged,
        no_traffic=no_traffic,
    )
