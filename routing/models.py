"""Tables the edge writes: first exposures, pre-aggregated proxy observations, business events.

Experiments are referenced by id through a lazy foreign key, so this module does not import
the experiments app's models (apps talk through services, selectors and contracts).
"""

from django.db import models


class Exposure(models.Model):
    """The first time a unit was served a variant of an experiment.

    Unique per (experiment, unit, variant): a unit normally has one row; a second row means
    the unit saw two variants (for example after a weight change) and analysis excludes it.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    unit_id = models.CharField(max_length=200)
    variant_key = models.CharField(max_length=64)
    first_seen_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "unit_id", "variant_key"], name="exposure_once"
            )
        ]
        indexes = [models.Index(fields=["experiment", "id"], name="exposure_exp_id")]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.unit_id}->{self.variant_key}"


class ObservationBucket(models.Model):
    """Mergeable statistics of proxied requests for one variant over one time bucket.

    One process may write several rows for the same bucket (one per flush); analysis sums
    them. Rows are append-only, so `id` is a cursor for incremental aggregation.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    variant_key = models.CharField(max_length=64)
    bucket_start = models.DateTimeField()
    is_shadow = models.BooleanField(default=False)
    count = models.BigIntegerField(default=0)
    error_count = models.BigIntegerField(default=0)
    latency_sum = models.FloatField(default=0.0)
    latency_sum_sq = models.FloatField(default=0.0)
    # routing.observe.histogram.LogHistogram serialised with to_json(); see that module's docstring.
    latency_histogram = models.TextField(default="")
    cache_hits = models.BigIntegerField(default=0)
    fallback_count = models.BigIntegerField(default=0)
    # Shadow comparison against control's answer to the same request.
    compared_count = models.BigIntegerField(default=0)
    disagreement_count = models.BigIntegerField(default=0)
    abs_diff_sum = models.FloatField(default=0.0)
    abs_diff_sum_sq = models.FloatField(default=0.0)
    # Generative answers (TTFB, TTFT, chunks, tokens, cost): routing.observe.llm_stats.LLMCell
    # as JSON, empty when the bucket had none.
    llm = models.TextField(default="", blank=True)
    # Shadow rows: the shadow's and control's latencies on the same requests
    # (routing.observe.shadow_pairs.PairCell as JSON), empty when the bucket had no pair.
    pairs = models.TextField(default="", blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["experiment", "id"], name="obs_exp_id"),
            models.Index(fields=["experiment", "bucket_start"], name="obs_exp_bucket"),
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.variant_key}@{self.bucket_start:%H:%M:%S}"


class Event(models.Model):
    """A business event sent by the application (a purchase, a click, revenue)."""

    event_id = models.CharField(max_length=128, unique=True)
    unit_id = models.CharField(max_length=200)
    name = models.CharField(max_length=128)
    value = models.FloatField(default=1.0)
    timestamp = models.DateTimeField()
    received_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["unit_id", "name"], name="event_unit_name")]

    def __str__(self) -> str:
        return f"{self.name}:{self.unit_id}"


class UnitOutcome(models.Model):
    """One user's requests and failures within fixed windows after its first request.

    Written by the proxy (``routing.observe.unit_outcomes``) so rate guardrails can take the user as
    the unit (STATS.md 12.1). ``first_seen`` (epoch seconds) is when the edge process that
    served the user's first request saw it complete; ``share`` and ``control_share`` are the
    probabilities of the user's arm and of control at that moment (the ramp step then). The
    counts are the requests (and failed ones) that completed within RATE_WINDOW_FAST_S and
    RATE_WINDOW_SLOW_S of ``first_seen`` on that process, plus the slow window's latency sums.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    unit_id = models.CharField(max_length=200)
    variant_key = models.CharField(max_length=64)
    first_seen = models.FloatField()
    share = models.FloatField()
    control_share = models.FloatField()
    requests_fast = models.BigIntegerField(default=0)
    errors_fast = models.BigIntegerField(default=0)
    requests_slow = models.BigIntegerField(default=0)
    errors_slow = models.BigIntegerField(default=0)
    latency_sum = models.FloatField(default=0.0)
    latency_sum_sq = models.FloatField(default=0.0)
    latency_count = models.BigIntegerField(default=0)
    # The window's latencies per routing.observe.histogram bucket, "index:count,..." (quantile
    # guardrails with the user as the unit; routing.observe.unit_outcomes.decode_buckets).
    latency_buckets_fast = models.TextField(default="", blank=True)
    latency_buckets_slow = models.TextField(default="", blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["experiment", "unit_id"], name="unit_outcome_once")
        ]
        indexes = [models.Index(fields=["experiment", "first_seen"], name="unit_outcome_seen")]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.unit_id}@{self.first_seen:.3f}"


class ShadowPairClaim(models.Model):
    """A user whose pair with a shadow counts (one per experiment, shadow and user, across edge
    processes).

    Written by the flush of the edge process that chose the user's pair with that shadow first
    (``routing.observe.pair_claims``: ``INSERT ... ON CONFLICT DO NOTHING``); only that process
    adds the pair to ``ObservationBucket.pairs``. ``claimed_at`` (epoch seconds) is when that
    process chose the pair, before any answer.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    variant_key = models.CharField(max_length=64)
    unit_id = models.CharField(max_length=200)
    claimed_at = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "variant_key", "unit_id"], name="shadow_pair_claim_per_shadow"
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.variant_key}:{self.unit_id}"


class Prediction(models.Model):
    """A model's prediction in one sampled proxied answer, for the quality guardrails.

    Written in batches by the proxy (``routing.observe.predictions``) for experiments with quality
    tracking on. ``status`` says whether the prediction could be read: ``ok`` (``value``
    holds it as JSON text), ``not_json`` (the answer was not JSON), ``missing`` (no value at
    the configured path) or ``wrong_type`` (a value that does not fit ``kind``). Unreadable
    answers are kept, so they are counted and shown per arm. ``predicted_at`` is epoch seconds.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    request_id = models.CharField(max_length=128)
    variant_key = models.CharField(max_length=64)
    unit_id = models.CharField(max_length=200, blank=True, default="")
    predicted_at = models.FloatField()
    kind = models.CharField(max_length=16)
    status = models.CharField(max_length=16)
    value = models.TextField(blank=True, default="")

    class Meta:
        # Request id first: the same index finds a label's prediction (one index less to
        # update per row, which the proxy writes for every sampled request). Per variant: a
        # shadow's prediction of the same request sits beside the answering arm's.
        constraints = [
            models.UniqueConstraint(
                fields=["request_id", "experiment", "variant_key"], name="prediction_once"
            )
        ]
        indexes = [models.Index(fields=["experiment", "id"], name="prediction_exp_id")]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.request_id}->{self.variant_key}"


class Label(models.Model):
    """The true outcome of one request, sent later through ``POST /v1/labels``.

    One per request id (the first one wins). ``value`` is the label as JSON text;
    ``labelled_at`` and ``received_at`` are epoch seconds.
    """

    request_id = models.CharField(max_length=128, unique=True)
    value = models.TextField()
    labelled_at = models.FloatField()
    received_at = models.FloatField()

    def __str__(self) -> str:
        return f"{self.request_id}={self.value}"


class UnitLLMOutcome(models.Model):
    """One user's generative answers within the windows of its `UnitOutcome` (sibling table).

    Written by the proxy (``routing.observe.unit_llm``) for users that got at least one answer
    the proxy measured as generative (streamed or a completion path), so the TTFT, token and
    cost guardrails take the user as the unit like latency. ``first_seen``, ``share`` and
    ``control_share`` are those of the user's tally (its first request on the process that
    served it); the windows are RATE_WINDOW_FAST_S and RATE_WINDOW_SLOW_S after ``first_seen``.
    A sibling table rather than columns of `UnitOutcome`: plain users' rows and their upserts
    stay as they were, and rows exist only for users of generative answers.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    unit_id = models.CharField(max_length=200)
    variant_key = models.CharField(max_length=64)
    first_seen = models.FloatField()
    share = models.FloatField()
    control_share = models.FloatField()
    # Generative answers recorded in the fast and slow windows.
    answers_fast = models.BigIntegerField(default=0)
    answers_slow = models.BigIntegerField(default=0)
    # Slow window sums and counts: TTFT (ms), output tokens, output tokens per second, cost.
    ttft_sum = models.FloatField(default=0.0)
    ttft_count = models.BigIntegerField(default=0)
    output_tokens_sum = models.FloatField(default=0.0)
    output_tokens_count = models.BigIntegerField(default=0)
    rate_sum = models.FloatField(default=0.0)
    rate_count = models.BigIntegerField(default=0)
    cost_sum = models.FloatField(default=0.0)
    cost_count = models.BigIntegerField(default=0)
    # The window's TTFTs per routing.observe.histogram bucket, "index:count,...".
    ttft_buckets_fast = models.TextField(default="", blank=True)
    ttft_buckets_slow = models.TextField(default="", blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["experiment", "unit_id"], name="unit_llm_outcome_once")
        ]
        indexes = [models.Index(fields=["experiment", "first_seen"], name="unit_llm_outcome_seen")]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.unit_id}@{self.first_seen:.3f} (llm)"


class InputDriftBucket(models.Model):
    """Counts of one request field's values in one time bucket, from one flush of one process.

    ``counts`` is JSON: an object from cell to count, where a cell is a number's bin index
    (as text; ``routing.proxy.inputs``), a category's value, ``(missing)`` or ``(other)``.
    Buckets are OBSERVATION_BUCKET_S long. Rows are append-only and mergeable (analysis sums
    them): storage grows with time buckets and fields, not with traffic.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    field_path = models.CharField(max_length=200)
    bucket_start = models.FloatField()
    counts = models.TextField()

    class Meta:
        indexes = [models.Index(fields=["experiment", "bucket_start"], name="input_drift_bucket")]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.field_path}@{self.bucket_start:.0f}"


class InputDriftClaim(models.Model):
    """A sampled user counted for input drift in one window, by whichever edge process wrote it
    first: the flush inserts claims with ON CONFLICT DO NOTHING and adds to the bucket counts
    only the cells of users whose claim it inserted (``routing.observe.inputs``), so a user
    counts once per (experiment, window) across processes. Storage grows with sampled users per
    window; claims are deleted ``CLAIM_KEEP_S`` after their window ends. ``experiment_id`` is
    no foreign key: a deleted experiment's claims go with their window.
    """

    experiment_id = models.IntegerField()
    window_start = models.FloatField()
    window_end = models.FloatField()
    user_hash = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment_id", "window_start", "user_hash"], name="input_drift_claim"
            )
        ]
        indexes = [models.Index(fields=["window_end"], name="input_drift_claim_end")]

    def __str__(self) -> str:
        return f"{self.experiment_id}@{self.window_start:.0f}:{self.user_hash}"
