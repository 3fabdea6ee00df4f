"""Per-metric analysis for reports and the UI: fixed-horizon and always-valid results in one.

`analyze_metric` takes two arms' sufficient statistics and the `SequentialState` returned by
the previous look (None at the first look) and returns a frozen `MetricAnalysis`: per-arm
estimates, absolute and relative effects, each with the fixed-horizon Welch CI and p-value
(reference only), the raw per-look confidence sequence and e-value (comparable with gbstats),
the running-intersection always-valid interval and the always-valid p-value from the running
maximum e-value, plus a `Verdict` ready to be put into plain words. The caller persists
`analysis.state` (a few numbers, see `SequentialState.to_dict`) and passes it back next time.

Below `MIN_REPORT_UNITS_PER_ARM` units in an arm (100 by default, `min_units_per_arm`) there is
no estimate, effect or interval at all: the verdict is NOT_ENOUGH_DATA with the reason, and
the look does not count. With 3 units per arm the relative interval would span thousands of
percent (the delta method and the confidence sequences are asymptotic), which reads like a
result and is not one. The same minimum is the burn-in of the guardrails
(`GuardrailSettings.min_units_per_arm`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from analysis.stats.effects import EffectError, EffectEstimate, estimate_effect
from analysis.stats.fixed import FixedHorizonResult, fixed_horizon_test
from analysis.stats.moments import MetricStats
from analysis.stats.sequential import (
    ConfidenceSequenceResult,
    RunningEvidence,
    asymptotic_confidence_sequence,
)

MetricDirection = Literal["higher_is_better", "lower_is_better"]
# The fewest units per arm a report shows an estimate for (see the module docstring).
MIN_REPORT_UNITS_PER_ARM = 100


@dataclass(frozen=True, slots=True)
class SequentialState:
    """What a report must remember between looks for one (experiment, metric, arm).

    `n_star` and `alpha` are part of the state because changing either between looks would
    void the anytime guarantee; `analyze_metric` refuses a state made with other values.
    """

    n_star: float
    alpha: float
    absolute: RunningEvidence = field(default_factory=RunningEvidence)
    relative: RunningEvidence = field(default_factory=RunningEvidence)
    last_total_n: int = 0

    def to_dict(self) -> dict[str, float | int | bool]:
        """Flat form for a JSON column; an unbounded side is stored as +-inf (Python json writes
        Infinity and reads it back)."""
        data: dict[str, float | int | bool] = {
            "n_star": self.n_star,
            "alpha": self.alpha,
            "last_total_n": self.last_total_n,
        }
        for scale, evidence in (("absolute", self.absolute), ("relative", self.relative)):
            data[f"{scale}_looks"] = evidence.looks
            data[f"{scale}_max_log_e_value"] = evidence.max_log_e_value
            data[f"{scale}_lower"] = evidence.lower
            data[f"{scale}_upper"] = evidence.upper
            data[f"{scale}_empty_intersection"] = evidence.empty_intersection
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, float | int | bool]) -> SequentialState:
        def evidence(scale: str) -> RunningEvidence:
            return RunningEvidence(
                looks=int(data[f"{scale}_looks"]),
                max_log_e_value=float(data[f"{scale}_max_log_e_value"]),
                lower=float(data[f"{scale}_lower"]),
                upper=float(data[f"{scale}_upper"]),
                empty_intersection=bool(data[f"{scale}_empty_intersection"]),
            )

        return cls(
            n_star=float(data["n_star"]),
            alpha=float(data["alpha"]),
            absolute=evidence("absolute"),
            relative=evidence("relative"),
            last_total_n=int(data["last_total_n"]),
        )


@dataclass(frozen=True, slots=True)
class ArmEstimate:
    """One arm's n and mean (CUPED-adjusted when CUPED applies; `unadjusted_mean` is raw).

    The means are None when the report has not enough data to show them.
    """

    arm: str
    n: int
    mean: float | None
    unadjusted_mean: float | None


@dataclass(frozen=True, slots=True)
class EffectReport:
    """One scale (absolute or relative) of the effect: fixed, per-look and always-valid results.

    `look` holds the raw values of this look (GrowthBook's instantaneous CS and p-value);
    `always_valid_lower/upper` is the running intersection and `always_valid_p` comes from the
    running maximum e-value over all looks so far.
    """

    estimate: float
    se: float
    fixed: FixedHorizonResult
    look: ConfidenceSequenceResult
    always_valid_lower: float
    always_valid_upper: float
    always_valid_p: float
    error: EffectError | None = None


class Verdict(StrEnum):
    BETTER = "better"
    WORSE = "worse"
    HIGHER = "higher"
    LOWER = "lower"
    INCONCLUSIVE = "inconclusive"
    NO_RESULT = "no_result"
    NOT_ENOUGH_DATA = "not_enough_data"


@dataclass(frozen=True, slots=True)
class PlainSummary:
    """Everything a sentence about the metric needs, already decided.

    Example rendering: "Treatment is 3.2% higher than control (always-valid 95% interval
    +1.1% to +5.3%); this is better." `verdict` is BETTER/WORSE when the metric has a
    direction, HIGHER/LOWER when it has none, INCONCLUSIVE when the always-valid p-value is
    above alpha.
    """

    verdict: Verdict
    relative_change: float
    interval_low: float
    interval_high: float
    confidence_level: float
    always_valid_p: float
    reason: str = ""

    def sentence(self) -> str:
        if self.verdict is Verdict.NOT_ENOUGH_DATA:
            return f"Not enough data: {self.reason}."
        if self.verdict is Verdict.NO_RESULT:
            return "Not enough data to compare the arms yet."
        word = "higher" if self.relative_change >= 0 else "lower"
        text = (
            f"Treatment is {abs(self.relative_change):.1%} {word} than control "
            f"(always-valid {self.confidence_level:.0%} interval {self.interval_low:+.1%} to "
            f"{self.interval_high:+.1%})"
        )
        if self.verdict is Verdict.INCONCLUSIVE:
            return text + "; the difference is not conclusive yet."
        if self.verdict in (Verdict.BETTER, Verdict.WORSE):
            return text + f"; this is {self.verdict.value}."
        return text + "."


@dataclass(frozen=True, slots=True)
class MetricAnalysis:
    """The frozen per-metric result for reports; persist `state` for the next look.

    `absolute` and `relative` are None, and `not_enough_data` says why, when an arm has fewer
    units than the report's minimum.
    """

    metric_key: str
    control: ArmEstimate
    treatment: ArmEstimate
    absolute: EffectReport | None
    relative: EffectReport | None
    summary: PlainSummary
    state: SequentialState
    cuped_theta: float | None
    not_enough_data: str | None = None


def _effect_report(
    effect: EffectEstimate, evidence: RunningEvidence, *, alpha: float, n_star: float
) -> tuple[EffectReport, RunningEvidence]:
    fixed = fixed_horizon_test(effect, alpha=alpha)
    look = asymptotic_confidence_sequence(effect, alpha=alpha, n_star=n_star)
    updated = evidence.update(look)
    report = EffectReport(
        estimate=effect.estimate,
        se=effect.se,
        fixed=fixed,
        look=look,
        always_valid_lower=updated.lower,
        always_valid_upper=updated.upper,
        always_valid_p=updated.p_value,
        error=effect.error,
    )
    return report, updated


def _verdict(
    relative: EffectReport, alpha: float, direction: MetricDirection | None
) -> PlainSummary:
    if relative.error is not None or not math.isfinite(relative.always_valid_lower):
        verdict = Verdict.NO_RESULT
    elif relative.always_valid_p > alpha:
        verdict = Verdict.INCONCLUSIVE
    else:
        up = relative.estimate > 0
        if direction is None:
            verdict = Verdict.HIGHER if up else Verdict.LOWER
        else:
            good = up == (direction == "higher_is_better")
            verdict = Verdict.BETTER if good else Verdict.WORSE
    return PlainSummary(
        verdict=verdict,
        relative_change=relative.estimate,
        interval_low=relative.always_valid_lower,
        interval_high=relative.always_valid_upper,
        confidence_level=1 - alpha,
        always_valid_p=relative.always_valid_p,
    )


def analyze_metric(
    metric_key: str,
    control: MetricStats,
    treatment: MetricStats,
    *,
    previous: SequentialState | None = None,
    alpha: float = 0.05,
    n_star: float = 5000.0,
    direction: MetricDirection | None = None,
    control_arm: str = "control",
    treatment_arm: str = "treatment",
    min_units_per_arm: int = MIN_REPORT_UNITS_PER_ARM,
) -> MetricAnalysis:
    """Analyse one metric for one treatment arm against control at this look.

    Two-sided throughout (GrowthBook's sequential CS, STATS.md 2.1, relative lift by delta
    method, CUPED when the statistics carry a pre-period). Looks must come in order of
    non-decreasing sample size; a look with fewer units than the last is refused. With fewer
    than `min_units_per_arm` units in an arm the result is NOT_ENOUGH_DATA (no estimate).
    """
    state = previous if previous is not None else SequentialState(n_star=n_star, alpha=alpha)
    if state.n_star != n_star or state.alpha != alpha:
        raise ValueError(
            "n_star and alpha must stay fixed for the life of an experiment: the state was made "
            f"with n_star={state.n_star}, alpha={state.alpha}"
        )
    if min_units_per_arm < 2:
        raise ValueError(f"min_units_per_arm must be >= 2, got {min_units_per_arm}")
    arms_n = ((control_arm, control.n), (treatment_arm, treatment.n))
    short = [(arm, n) for arm, n in arms_n if n < min_units_per_arm]
    if short:
        if control.n + treatment.n < state.last_total_n:
            raise ValueError(
                f"this look has {control.n + treatment.n} units but the previous one had "
                f"{state.last_total_n}: cumulative statistics never shrink"
            )
        reason = " and ".join(f"{arm} has {n:,}" for arm, n in short) + (
            f" of the {min_units_per_arm:,} units per arm a report needs"
        )
        return MetricAnalysis(
            metric_key=metric_key,
            control=ArmEstimate(control_arm, control.n, None, None),
            treatment=ArmEstimate(treatment_arm, treatment.n, None, None),
            absolute=None,
            relative=None,
            summary=PlainSummary(
                verdict=Verdict.NOT_ENOUGH_DATA,
                relative_change=math.nan,
                interval_low=-math.inf,
                interval_high=math.inf,
                confidence_level=1 - alpha,
                always_valid_p=1.0,
                reason=reason,
            ),
            state=state,
            cuped_theta=None,
            not_enough_data=reason,
        )
    absolute_effect = estimate_effect(control, treatment, relative=False)
    relative_effect = estimate_effect(control, treatment, relative=True)
    total = absolute_effect.total_n
    if total < state.last_total_n:
        raise ValueError(
            f"this look has {total} units but the previous one had {state.last_total_n}: "
            "cumulative statistics never shrink"
        )
    absolute, absolute_evidence = _effect_report(
        absolute_effect, state.absolute, alpha=alpha, n_star=n_star
    )
    relative, relative_evidence = _effect_report(
        relative_effect, state.relative, alpha=alpha, n_star=n_star
    )
    arms = absolute_effect.control, absolute_effect.treatment
    return MetricAnalysis(
        metric_key=metric_key,
        control=ArmEstimate(control_arm, arms[0].n, arms[0].mean, arms[0].unadjusted_mean),
        treatment=ArmEstimate(treatment_arm, arms[1].n, arms[1].mean, arms[1].unadjusted_mean),
        absolute=absolute,
        relative=relative,
        summary=_verdict(relative, alpha, direction),
        state=SequentialState(
            n_star=n_star,
            alpha=alpha,
            absolute=absolute_evidence,
            relative=relative_evidence,
            last_total_n=total,
        ),
        cuped_theta=absolute_effect.cuped_theta,
    )
