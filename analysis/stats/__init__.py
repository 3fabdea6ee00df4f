"""Pure statistics engine over sufficient statistics (no framework imports).

Entry points: `analyze_metric` (reports), `evaluate_guardrails` (automatic rollback),
`srm_check` (`srm_chi_square` reported, `srm_sequential` decides) / `multiple_exposure_check`
(health), `adjust_p_values` (secondary metrics). Quantile guardrails live in
`analysis.stats.quantiles`.
"""

from analysis.stats.effects import EffectError, EffectEstimate, estimate_effect
from analysis.stats.fixed import FixedHorizonResult, fixed_horizon_test
from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailDecision,
    GuardrailEvidence,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.health import (
    MultipleExposureResult,
    SequentialSrmResult,
    SrmCheck,
    SrmResult,
    multiple_exposure_check,
    srm_check,
    srm_chi_square,
    srm_sequential,
)
from analysis.stats.moments import (
    CupedStats,
    MeanStats,
    MetricStats,
    ProportionStats,
    RatioStats,
    merge_all,
)
from analysis.stats.multiple import AdjustedPValues, adjust_p_values, bonferroni_alphas
from analysis.stats.report import MetricAnalysis, SequentialState, Verdict, analyze_metric
from analysis.stats.sequential import (
    ConfidenceSequenceResult,
    OneSidedBoundResult,
    RunningEvidence,
    asymptotic_confidence_sequence,
    asymptotic_one_sided_bound,
    msprt,
    normal_mixture_confidence_sequence,
)

__all__ = [
    "AdjustedPValues",
    "ConfidenceSequenceResult",
    "CupedStats",
    "EffectError",
    "EffectEstimate",
    "ExperimentSnapshot",
    "FixedHorizonResult",
    "GuardrailAction",
    "GuardrailDecision",
    "GuardrailEvidence",
    "GuardrailSettings",
    "GuardrailSpec",
    "GuardrailStatus",
    "MeanStats",
    "MetricAnalysis",
    "MetricStats",
    "MultipleExposureResult",
    "OneSidedBoundResult",
    "ProportionStats",
    "RatioStats",
    "RunningEvidence",
    "SequentialSrmResult",
    "SequentialState",
    "SrmCheck",
    "SrmResult",
    "Verdict",
    "adjust_p_values",
    "analyze_metric",
    "asymptotic_confidence_sequence",
    "asymptotic_one_sided_bound",
    "bonferroni_alphas",
    "estimate_effect",
    "evaluate_guardrails",
    "fixed_horizon_test",
    "merge_all",
    "msprt",
    "multiple_exposure_check",
    "normal_mixture_confidence_sequence",
    "srm_check",
    "srm_chi_square",
    "srm_sequential",
]
