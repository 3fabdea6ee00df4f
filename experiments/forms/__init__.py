"""Web UI forms: turn what people type into service inputs and put service errors back inline.

The forms only check types (a number is a number, a percentage lies in 0-100). Every rule
about experiments lives in `experiments.services`, the same code the API calls; when a
service raises `InvalidInput`, `ExperimentEditor.show_errors` puts each message next to the
field it names ("variants[1].upstream_url", "ramp_steps[2].canary_share", "metrics[0].margin").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django import forms

from experiments.forms.editor import (
    EDITABLE_WHEN_ENDED,
    LOCKED_WHILE_LIVE,
    ExperimentEditor,
    MetricOption,
)
from experiments.forms.experiment import (
    PERCENT,
    RESERVED_KEYS,
    ExperimentForm,
    MetricUseForm,
    MetricUseFormSet,
    RampStepForm,
    RampStepFormSet,
    VariantForm,
    VariantFormSet,
)
from experiments.models import (
    DEFAULT_WINDOW_S,
    MAX_WINDOW_S,
    ApiScope,
    MetricDirection,
    MetricKind,
)

__all__ = [
    "EDITABLE_WHEN_ENDED",
    "LOCKED_WHILE_LIVE",
    "PERCENT",
    "RESERVED_KEYS",
    "ActionForm",
    "ApiKeyForm",
    "ExperimentEditor",
    "ExperimentForm",
    "MetricForm",
    "MetricOption",
    "MetricUseForm",
    "MetricUseFormSet",
    "RampStepForm",
    "RampStepFormSet",
    "VariantForm",
    "VariantFormSet",
]


class MetricForm(forms.Form):
    """A catalogue metric; the kind/source rules live in `services.validate_metric`."""

    key = forms.CharField(max_length=64, help_text="Lowercase letters, digits, - and _.")
    name = forms.CharField(max_length=200, help_text="Used in plain-word results: “p95 latency”.")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    kind = forms.ChoiceField(choices=MetricKind.choices)
    source = forms.CharField(
        required=False,
        max_length=128,
        help_text="The event name, the built-ins latency_ms and error measured by the proxy, or "
        "a quality score: quality:accuracy, quality:absolute_error, quality:squared_error, "
        "quality:log_loss, quality:brier (window: how long a prediction waits for its label).",
    )
    quantile = forms.FloatField(
        required=False,
        widget=forms.NumberInput(attrs={"step": "any"}),
        help_text="Quantile metrics only: 0.5, 0.95, 0.99.",
    )
    numerator_event = forms.CharField(required=False, max_length=128, help_text="Ratio metrics.")
    denominator_event = forms.CharField(required=False, max_length=128, help_text="Ratio metrics.")
    direction = forms.ChoiceField(choices=MetricDirection.choices)
    winsorize_cap = forms.FloatField(
        required=False,
        widget=forms.NumberInput(attrs={"step": "any"}),
        help_text="Optional: cap each user's value here to tame outliers.",
    )
    window_s = forms.IntegerField(
        label="Exposure window (seconds)",
        required=False,
        min_value=1,
        max_value=MAX_WINDOW_S,
        initial=DEFAULT_WINDOW_S,
        help_text="Per-user metrics count a user's events only this long after their first "
        "exposure; users whose window is still open wait. 600 s fits 10-minute ramp steps.",
    )
    missing_label = forms.CharField(
        label="Label when none arrives (quality metrics)",
        required=False,
        max_length=200,
        help_text='JSON, e.g. "legitimate" (quoted) or 0: a prediction whose label window '
        "passes without a label counts with it. Empty: such predictions do not count.",
    )

    def __init__(self, *args: Any, editing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.editing = editing
        if editing:
            self.fields["key"].disabled = True

    def service_values(self) -> dict[str, Any]:
        values = {name: value for name, value in self.cleaned_data.items() if name != "key"}
        if values.get("window_s") is None:
            values.pop("window_s", None)  # left empty: the catalogue's default applies
        return values

    def show_errors(self, errors: Mapping[str, Sequence[str]]) -> None:
        for name, messages in errors.items():
            target = name if name in self.fields else None
            for message in messages:
                self.add_error(target, message if target else f"{name}: {message}")


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=200, help_text="Who or what uses it: “checkout service”.")
    scopes = forms.MultipleChoiceField(
        choices=ApiScope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=[ApiScope.DECIDE],
        required=False,
    )

    def __init__(self, *args: Any, may_grant_manage: bool = True, **kwargs: Any) -> None:
        # The settings page also holds the webhook form: ids must not collide ("id_name").
        kwargs.setdefault("auto_id", "id_apikey_%s")
        super().__init__(*args, **kwargs)
        if not may_grant_manage:
            # A manage key acts as an admin (experiments.roles): only admins may create one.
            scopes = self.fields["scopes"]
            assert isinstance(scopes, forms.MultipleChoiceField)
            scopes.choices = [c for c in ApiScope.choices if c[0] != ApiScope.MANAGE]
            scopes.error_messages["invalid_choice"] = (
                "Only admins can create keys with the %(value)s scope."
            )

    def show_errors(self, errors: Mapping[str, Sequence[str]]) -> None:
        for name, messages in errors.items():
            target = name if name in self.fields else None
            for message in messages:
                self.add_error(target, message)


class ActionForm(forms.Form):
    """The confirmation step of a lifecycle action: a reason, and for `complete` a winner."""

    reason = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}), max_length=2000
    )
    winner = forms.ChoiceField(required=False)

    def __init__(
        self,
        *args: Any,
        reason: str = "optional",
        winner_choices: Sequence[tuple[str, str]] = (),
        **kwargs: Any,
    ) -> None:
        """`reason` is "required", "optional" or "none" (the action records no reason)."""
        super().__init__(*args, **kwargs)
        if reason == "none":
            del self.fields["reason"]
        else:
            self.fields["reason"].required = reason == "required"
            self.fields["reason"].help_text = (
                "Required: it goes into the audit log."
                if reason == "required"
                else "Optional: it goes into the audit log."
            )
        winner = self.fields["winner"]
        assert isinstance(winner, forms.ChoiceField)
        winner.choices = list(winner_choices)
        winner.required = bool(winner_choices)
        if not winner_choices:
            del self.fields["winner"]
