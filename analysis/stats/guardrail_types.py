"""Frozen inputs and outputs of the guardrail decision (`analysis.stats.guardrails`).

Specs and settings describe an experiment's fixed design; `ExperimentSnapshot` holds one
look's cumulative statistics; `GuardrailDecision` and `GuardrailEvidence` are what the worker
persists and shows. The guarantee these carry is documented in `analysis.stats.guardrails`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from analysis.stats.health import SequentialSrmResult, SrmResult

GuardrailKind = Literal["proportion", "mean", "ratio", "quantile"]
Direction = Literal["lower_is_better", "higher_is_better"]


@dataclass(frozen=True, slots=True)
class GuardrailSpec:
    """One guardrail: which metric, how it is measured, which way is bad, and the margin.

    `margin` is relative: 0.10 on a lower-is-better metric means "may rise at most 10%", on a
    higher-is-better one "may fall at most 10%". `weight` is its share of the alpha budget.
    `quantile` (e.g. 0.95) is required for quantile guardrails and forbidden otherwise.
    """

    metric_key: str
    kind: GuardrailKind
    direction: Direction
    margin: float = 0.0
    weight: float = 1.0
    quantile: float | None = None

    def __post_init__(self) -> None:
        if not self.metric_key:
            raise ValueError("metric_key must not be empty")
        if self.kind not in ("proportion", "mean", "ratio", "quantile"):
            raise ValueError(f"kind must be proportion, mean, ratio or quantile: {self.kind!r}")
        if self.direction not in ("lower_is_better", "higher_is_better"):
            raise ValueError(
                f"direction must be lower_is_better or higher_is_better: {self.direction!r}"
            )
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin}")
        if self.direction == "higher_is_better" and self.margin >= 1:
            raise ValueError("margin must be < 1 for a higher-is-better metric (a fall of 100%)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.kind == "quantile":
            if self.quantile is None or not 0 < self.quantile < 1:
                raise ValueError(
                    f"quantile must lie in (0, 1) for quantile guardrails: {self.quantile}"
                )
        elif self.quantile is not None:
            raise ValueError("quantile is only allowed for quantile guardrails")

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower_is_better"


@dataclass(frozen=True, slots=True)
class GuardrailSettings:
    """The experiment's fixed design: alpha budget, tuning N*, burn-in and SRM rules.

    `n_star` is the pairwise total at which decisions are expected (see
    `analysis.stats.planning.guardrail_n_star_*`); quantile guardrails use
    `quantile_t_opt` per arm (default n_star / 2).
    """

    alpha: float = 0.05
    n_star: float = 10_000.0
    min_units_per_arm: int = 100
    min_events_per_arm: int = 10
    quantile_min_per_arm: int = 100
    quantile_t_opt: float | None = None
    srm_threshold: float = 0.001
    srm_min_units: int = 100
    srm_concentration: float = 1000.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {self.alpha}")
        if not (math.isfinite(self.n_star) and self.n_star > 0):
            raise ValueError(f"n_star must be positive, got {self.n_star}")
        for field in ("min_units_per_arm", "min_events_per_arm", "quantile_min_per_arm"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0")
        if self.quantile_t_opt is not None and not self.quantile_t_opt > 0:
            raise ValueError(f"quantile_t_opt must be positive, got {self.quantile_t_opt}")
        if not 0 < self.srm_threshold < 1:
            raise ValueError(f"srm_threshold must lie in (0, 1), got {self.srm_threshold}")


@dataclass(frozen=True)
class ExperimentSnapshot:
    """Cumulative statistics of one experiment at one look.

    `metrics[metric_key][arm]` holds the arm's statistic of the guardrail's kind
    (`ProportionStats`, `MeanStats`, `RatioStats`, or a `LogHistogram` for quantiles; one
    that also has per-time-window parts, `quantile_exceedance.WindowedLatencyHistogram`, gets
    the contemporaneous exceedance e-process).
    `exposures` and `expected_weights` (per arm) enable the SRM checks; pass back
    `previous_srm_max_log_e_value` from the last decision for the sequential SRM.
    """

    control: str
    treatments: tuple[str, ...]
    metrics: Mapping[str, Mapping[str, object]]
    exposures: Mapping[str, int] | None = None
    expected_weights: Mapping[str, float] | None = None
    previous_srm_max_log_e_value: float = 0.0

    def __post_init__(self) -> None:
        if not self.treatments:
            raise ValueError("treatments must name at least one arm")
        if self.control in self.treatments:
            raise ValueError("control must not be one of the treatments")
        if (self.exposures is None) != (self.expected_weights is None):
            raise ValueError("exposures and expected_weights must be given together")


class GuardrailStatus(StrEnum):
    HARM = "harm"
    SAFE = "safe"
    INCONCLUSIVE = "inconclusive"
    BURN_IN = "burn_in"
    NOT_EVALUABLE = "not_evaluable"


@dataclass(frozen=True, slots=True)
class GuardrailEvidence:
    """The evaluation of one (guardrail, treatment arm) pair at this look.

    Harm is the relative change in the bad direction (+0.12 = 12% worse). The harm bounds are
    always-valid one-sided bounds at `alpha` (so [lower, upper] is a 1 - 2 alpha confidence
    sequence); `interval` is the same range on the relative effect (treatment / control - 1).
    """

    metric_key: str
    arm: str
    kind: GuardrailKind
    direction: Direction
    status: GuardrailStatus
    margin: float
    alpha: float
    n_control: int
    n_treatment: int
    relative_effect: float = math.nan
    harm_estimate: float = math.nan
    harm_lower_bound: float = -math.inf
    harm_upper_bound: float = math.inf
    interval: tuple[float, float] = (-math.inf, math.inf)
    statistic: float = math.nan
    threshold: float = math.nan
    p_value: float = 1.0
    note: str = ""
    # How the pair was tested, in words (shown on the results page and in the API); ""
    # means the harm test of analysis.stats.harm.
    method: str = ""


class GuardrailAction(StrEnum):
    CONTINUE = "continue"
    ROLLBACK = "rollback"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class GuardrailDecision:
    """What to do now, why, and the evidence for every pair.

    `tripped` is the harm evidence with the largest excess of its lower bound over the margin
    (the rollback reason); `tripped_all` lists every pair that fired. Persist
    `srm_max_log_e_value` and pass it back on the next look.
    """

    action: GuardrailAction
    reason: str
    evaluations: tuple[GuardrailEvidence, ...]
    tripped: GuardrailEvidence | None
    tripped_all: tuple[GuardrailEvidence, ...]
    safe_to_promote: bool
    alpha: float
    srm: SrmResult | None
    srm_sequential: SequentialSrmResult | None
    srm_max_log_e_value: float
