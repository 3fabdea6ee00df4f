"""Tables of the analysis pipeline: rollups, sequential state, result snapshots and alerts.

Experiments are referenced through lazy foreign keys ("experiments.Experiment"), so this
module does not import the experiments app's models.
"""

from django.db import models
from django.db.models import Q

# The prediction-drift tables live in their own module; importing them registers them.
from analysis.drift_models import (  # noqa: F401
    DriftUnit,
    InputDriftState,
    PredictionDriftCount,
    PredictionDriftState,
)


class AnalysisState(models.Model):
    """Per-experiment bookkeeping that must survive between analysis runs.

    The cursors make aggregation incremental: rows with id <= cursor are already folded into
    the rollups, rows with cursor < id <= horizon were visible at the previous run and are
    folded in at the next one (see `analysis.aggregation` for why the fold lags one run).
    The row is also the per-experiment lock: a run holds it FOR UPDATE from start to finish.
    """

    experiment = models.OneToOneField(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+"
    )
    observation_cursor = models.BigIntegerField(default=0)
    observation_horizon = models.BigIntegerField(default=0)
    event_cursor = models.BigIntegerField(default=0)
    event_horizon = models.BigIntegerField(default=0)
    # Events with cursor < id <= settled were visible one run ago and may be folded now.
    event_settled = models.BigIntegerField(default=0)
    # Running maximum of the sequential SRM log e-value, for the ramp step it belongs to
    # (a canary's expected split changes with every step, so the evidence restarts).
    srm_max_log_e_value = models.FloatField(default=0.0)
    srm_ramp_position = models.IntegerField(null=True, blank=True)
    health_failing = models.BooleanField(default=False)
    health_episode = models.PositiveIntegerField(default=0)
    runs = models.PositiveIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"analysis state of {self.experiment_id}"


class ObservationRollup(models.Model):
    """Sum of every settled proxy observation bucket of one routed variant (is_shadow=False)."""

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    variant_key = models.CharField(max_length=64)
    count = models.BigIntegerField(default=0)
    error_count = models.BigIntegerField(default=0)
    latency_sum = models.FloatField(default=0.0)
    latency_sum_sq = models.FloatField(default=0.0)
    # routing.observe.histogram.LogHistogram JSON of every settled bucket merged; "" when empty.
    latency_histogram = models.TextField(default="", blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "variant_key"], name="observation_rollup_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.variant_key} ({self.count} requests)"


class UnitEventRollup(models.Model):
    """Per (experiment, unit, event name, window): sum and count of the unit's windowed events.

    `window_s` is a metric's exposure window (STATS.md 12.3): only events in
    [first exposure, first exposure + window_s) are summed, once per distinct window the
    experiment's metrics use for that event (`analysis.unit_metrics`).

    Updated with INSERT ... ON CONFLICT DO UPDATE from the events with ids past the cursor;
    the metrics are a GROUP BY over this table joined to the units' exposures. The foreign
    key has no database constraint: PostgreSQL checks deferred constraints row by row at
    COMMIT, which doubled the cost of a large fold; deleting an experiment still cascades
    through Django.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment",
        on_delete=models.CASCADE,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    unit_id = models.CharField(max_length=200)
    event_name = models.CharField(max_length=128)
    window_s = models.PositiveIntegerField(default=0)
    value_sum = models.FloatField(default=0.0)
    event_count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "unit_id", "event_name", "window_s"],
                name="unit_event_rollup_window_once",
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.unit_id}:{self.event_name}"


class SequentialState(models.Model):
    """Running evidence of one (experiment, metric, treatment arm) across analysis runs.

    Always-valid p-values are 1 / running max e-value (or the running minimum of the harm
    test's p-value), and always-valid intervals are the running intersection of the
    confidence sequences, so both are monotone across runs. `fired` makes a guardrail breach
    sticky: once set it is never cleared. Null bounds stand for -inf / +inf.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    metric_key = models.CharField(max_length=64)
    arm = models.CharField(max_length=64)
    looks = models.PositiveIntegerField(default=0)
    max_log_e_value = models.FloatField(default=0.0)
    min_p_value = models.FloatField(default=1.0)
    lower = models.FloatField(null=True, blank=True)
    upper = models.FloatField(null=True, blank=True)
    empty_intersection = models.BooleanField(default=False)
    fired = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "metric_key", "arm"], name="sequential_state_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.metric_key}:{self.arm}"


class Decision(models.TextChoices):
    CONTINUE = "continue", "Continue"
    ROLLBACK = "rollback", "Roll back"
    HOLD = "hold", "Hold"
    SAFE_TO_PROMOTE = "safe_to_promote", "Safe to promote"
    ADVANCE = "advance", "Advance to the next ramp step"
    COMPLETE = "complete", "Complete"


class ResultSnapshot(models.Model):
    """What one analysis run found: decision, health, exposures, metrics and latency.

    The UI renders these as a time series; keep the shapes stable:
      * decision: continue | rollback | hold | safe_to_promote | advance | complete
      * health: {"srm": {"p", "e_value", "flagged"}, "multiple_exposure": {"share", "units",
        "flagged"}, "no_traffic": bool}
      * exposures: {variant_key: units exposed to that variant only}
      * metrics: one entry per (metric, treatment arm): "metric", "name", "kind", "role",
        "direction", "arm", "control_arm", "n_control", "n_treatment", "control_estimate",
        "treatment_estimate", "abs_effect", "rel_effect", "ci_fixed" and "ci_always_valid"
        ([lo, hi] on the relative effect), "p_value", "p_always_valid", "harm_bound",
        "margin", "status" (breach | ok | insufficient | win | loss | inconclusive),
        "summary" (a plain-words sentence) and "not_enough_data" (null, or why the row's
        numbers are withheld: fewer than 100 units in an arm, `analysis.reporting`).
        Unknown or unbounded numbers are null.
      * latency: {variant_key: {"n", "mean", "p50", "p95", "p99", "error_rate"}}, plus
        "llm" for variants with generative answers (``analysis.llm_metrics.llm_summary``:
        TTFB p50, TTFT n/p50/p95/p99, streams, chunks, tokens, tokens/s and cost means)
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    created_at = models.DateTimeField(db_index=True)
    decision = models.CharField(max_length=16, choices=Decision.choices)
    reason = models.TextField(blank=True, default="")
    health = models.JSONField(default=dict)
    exposures = models.JSONField(default=dict)
    metrics = models.JSONField(default=list)
    latency = models.JSONField(default=dict)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["experiment", "-created_at"], name="snapshot_exp_time")]

    def __str__(self) -> str:
        return f"{self.experiment_id}@{self.created_at:%H:%M:%S}: {self.decision}"


class WebhookEndpoint(models.Model):
    """A generic webhook that receives every alert as HMAC-signed JSON."""

    name = models.CharField(max_length=200)
    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=200)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class AlertStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    DEAD = "dead", "Dead (gave up)"


class AlertOutbox(models.Model):
    """One alert for one destination, written in the transaction of the change it reports.

    `destination` is "slack" or "webhook:<id>"; the URL and secret are looked up at delivery
    time, so they never sit in this table. `dedupe_key` makes re-running the same decision
    harmless: the second insert is ignored.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        db_index=False,
    )
    kind = models.CharField(max_length=32)
    destination = models.CharField(max_length=64)
    payload = models.JSONField(default=dict)
    status = models.CharField(
        max_length=16, choices=AlertStatus.choices, default=AlertStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    dedupe_key = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="alert_due",
            ),
            models.Index(fields=["experiment", "id"], name="alert_exp_id"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} -> {self.destination} ({self.status})"


class RateBetState(models.Model):
    """The betting e-process of one rate guardrail, arm and outcome window (STATS.md 12.1).

    `state` is `analysis.stats.betting.RateBet.as_json()`; `cursor` (epoch seconds) is the
    first-exposure time up to which users have been bet on: users are folded once, in the
    order their windows close, and never revisited (see `analysis.rate_guardrails`).
    `margin` is the margin the bets were placed with.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    metric_key = models.CharField(max_length=64)
    arm = models.CharField(max_length=64)
    window_s = models.FloatField()
    margin = models.FloatField()
    cursor = models.FloatField(default=0.0)
    state = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "metric_key", "arm", "window_s"], name="rate_bet_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.metric_key}/{self.arm} ({self.window_s:g} s)"


class ShadowAnalysis(models.Model):
    """The paired comparison of one shadow with control, folded, and its verdict.

    ``pairs`` is the merged ``routing.observe.shadow_pairs.PairCell`` JSON of every settled
    shadow bucket (``cursor < id <= horizon``, the lag of ``analysis.aggregation``); the
    comparison counts sit beside it. ``verdict`` is the first verdict reached ("collecting"
    until then) and never changes after, so its alert goes out once; ``result`` is the latest
    look (``analysis.stats.shadow_pairs.ShadowResult.as_json``), shown on the page and in the API.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    variant_key = models.CharField(max_length=64)
    cursor = models.BigIntegerField(default=0)
    horizon = models.BigIntegerField(default=0)
    pairs = models.TextField(default="", blank=True)
    compared = models.BigIntegerField(default=0)
    disagreements = models.BigIntegerField(default=0)
    abs_diff_sum = models.FloatField(default=0.0)
    abs_diff_sum_sq = models.FloatField(default=0.0)
    verdict = models.CharField(max_length=16, default="collecting")
    reason = models.TextField(blank=True, default="")
    reached_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(default=dict)
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["experiment", "variant_key"], name="shadow_once")
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.variant_key} {self.verdict}"
