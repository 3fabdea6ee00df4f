"""The experiment form and its variant, metric and ramp-step row forms, with percent fields."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django import forms
from django.forms import formset_factory

from experiments.models import (
    ExperimentKind,
    HealthResponse,
    MetricRole,
    PredictionKind,
    UnitSource,
)

PERCENT = 100.0
RESERVED_KEYS = frozenset({"new"})


def _percent_field(label: str, *, required: bool = True, help_text: str = "") -> forms.FloatField:
    return forms.FloatField(
        label=label,
        min_value=0.0,
        max_value=100.0,
        required=required,
        help_text=help_text,
        widget=forms.NumberInput(attrs={"step": "any", "inputmode": "decimal"}),
    )


def fraction(percent: float | None) -> float:
    # Round away the binary noise of x/100 (33.3 -> 0.33299999999999996) so that weights
    # typed as percentages that add up to 100 also add up to 1 within the service tolerance.
    return 0.0 if percent is None else round(percent / PERCENT, 12)


class ExperimentForm(forms.Form):
    """The experiment's own settings; variants, metrics and ramp steps are row sets."""

    name = forms.CharField(max_length=200, help_text="What people will call it in alerts.")
    key = forms.CharField(
        max_length=64,
        help_text="Lowercase letters, digits, - and _. The SDK and the proxy use it: "
        "/proxy/<key>/…",
    )
    kind = forms.ChoiceField(
        choices=ExperimentKind.choices, widget=forms.RadioSelect, initial=ExperimentKind.CANARY
    )
    description = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text="Optional."
    )
    hypothesis = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="What you expect to happen, e.g. “v2 lifts conversion without slowing "
        "p95 latency”.",
    )
    unit_source = forms.ChoiceField(
        label="Where the user id comes from",
        choices=UnitSource.choices,
        initial=UnitSource.HEADER,
    )
    unit_attribute = forms.CharField(
        label="Unit attribute",
        max_length=128,
        initial="X-Rampart-Unit",
        help_text="The header, cookie, JSON field or query parameter that identifies a user. "
        "The same user always gets the same version.",
    )
    seed = forms.CharField(
        required=False,
        max_length=128,
        help_text="Hashing seed. Empty means the experiment key.",
    )
    coverage_pct = _percent_field(
        "Coverage (%)",
        help_text="Share of users who enter the experiment; the rest get control.",
    )
    hash_version = forms.TypedChoiceField(
        label="Hash version",
        choices=[(2, "2 (recommended)"), (1, "1 (legacy GrowthBook)")],
        coerce=int,
        initial=2,
    )
    alpha = forms.FloatField(
        label="Significance level (alpha)",
        initial=0.05,
        widget=forms.NumberInput(attrs={"step": "any"}),
        help_text="0.05 gives 95% always-valid intervals.",
    )
    decision_sample_size = forms.IntegerField(
        label="Planned units per arm",
        initial=10_000,
        help_text="Tunes the sequential test; results stay valid at any sample size.",
    )
    on_health_failure = forms.ChoiceField(
        label="When a health check fails (SRM, no traffic)",
        choices=HealthResponse.choices,
        initial=HealthResponse.HOLD,
    )
    fallback_to_control = forms.BooleanField(
        label="Fall back to control when a version errors or times out",
        required=False,
        initial=True,
    )
    namespace_id = forms.CharField(
        label="Namespace",
        required=False,
        max_length=64,
        help_text="Experiments in the same namespace with disjoint ranges never share users.",
    )
    namespace_start_pct = _percent_field("Namespace range start (%)", required=False)
    namespace_end_pct = _percent_field("Namespace range end (%)", required=False)
    overrides = forms.CharField(
        label="Forced assignments",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "qa-user-1 = v2"}),
        help_text="One per line: unit id = variant key. For QA; dropped on rollback.",
    )
    shadow_compare_field = forms.CharField(
        label="Shadow comparison field",
        required=False,
        max_length=128,
        help_text="Top-level JSON field of the answers that shadow variants are compared on.",
    )
    cache_ttl_s = forms.IntegerField(
        label="Response cache TTL (s)",
        min_value=0,
        initial=0,
        help_text="0 turns the proxy cache off.",
    )
    cache_max_entries = forms.IntegerField(
        label="Response cache size (entries)", min_value=1, initial=10_000
    )
    quality_enabled = forms.BooleanField(
        label="Track model quality",
        required=False,
        help_text="The proxy reads each sampled answer's prediction; labels come later through "
        "POST /v1/labels.",
    )
    quality_prediction_path = forms.CharField(
        label="Prediction path",
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"placeholder": "predictions[0].label"}),
        help_text="Where the prediction is in the JSON answer: keys and [n] indices.",
    )
    quality_prediction_kind = forms.ChoiceField(
        label="Prediction kind",
        choices=PredictionKind.choices,
        required=False,
        initial=PredictionKind.CLASS,
    )
    quality_request_id_header = forms.CharField(
        label="Caller's request id header",
        required=False,
        max_length=128,
        help_text="Optional, e.g. X-Request-Id; else the proxy makes the X-Rampart-Request-Id.",
    )
    quality_sample_rate = forms.FloatField(
        label="Prediction sampling rate",
        required=False,
        min_value=0.0,
        max_value=1.0,
        initial=1.0,
        help_text="Share of requests whose prediction is recorded (0 to 1).",
    )
    prediction_drift_enabled = forms.BooleanField(
        label="Watch prediction drift between arms",
        required=False,
        help_text="Compares each arm's distribution of predictions with control's (needs "
        "quality tracking).",
    )
    prediction_drift_tolerance = forms.FloatField(
        label="Tolerated prediction drift (total variation)",
        required=False,
        min_value=0.0,
        max_value=0.5,
        initial=0.02,
        help_text="0.02 tolerates a 2-point shift of the predicted classes or bins.",
    )
    input_drift = forms.JSONField(
        label="Input drift (watched request fields, JSON)",
        required=False,
        widget=forms.Textarea(
            attrs={
                "rows": 5,
                "placeholder": '{"fields": [{"path": "amount", "kind": "number"}, '
                '{"path": "country", "kind": "category"}], "sample_rate": 0.1}',
            }
        ),
        help_text="Up to 10 fields (number or category) with a PSI threshold; a reference "
        "window or training distribution; action warn (default), hold or rollback. See the "
        "README's input drift section.",
    )
    prediction_drift_action = forms.ChoiceField(
        label="On prediction drift",
        choices=HealthResponse.choices,
        required=False,
        initial=HealthResponse.HOLD,
    )
    slack_webhook_url = forms.CharField(
        label="Slack webhook for this experiment",
        required=False,
        max_length=500,
        widget=forms.URLInput(
            attrs={"autocomplete": "off", "placeholder": "https://hooks.slack.com/services/…"}
        ),
        help_text="Leave empty to keep the current setting. Stored as a secret; never shown again.",
    )
    slack_webhook_clear = forms.BooleanField(
        label="Remove this experiment's Slack webhook", required=False
    )

    def __init__(self, *args: Any, locked: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in locked:
            if name in self.fields:
                self.fields[name].disabled = True

    def clean_key(self) -> str:
        key = str(self.cleaned_data.get("key") or "")
        # /experiments/new/ is the creation form, so an experiment called "new" would have
        # no page of its own.
        if key in RESERVED_KEYS and not self.fields["key"].disabled:
            raise forms.ValidationError(f"“{key}” is reserved by the web UI; choose another key.")
        return key

    def clean_overrides(self) -> dict[str, str]:
        text = self.cleaned_data.get("overrides") or ""
        overrides: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            unit, sep, variant = line.partition("=")
            if not sep or not unit.strip() or not variant.strip():
                raise forms.ValidationError(f"Line {number}: write “unit id = variant key”.")
            overrides[unit.strip()] = variant.strip()
        return overrides

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("namespace_id"):
            for name in ("namespace_start_pct", "namespace_end_pct"):
                if cleaned.get(name) is None and name not in self.errors:
                    self.add_error(name, "A namespace needs a start and an end.")
        return cleaned

    def namespace(self) -> tuple[str, float, float] | None:
        ns_id = self.cleaned_data.get("namespace_id") or ""
        if not ns_id:
            return None
        return (
            ns_id,
            fraction(self.cleaned_data.get("namespace_start_pct")),
            fraction(self.cleaned_data.get("namespace_end_pct")),
        )


class VariantForm(forms.Form):
    key = forms.CharField(max_length=64, label="Key")
    name = forms.CharField(max_length=200, required=False, label="Display name")
    upstream_url = forms.CharField(
        max_length=500,
        label="Upstream URL",
        widget=forms.URLInput(attrs={"placeholder": "http://model-v2:8080"}),
    )
    weight_pct = _percent_field("Weight (%)")
    # Generative models: prices per million input / output tokens (both or neither).
    price_input_per_m = forms.FloatField(
        label="$ / M input tokens",
        required=False,
        min_value=0.0,
        widget=forms.NumberInput(attrs={"step": "any", "inputmode": "decimal"}),
    )
    price_output_per_m = forms.FloatField(
        label="$ / M output tokens",
        required=False,
        min_value=0.0,
        widget=forms.NumberInput(attrs={"step": "any", "inputmode": "decimal"}),
    )
    is_shadow = forms.BooleanField(label="Shadow", required=False)

    def __init__(self, *args: Any, locked: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if locked:
            for name in (
                "key",
                "name",
                "upstream_url",
                "is_shadow",
                "price_input_per_m",
                "price_output_per_m",
            ):
                self.fields[name].disabled = True


class MetricUseForm(forms.Form):
    metric = forms.ChoiceField(label="Metric")
    role = forms.ChoiceField(label="Role", choices=MetricRole.choices)
    margin_pct = forms.FloatField(
        label="Tolerated harm (%)",
        required=False,
        min_value=0.0,
        widget=forms.NumberInput(attrs={"step": "any", "inputmode": "decimal"}),
    )

    def __init__(
        self, *args: Any, metric_choices: Sequence[tuple[str, str]] = (), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        metric_field = self.fields["metric"]
        assert isinstance(metric_field, forms.ChoiceField)
        metric_field.choices = [("", "Choose a metric…"), *metric_choices]


class RampStepForm(forms.Form):
    share_pct = forms.FloatField(
        label="Canary share (%)",
        min_value=0.0,
        max_value=100.0,
        widget=forms.NumberInput(attrs={"step": "any", "inputmode": "decimal"}),
    )
    min_duration_s = forms.IntegerField(label="Min. duration (s)", min_value=0, initial=60)
    min_exposures_per_arm = forms.IntegerField(label="Min. users per arm", min_value=0, initial=100)


VariantFormSet = formset_factory(VariantForm, extra=0, can_delete=True)
MetricUseFormSet = formset_factory(MetricUseForm, extra=0, can_delete=True)
RampStepFormSet = formset_factory(RampStepForm, extra=0, can_delete=True)
