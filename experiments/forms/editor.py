"""ExperimentEditor: the experiment form and its row sets bound together, mapped to services."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django import forms

from experiments import services
from experiments.forms.experiment import (
    PERCENT,
    ExperimentForm,
    MetricUseFormSet,
    RampStepFormSet,
    VariantFormSet,
    fraction,
)
from experiments.models import Experiment, ExperimentKind, ExperimentStatus, Metric, PredictionKind

# Fields people may not change once traffic flows: changing them would reshuffle users
# between variants or change what a metric means mid-experiment (services.STRUCTURAL_FIELDS).
LOCKED_WHILE_LIVE = frozenset(
    {
        "kind",
        "seed",
        "hash_version",
        "unit_source",
        "unit_attribute",
        "namespace_id",
        "namespace_start_pct",
        "namespace_end_pct",
    }
)
# The only fields a finished experiment keeps editable.
EDITABLE_WHEN_ENDED = frozenset({"name", "description", "hypothesis"})

# Service field name -> form field name, where the form shows the value differently.
_MAIN_FIELD_FOR_SERVICE = {
    "coverage": "coverage_pct",
    "namespace": "namespace_id",
}
_ROW_FIELD_FOR_SERVICE = {
    "variants": {"weight": "weight_pct"},
    "metrics": {"margin": "margin_pct"},
    "ramp_steps": {"canary_share": "share_pct"},
}
_ROW_ERROR = re.compile(r"(?P<group>variants|metrics|ramp_steps)\[(?P<index>\d+)\]\.(?P<field>\w+)")
# Service errors about a whole row set; weights are part of the variant rows in the UI.
_GROUP_FOR_SERVICE = {
    "variants": "variants",
    "weights": "variants",
    "metrics": "metrics",
    "ramp_steps": "ramp_steps",
}


def _percent(fraction: float | None) -> float | int | None:
    """A stored fraction as the percentage the form shows: 0.25 -> 25, 0.125 -> 12.5."""
    if fraction is None:
        return None
    value = round(fraction * PERCENT, 10)
    return int(value) if value.is_integer() else value


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)


def _kept_forms(formset: forms.BaseFormSet[Any]) -> list[forms.Form]:
    """Rows the user kept: not marked for deletion and not an untouched blank row.

    The service numbers rows in the order it receives them, so this list is also how a
    service error such as "variants[1].upstream_url" finds its row.
    """
    kept = []
    for form in formset.forms:
        cleaned = getattr(form, "cleaned_data", {})
        if cleaned.get("DELETE") or (form.empty_permitted and not form.has_changed()):
            continue
        kept.append(form)
    return kept


@dataclass(frozen=True)
class MetricOption:
    """A catalogue metric as the form's guardrail phrase needs it."""

    key: str
    name: str
    direction: str


class ExperimentEditor:
    """The experiment form and its variant, metric and ramp rows, bound and mapped together."""

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        experiment: Experiment | None = None,
        metrics: Sequence[Metric] = (),
    ) -> None:
        self.experiment = experiment
        self.status = experiment.status if experiment else ExperimentStatus.DRAFT
        self.metric_options = [MetricOption(m.key, m.name, m.direction) for m in metrics]
        self.group_errors: dict[str, list[str]] = {"variants": [], "metrics": [], "ramp_steps": []}
        ended = self.status in (ExperimentStatus.COMPLETED, ExperimentStatus.ROLLED_BACK)
        live = self.status in (ExperimentStatus.RUNNING, ExperimentStatus.PAUSED)
        self.variants_locked = live or ended
        self.metrics_locked = live or ended
        self.ramp_locked = ended
        main_locked: set[str] = set()
        if experiment is not None:
            main_locked.add("key")
        if live:
            main_locked |= LOCKED_WHILE_LIVE
        if ended:
            main_locked |= set(ExperimentForm.base_fields) - EDITABLE_WHEN_ENDED
        self.main_locked = frozenset(main_locked)

        initial = self._initial()
        self.form = ExperimentForm(data, initial=initial["main"], locked=self.main_locked)
        self.variants = VariantFormSet(
            data,
            prefix="variants",
            initial=initial["variants"],
            form_kwargs={"locked": self.variants_locked},
        )
        choices = [(m.key, f"{m.name} ({m.key})") for m in metrics]
        self.metrics = MetricUseFormSet(
            data,
            prefix="metrics",
            initial=initial["metrics"],
            form_kwargs={"metric_choices": choices},
        )
        self.ramp = RampStepFormSet(data, prefix="ramp", initial=initial["ramp"])
        if self.metrics_locked:
            for form in self.metrics.forms:
                for field in form.fields.values():
                    field.disabled = True
        if self.ramp_locked:
            for form in self.ramp.forms:
                for field in form.fields.values():
                    field.disabled = True
        self.control_row = self._control_row(data, initial["variants"])

    # --- initial values ---------------------------------------------------------------

    def _initial(self) -> dict[str, Any]:
        experiment = self.experiment
        if experiment is None:
            return {
                "main": {"coverage_pct": 100},
                "variants": [
                    {"key": "v1", "name": "", "upstream_url": "", "weight_pct": 50},
                    {"key": "v2", "name": "", "upstream_url": "", "weight_pct": 50},
                ],
                "metrics": [],
                "ramp": [
                    {
                        "share_pct": _percent(step.canary_share),
                        "min_duration_s": step.min_duration_s,
                        "min_exposures_per_arm": step.min_exposures_per_arm,
                    }
                    for step in services.default_ramp()
                ],
            }
        main: dict[str, Any] = {
            name: getattr(experiment, name)
            for name in (
                "key",
                "name",
                "kind",
                "description",
                "hypothesis",
                "unit_source",
                "unit_attribute",
                "seed",
                "hash_version",
                "alpha",
                "decision_sample_size",
                "on_health_failure",
                "fallback_to_control",
                "shadow_compare_field",
                "cache_ttl_s",
                "cache_max_entries",
                "quality_enabled",
                "quality_prediction_path",
                "quality_prediction_kind",
                "quality_request_id_header",
                "quality_sample_rate",
                "prediction_drift_enabled",
                "prediction_drift_tolerance",
                "prediction_drift_action",
            )
        }
        main["coverage_pct"] = _percent(experiment.coverage)
        main["input_drift"] = experiment.input_drift or None
        main["namespace_id"] = experiment.namespace_id
        main["namespace_start_pct"] = _percent(experiment.namespace_start)
        main["namespace_end_pct"] = _percent(experiment.namespace_end)
        main["overrides"] = "\n".join(f"{u} = {v}" for u, v in (experiment.overrides or {}).items())
        steps = list(experiment.ramp_steps.all())
        if experiment.kind != ExperimentKind.CANARY and not steps:
            steps_initial = self._initial_without_experiment_ramp()
        else:
            steps_initial = [
                {
                    "share_pct": _percent(s.canary_share),
                    "min_duration_s": s.min_duration_s,
                    "min_exposures_per_arm": s.min_exposures_per_arm,
                }
                for s in steps
            ]
        return {
            "main": main,
            "variants": [
                {
                    "key": v.key,
                    "name": "" if v.name == v.key else v.name,
                    "upstream_url": v.upstream_url,
                    "weight_pct": _percent(v.weight),
                    "price_input_per_m": v.price_input_per_m,
                    "price_output_per_m": v.price_output_per_m,
                    "is_shadow": v.is_shadow,
                    "is_control": v.is_control,
                }
                for v in experiment.variants.all()
            ],
            "metrics": [
                {"metric": m.metric.key, "role": m.role, "margin_pct": _percent(m.margin)}
                for m in experiment.metrics.all()
            ],
            "ramp": steps_initial,
        }

    @staticmethod
    def _initial_without_experiment_ramp() -> list[dict[str, Any]]:
        # An A/B test has no ramp; offer the default one in case the draft becomes a canary.
        return [
            {
                "share_pct": _percent(step.canary_share),
                "min_duration_s": step.min_duration_s,
                "min_exposures_per_arm": step.min_exposures_per_arm,
            }
            for step in services.default_ramp()
        ]

    def _control_row(
        self, data: Mapping[str, Any] | None, variants_initial: Sequence[Mapping[str, Any]]
    ) -> str:
        """Prefix of the row marked as control (one radio button across the variant rows)."""
        if data is not None and not self.variants_locked:
            return str(data.get("control", ""))
        for index, variant in enumerate(variants_initial):
            if variant.get("is_control"):
                return f"variants-{index}"
        return "variants-0"

    # --- validation -------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The kind being edited: the posted choice, or the stored one when it is locked."""
        return str(self.form["kind"].value() or ExperimentKind.CANARY)

    def is_valid(self) -> bool:
        valid = self.form.is_valid()
        valid = self.variants.is_valid() and valid
        if not self.metrics_locked:
            valid = self.metrics.is_valid() and valid
        if self.kind == ExperimentKind.CANARY and not self.ramp_locked:
            valid = self.ramp.is_valid() and valid
        return valid

    @property
    def has_errors(self) -> bool:
        return bool(
            self.form.errors
            or any(self.group_errors.values())
            or (self.variants.is_bound and self.variants.total_error_count())
            or (
                self.metrics.is_bound
                and not self.metrics_locked
                and self.metrics.total_error_count()
            )
            or (
                self.ramp.is_bound
                and self.kind == ExperimentKind.CANARY
                and not self.ramp_locked
                and self.ramp.total_error_count()
            )
        )

    # --- service inputs ---------------------------------------------------------------

    def variant_inputs(self) -> list[services.VariantInput]:
        return [
            services.VariantInput(
                key=form.cleaned_data["key"],
                name=form.cleaned_data.get("name") or "",
                upstream_url=form.cleaned_data["upstream_url"],
                weight=fraction(form.cleaned_data.get("weight_pct")),
                is_control=form.prefix == self.control_row,
                is_shadow=bool(form.cleaned_data.get("is_shadow")),
                price_input_per_m=form.cleaned_data.get("price_input_per_m"),
                price_output_per_m=form.cleaned_data.get("price_output_per_m"),
            )
            for form in _kept_forms(self.variants)
        ]

    def metric_inputs(self) -> list[services.MetricUseInput]:
        return [
            services.MetricUseInput(
                metric_key=form.cleaned_data["metric"],
                role=form.cleaned_data["role"],
                margin=fraction(form.cleaned_data.get("margin_pct")),
            )
            for form in _kept_forms(self.metrics)
        ]

    def ramp_inputs(self) -> list[services.RampStepInput]:
        return [
            services.RampStepInput(
                canary_share=fraction(form.cleaned_data["share_pct"]),
                min_duration_s=form.cleaned_data["min_duration_s"],
                min_exposures_per_arm=form.cleaned_data["min_exposures_per_arm"],
            )
            for form in _kept_forms(self.ramp)
        ]

    def _settings(self) -> dict[str, Any]:
        data = self.form.cleaned_data
        return {
            "description": data["description"],
            "hypothesis": data["hypothesis"],
            "unit_source": data["unit_source"],
            "unit_attribute": data["unit_attribute"],
            "coverage": fraction(data["coverage_pct"]),
            "hash_version": data["hash_version"],
            "alpha": data["alpha"],
            "decision_sample_size": data["decision_sample_size"],
            "on_health_failure": data["on_health_failure"],
            "fallback_to_control": data["fallback_to_control"],
            "shadow_compare_field": data["shadow_compare_field"],
            "cache_ttl_s": data["cache_ttl_s"],
            "cache_max_entries": data["cache_max_entries"],
            "quality_enabled": data["quality_enabled"],
            "quality_prediction_path": data["quality_prediction_path"],
            "quality_prediction_kind": data["quality_prediction_kind"] or PredictionKind.CLASS,
            "quality_request_id_header": data["quality_request_id_header"],
            "quality_sample_rate": (
                1.0 if data["quality_sample_rate"] is None else data["quality_sample_rate"]
            ),
            "prediction_drift_enabled": data["prediction_drift_enabled"],
            "prediction_drift_tolerance": (
                0.02
                if data["prediction_drift_tolerance"] is None
                else data["prediction_drift_tolerance"]
            ),
            "prediction_drift_action": data["prediction_drift_action"] or "hold",
            "input_drift": data["input_drift"] or {},
        }

    def create_kwargs(self) -> dict[str, Any]:
        """Arguments for `services.experiment_create`."""
        data = self.form.cleaned_data
        kwargs: dict[str, Any] = {
            "key": data["key"],
            "name": data["name"],
            "kind": data["kind"],
            "seed": data["seed"],
            "variants": self.variant_inputs(),
            "metrics": self.metric_inputs(),
            "ramp_steps": self.ramp_inputs() if data["kind"] == ExperimentKind.CANARY else None,
            "namespace": self.form.namespace(),
            "overrides": data["overrides"],
            **self._settings(),
        }
        if data["slack_webhook_url"]:
            kwargs["slack_webhook_url"] = data["slack_webhook_url"]
        return kwargs

    def update_kwargs(self) -> dict[str, Any]:
        """Arguments for `services.experiment_update`: only what changed and may change."""
        experiment = self.experiment
        assert experiment is not None
        data = self.form.cleaned_data
        changes: dict[str, Any] = {}
        candidates = {
            "name": data["name"],
            "kind": data["kind"],
            # An empty seed means the key (as on create), so it is no change from the key.
            "seed": data["seed"] or experiment.key,
            **self._settings(),
        }
        form_name = {"coverage": "coverage_pct"}
        for name, value in candidates.items():
            if form_name.get(name, name) in self.main_locked:
                continue
            current = getattr(experiment, name)
            if isinstance(value, float) and isinstance(current, float):
                if not _same(value, current):
                    changes[name] = value
            elif value != current:
                changes[name] = value
        if "namespace_id" not in self.main_locked:
            namespace = self.form.namespace()
            current_ns = (
                (
                    experiment.namespace_id,
                    float(experiment.namespace_start or 0.0),
                    float(experiment.namespace_end or 0.0),
                )
                if experiment.namespace_id
                else None
            )
            if namespace != current_ns:
                changes["namespace"] = namespace
        if "overrides" not in self.main_locked and data["overrides"] != (
            experiment.overrides or {}
        ):
            changes["overrides"] = data["overrides"]
        if "slack_webhook_url" not in self.main_locked:
            if data["slack_webhook_clear"]:
                if experiment.slack_webhook_url:
                    changes["slack_webhook_url"] = ""
            elif data["slack_webhook_url"]:
                changes["slack_webhook_url"] = data["slack_webhook_url"]

        current_variants = [
            services.VariantInput(
                key=v.key,
                name=v.name,
                upstream_url=v.upstream_url,
                weight=v.weight,
                is_control=v.is_control,
                is_shadow=v.is_shadow,
                price_input_per_m=v.price_input_per_m,
                price_output_per_m=v.price_output_per_m,
            )
            for v in experiment.variants.all()
        ]
        if not self.variants_locked:
            variants = [
                services.VariantInput(**{**v.__dict__, "name": v.name or v.key})
                for v in self.variant_inputs()
            ]
            if variants != current_variants:
                changes["variants"] = self.variant_inputs()
        elif self.status in (ExperimentStatus.RUNNING, ExperimentStatus.PAUSED):
            weights = {
                v.key: fraction(form.cleaned_data.get("weight_pct"))
                for v, form in zip(current_variants, self.variants.forms, strict=False)
            }
            if any(
                not _same(weights[v.key], v.weight) for v in current_variants if v.key in weights
            ):
                changes["weights"] = weights

        if not self.metrics_locked:
            current_metrics = [
                services.MetricUseInput(metric_key=m.metric.key, role=m.role, margin=m.margin)
                for m in experiment.metrics.all()
            ]
            metrics = self.metric_inputs()
            if metrics != current_metrics:
                changes["metrics"] = metrics

        if not self.ramp_locked:
            current_steps = [
                services.RampStepInput(s.canary_share, s.min_duration_s, s.min_exposures_per_arm)
                for s in experiment.ramp_steps.all()
            ]
            kind = changes.get("kind", experiment.kind)
            steps = self.ramp_inputs() if kind == ExperimentKind.CANARY else []
            if steps != current_steps:
                changes["ramp_steps"] = steps
        return changes

    # --- service errors -> fields -----------------------------------------------------

    def show_errors(self, errors: Mapping[str, Sequence[str]]) -> None:
        """Put each `InvalidInput` message next to the field or row set it names."""
        kept = {
            "variants": _kept_forms(self.variants),
            "metrics": _kept_forms(self.metrics),
            "ramp_steps": _kept_forms(self.ramp),
        }
        for name, messages in errors.items():
            if name.startswith("input_drift."):  # a place inside the JSON setting
                for message in messages:
                    self.form.add_error("input_drift", f"{name[len('input_drift.') :]}: {message}")
                continue
            row = _ROW_ERROR.fullmatch(name)
            if row is not None:
                group, index = row["group"], int(row["index"])
                field = _ROW_FIELD_FOR_SERVICE[group].get(row["field"], row["field"])
                forms_in_group = kept[group]
                if index < len(forms_in_group):
                    form = forms_in_group[index]
                    target = field if field in form.fields else None
                    for message in messages:
                        form.add_error(target, message)
                    continue
                self.group_errors[group].extend(messages)
                continue
            if name in _GROUP_FOR_SERVICE:
                self.group_errors[_GROUP_FOR_SERVICE[name]].extend(messages)
                continue
            field = _MAIN_FIELD_FOR_SERVICE.get(name, name)
            target = field if field in self.form.fields else None
            for message in messages:
                self.form.add_error(target, message if target else f"{name}: {message}")

    def show_not_editable(self, status: str, fields: Sequence[str]) -> None:
        self.form.add_error(
            None, f"These cannot change while the experiment is {status}: {', '.join(fields)}."
        )
