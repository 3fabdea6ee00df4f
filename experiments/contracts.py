"""Frozen, framework-free views of experiments that other apps receive instead of models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

# Model-quality metrics (source of a "mean" metric): per-prediction scores against the label
# sent later (POST /v1/labels), averaged per unit. Accuracy is higher-is-better, the losses
# lower-is-better (analysis.stats.quality).
QUALITY_SOURCES: Final = {
    "quality:accuracy": "higher",
    "quality:absolute_error": "lower",
    "quality:squared_error": "lower",
    "quality:log_loss": "lower",
    "quality:brier": "lower",
}

# Generative models' answers, measured by the proxy (routing.observe.llm_stats): time to first token
# (mean or quantile), output tokens per request, output tokens per second (the mean of each
# request's rate) and cost per request (mean).
BUILTIN_TTFT = "ttft_ms"
BUILTIN_OUTPUT_TOKENS = "output_tokens"
BUILTIN_TOKENS_PER_S = "output_tokens_per_s"
BUILTIN_COST = "cost"
LLM_SOURCES = (BUILTIN_TTFT, BUILTIN_OUTPUT_TOKENS, BUILTIN_TOKENS_PER_S, BUILTIN_COST)


@dataclass(frozen=True, slots=True)
class VariantView:
    key: str
    name: str
    is_control: bool
    is_shadow: bool
    upstream_url: str
    weight: float
    # Prices per million input / output tokens of a generative model (both or neither).
    price_input_per_m: float | None = None
    price_output_per_m: float | None = None

    @property
    def prices(self) -> tuple[float, float] | None:
        """(input, output) prices per million tokens, or None when the variant has none."""
        if self.price_input_per_m is None or self.price_output_per_m is None:
            return None
        return (self.price_input_per_m, self.price_output_per_m)


@dataclass(frozen=True, slots=True)
class MetricView:
    key: str
    name: str
    kind: str
    source: str
    quantile: float | None
    numerator_event: str
    denominator_event: str
    direction: str
    winsorize_cap: float | None
    # Exposure window of a per-unit metric in seconds (experiments.models.DEFAULT_WINDOW_S);
    # for a quality metric, how long a prediction waits for its label.
    window_s: int = 600
    # Quality metrics: the label a prediction whose window passed without one counts with
    # (JSON text, e.g. '"legitimate"' or '0'); "" = such predictions do not count.
    missing_label: str = ""

    @property
    def is_quality(self) -> bool:
        return self.source in QUALITY_SOURCES

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"


@dataclass(frozen=True, slots=True)
class ExperimentMetricView:
    metric: MetricView
    role: str
    margin: float


@dataclass(frozen=True, slots=True)
class RampStepView:
    position: int
    canary_share: float
    min_duration_s: int
    min_exposures_per_arm: int


@dataclass(frozen=True, slots=True)
class QualityView:
    """Model-quality tracking of an experiment: where the proxy reads predictions."""

    prediction_path: str
    prediction_kind: str
    # The caller's own request id comes from this header ("" = the proxy makes one).
    request_id_header: str
    sample_rate: float
    # Prediction drift between arms: the tolerated total variation (None = off) and the
    # response to a breach (rollback, hold or warn).
    drift_tolerance: float | None = None
    drift_action: str = "hold"


@dataclass(frozen=True, slots=True)
class InputFieldView:
    """One request field watched for input drift (experiments.services.input_drift)."""

    path: str
    kind: str  # "number" or "category"
    threshold: float  # the PSI that counts as drift
    edges: tuple[float, ...] | None  # numbers: the bins' edges; None: the proxy's log grid


@dataclass(frozen=True, slots=True)
class InputDriftView:
    """Input drift over time: the fields, the sampling, the reference and the response."""

    fields: tuple[InputFieldView, ...]
    sample_rate: float
    action: str
    # {"type": "window", "start", "end"} or {"type": "training", "distributions"}; None: the
    # experiment's first INPUT_DRIFT_REFERENCE_S seconds.
    reference: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ExperimentView:
    id: int
    key: str
    name: str
    kind: str
    status: str
    seed: str
    hash_version: int
    unit_source: str
    unit_attribute: str
    coverage: float
    namespace: tuple[str, float, float] | None
    overrides: Mapping[str, str]
    variants: tuple[VariantView, ...]
    metrics: tuple[ExperimentMetricView, ...]
    ramp_steps: tuple[RampStepView, ...]
    ramp_position: int | None
    step_started_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    winner_key: str | None
    alpha: float
    decision_sample_size: int
    on_health_failure: str
    fallback_to_control: bool
    shadow_compare_field: str
    cache_ttl_s: int
    cache_max_entries: int
    has_slack_webhook: bool = False
    # None when quality tracking is off.
    quality: QualityView | None = None
    # None when input drift is off.
    input_drift: InputDriftView | None = None

    @property
    def control(self) -> VariantView:
        return next(v for v in self.variants if v.is_control)

    @property
    def routed_variants(self) -> tuple[VariantView, ...]:
        """Variants that receive real traffic (shadows only get mirrored copies)."""
        return tuple(v for v in self.variants if not v.is_shadow)

    @property
    def current_step(self) -> RampStepView | None:
        if self.kind != "canary" or self.ramp_position is None or not self.ramp_steps:
            return None
        return self.ramp_steps[self.ramp_position]

    @property
    def canary_share(self) -> float | None:
        """Share of traffic the canary arms get now; None for A/B tests (weights apply)."""
        step = self.current_step
        return None if step is None else step.canary_share


@dataclass(frozen=True, slots=True)
class ApiKeyView:
    prefix: str
    key_hash: str
    scopes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class StepPeriod:
    """A stretch of time with one traffic split: a ramp step, a pause, or the time after the end.

    Periods tile time from the start: `[start, end)`, `end` None for the one in force.
    `state` is running, paused (everyone gets control) or ended (after a rollback or
    completion). `step_position` is the canary's ramp position (None for A/B tests and after
    the end); `shares` is the planned share of each routed variant in the period. A unit
    belongs to the period of its first exposure (`experiments.periods.step_periods`).
    """

    index: int
    start: datetime
    end: datetime | None
    state: str
    step_position: int | None
    shares: Mapping[str, float]

    @property
    def compares_arms(self) -> bool:
        """Whether more than one variant gets traffic (else its units contribute nothing)."""
        return sum(1 for share in self.shares.values() if share > 0) > 1
