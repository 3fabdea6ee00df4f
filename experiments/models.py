"""Database models of experiments, their variants, metrics, ramp, API keys and audit log.

Models hold data and database constraints only. Every state change goes through
`experiments.services`, which validates, locks, audits and bumps the config version.
"""

from django.db import models
from django.db.models import Q

from experiments.contracts import (
    BUILTIN_COST,
    BUILTIN_OUTPUT_TOKENS,
    BUILTIN_TOKENS_PER_S,
    BUILTIN_TTFT,
    LLM_SOURCES,
)

__all__ = [
    "BUILTIN_COST",
    "BUILTIN_OUTPUT_TOKENS",
    "BUILTIN_TOKENS_PER_S",
    "BUILTIN_TTFT",
    "LLM_SOURCES",
]


class ExperimentKind(models.TextChoices):
    AB = "ab", "A/B test"
    CANARY = "canary", "Canary release"


class ExperimentStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    COMPLETED = "completed", "Completed"
    ROLLED_BACK = "rolled_back", "Rolled back"


class UnitSource(models.TextChoices):
    HEADER = "header", "HTTP header"
    COOKIE = "cookie", "Cookie"
    JSON_FIELD = "json_field", "Top-level JSON body field"
    QUERY = "query", "Query parameter"


class HealthResponse(models.TextChoices):
    HOLD = "hold", "Hold the ramp and alert"
    ROLLBACK = "rollback", "Roll back"
    WARN = "warn", "Alert only"


class PredictionKind(models.TextChoices):
    CLASS = "class", "Class label"
    SCORES = "scores", "Score or probability vector"
    NUMBER = "number", "Number"


class Experiment(models.Model):
    key = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    hypothesis = models.TextField(blank=True, default="")
    kind = models.CharField(max_length=16, choices=ExperimentKind.choices)
    status = models.CharField(
        max_length=16, choices=ExperimentStatus.choices, default=ExperimentStatus.DRAFT
    )
    seed = models.CharField(max_length=128)
    hash_version = models.PositiveSmallIntegerField(default=2)
    unit_source = models.CharField(
        max_length=16, choices=UnitSource.choices, default=UnitSource.HEADER
    )
    unit_attribute = models.CharField(max_length=128, default="X-Rampart-Unit")
    coverage = models.FloatField(default=1.0)
    namespace_id = models.CharField(max_length=64, blank=True, default="")
    namespace_start = models.FloatField(null=True, blank=True)
    namespace_end = models.FloatField(null=True, blank=True)
    overrides = models.JSONField(default=dict, blank=True)
    alpha = models.FloatField(default=0.05)
    decision_sample_size = models.PositiveIntegerField(default=10_000)
    on_health_failure = models.CharField(
        max_length=16, choices=HealthResponse.choices, default=HealthResponse.HOLD
    )
    fallback_to_control = models.BooleanField(default=True)
    shadow_compare_field = models.CharField(max_length=128, blank=True, default="")
    cache_ttl_s = models.PositiveIntegerField(default=0)
    cache_max_entries = models.PositiveIntegerField(default=10_000)
    slack_webhook_url = models.URLField(max_length=500, blank=True, default="")
    # Model quality (experiments.quality): the proxy reads predictions from sampled answers.
    quality_enabled = models.BooleanField(default=False)
    quality_prediction_path = models.CharField(max_length=200, blank=True, default="")
    quality_prediction_kind = models.CharField(
        max_length=16, choices=PredictionKind.choices, default=PredictionKind.CLASS
    )
    quality_request_id_header = models.CharField(max_length=128, blank=True, default="")
    quality_sample_rate = models.FloatField(default=1.0)
    # Prediction drift between arms (analysis.prediction_drift), on the sampled predictions.
    prediction_drift_enabled = models.BooleanField(default=False)
    prediction_drift_tolerance = models.FloatField(default=0.02)
    prediction_drift_action = models.CharField(
        max_length=16, choices=HealthResponse.choices, default=HealthResponse.HOLD
    )
    # Input drift over time (experiments.services.input_drift): {} = off.
    input_drift = models.JSONField(default=dict, blank=True)
    ramp_position = models.IntegerField(null=True, blank=True)
    step_started_at = models.DateTimeField(null=True, blank=True)
    winner = models.ForeignKey(
        "Variant", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    end_reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(coverage__gte=0) & Q(coverage__lte=1), name="experiment_coverage_0_1"
            ),
            models.CheckConstraint(
                condition=Q(alpha__gt=0) & Q(alpha__lt=0.5), name="experiment_alpha_range"
            ),
            models.CheckConstraint(
                condition=Q(hash_version__in=[1, 2]), name="experiment_hash_version"
            ),
            models.CheckConstraint(
                condition=Q(quality_sample_rate__gte=0) & Q(quality_sample_rate__lte=1),
                name="experiment_quality_sample_rate_0_1",
            ),
        ]

    def __str__(self) -> str:
        return self.key


class Variant(models.Model):
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="variants")
    key = models.SlugField(max_length=64)
    name = models.CharField(max_length=200, blank=True, default="")
    is_control = models.BooleanField(default=False)
    is_shadow = models.BooleanField(default=False)
    upstream_url = models.URLField(max_length=500)
    weight = models.FloatField()
    position = models.PositiveSmallIntegerField()
    # Prices per million input / output tokens of a generative model (both or neither): the
    # proxy derives each answer's cost from them (routing.proxy.streaming).
    price_input_per_m = models.FloatField(null=True, blank=True)
    price_output_per_m = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["experiment_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "key"], name="variant_key_unique"),
            models.UniqueConstraint(
                fields=["experiment"], condition=Q(is_control=True), name="one_control_variant"
            ),
            models.CheckConstraint(
                condition=Q(weight__gte=0) & Q(weight__lte=1), name="variant_weight_0_1"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.key}"


class MetricKind(models.TextChoices):
    BINOMIAL = "binomial", "Binomial (conversion, error rate)"
    MEAN = "mean", "Mean (revenue, latency)"
    RATIO = "ratio", "Ratio of two event sums"
    QUANTILE = "quantile", "Quantile (p50/p95/p99)"


class MetricDirection(models.TextChoices):
    HIGHER = "higher", "Higher is better"
    LOWER = "lower", "Lower is better"


BUILTIN_LATENCY = "latency_ms"
BUILTIN_ERROR = "error"
BUILTIN_SOURCES = (BUILTIN_LATENCY, BUILTIN_ERROR, *LLM_SOURCES)
# Exposure window of per-unit metrics (STATS.md 12.3): a unit's events count only within
# [first exposure, first exposure + window_s), and the unit waits until its window closes.
# 10 minutes fits a canary whose steps last about 10 minutes.
DEFAULT_WINDOW_S = 600
MAX_WINDOW_S = 30 * 24 * 3600


class Metric(models.Model):
    key = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    kind = models.CharField(max_length=16, choices=MetricKind.choices)
    source = models.CharField(max_length=128, blank=True, default="")
    quantile = models.FloatField(null=True, blank=True)
    numerator_event = models.CharField(max_length=128, blank=True, default="")
    denominator_event = models.CharField(max_length=128, blank=True, default="")
    direction = models.CharField(max_length=8, choices=MetricDirection.choices)
    winsorize_cap = models.FloatField(null=True, blank=True)
    window_s = models.PositiveIntegerField(default=DEFAULT_WINDOW_S)
    # Quality metrics (experiments.contracts.QUALITY_SOURCES): the label of a prediction
    # whose window passed without one, as JSON text; "" = it does not count.
    missing_label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["key"]
        constraints = [
            models.CheckConstraint(
                condition=Q(window_s__gte=1) & Q(window_s__lte=MAX_WINDOW_S),
                name="metric_window_range",
            )
        ]

    def __str__(self) -> str:
        return self.key


class MetricRole(models.TextChoices):
    PRIMARY = "primary", "Primary"
    SECONDARY = "secondary", "Secondary"
    GUARDRAIL = "guardrail", "Guardrail"


class ExperimentMetric(models.Model):
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="metrics")
    metric = models.ForeignKey(Metric, on_delete=models.PROTECT, related_name="uses")
    role = models.CharField(max_length=16, choices=MetricRole.choices)
    # Tolerated relative harm for a guardrail: 0.10 means "may get at most 10% worse".
    margin = models.FloatField(default=0.0)
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["experiment_id", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "metric"], name="experiment_metric_unique"
            ),
            models.CheckConstraint(condition=Q(margin__gte=0), name="metric_margin_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.metric_id} as {self.role}"


class RampStep(models.Model):
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="ramp_steps")
    position = models.PositiveSmallIntegerField()
    canary_share = models.FloatField()
    min_duration_s = models.PositiveIntegerField(default=0)
    min_exposures_per_arm = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["experiment_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "position"], name="ramp_position_unique"),
            models.CheckConstraint(
                condition=Q(canary_share__gt=0) & Q(canary_share__lte=1), name="ramp_share_0_1"
            ),
        ]

    def __str__(self) -> str:
        return f"step {self.position}: {self.canary_share:.0%}"


class AuditEntry(models.Model):
    experiment = models.ForeignKey(
        Experiment, null=True, blank=True, on_delete=models.CASCADE, related_name="audit"
    )
    actor = models.CharField(max_length=200)
    # The actor's role when they acted (experiments.roles): viewer, experimenter, admin,
    # or system for the analysis worker and management commands; empty on older entries.
    actor_role = models.CharField(max_length=16, blank=True, default="")
    action = models.CharField(max_length=64)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action}"


class ApiScope(models.TextChoices):
    DECIDE = "decide", "Decide (edge decisions and proxy)"
    INGEST = "ingest", "Ingest (events)"
    READ = "read", "Read the management API"
    MANAGE = "manage", "Manage experiments, metrics and keys"
    SDK = "sdk", "SDK client key (GrowthBook feature payload, exposures; safe in front ends)"


class ApiKey(models.Model):
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"


class ConfigVersion(models.Model):
    """One row whose counter rises with every change the edges must see."""

    version = models.BigIntegerField(default=0)
    changed_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"config version {self.version}"
