"""Tables of the prediction-drift check: its state, the users already bet on, per-bucket counts.

Imported by `analysis.models` so Django registers them with the analysis app.
"""

from django.db import models


class PredictionDriftState(models.Model):
    """One experiment's prediction-drift e-processes and what they rest on.

    `categories` are the category labels in index order (class values as JSON text, bins of
    numbers as "[lo, hi)", "(unreadable)"); `edges` the interior bin edges of numbers, fixed
    from `calibration` (control users' first predictions) and never changed afterwards;
    `bets` maps each tested arm to `analysis.stats.prediction_drift.DriftBet.as_json()` plus
    "fired"; `cursor` / `horizon` are Prediction ids (rows with cursor < id <= horizon were
    visible at the previous run and are folded now). A change of the tolerance or of the
    prediction kind restarts the bets (users already bet on are not bet on again).
    """

    experiment = models.OneToOneField(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+"
    )
    tolerance = models.FloatField()
    kind = models.CharField(max_length=16)
    cursor = models.BigIntegerField(default=0)
    horizon = models.BigIntegerField(default=0)
    categories = models.JSONField(default=list)
    edges = models.JSONField(null=True, default=None)
    calibration = models.JSONField(default=list)
    bets = models.JSONField(default=dict)
    alerted = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.experiment_id}: drift (tolerance {self.tolerance:g})"


class DriftUnit(models.Model):
    """A user whose first sampled prediction has been taken (each user counts once)."""

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    unit_id = models.CharField(max_length=200)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["experiment", "unit_id"], name="drift_unit_once")
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.unit_id}"


class PredictionDriftCount(models.Model):
    """Users' first predictions per category, for one arm and one minute (mergeable counts).

    `counts` is a list indexed like `PredictionDriftState.categories`. Storage grows with
    minutes, arms and categories, not with traffic.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    arm = models.CharField(max_length=64)
    bucket_start = models.FloatField()
    counts = models.JSONField(default=list)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "arm", "bucket_start"], name="drift_count_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.arm}@{self.bucket_start:.0f}"


class InputDriftState(models.Model):
    """One watched request field's alert state: drifting now, and how many episodes so far.

    An episode starts when the field is flagged after not being flagged, and ends when it is
    no longer flagged; each episode alerts once. It also keeps the field's rollup.
    """

    experiment = models.ForeignKey(
        "experiments.Experiment", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    field_path = models.CharField(max_length=200)
    drifting = models.BooleanField(default=False)
    episodes = models.PositiveIntegerField(default=0)
    # The rollup (analysis.input_drift), so a run reads a bounded number of buckets: the
    # windows it was made for, the reference's summed counts once closed (JSON; "" before),
    # the last monitoring window folded, its counts, and the users of the windows folded.
    windows_key = models.CharField(max_length=200, default="")
    reference_counts = models.TextField(default="")
    last_window = models.PositiveIntegerField(default=0)
    window_counts = models.TextField(default="{}")
    since_n = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "field_path"], name="input_drift_state_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.experiment_id}:{self.field_path} (episodes {self.episodes})"
