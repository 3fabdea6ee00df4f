"""Start a canary from a shadow: one draft canary experiment per (experiment, shadow), audited.

The canary has the source's control (same key and upstream) and the shadow's upstream as the
canary version (under the shadow's key), the source's metrics and guardrails with their margins,
its statistical and proxy settings (alpha, decision sample size, health action, fallback,
cache, Slack webhook, unit source, quality tracking) and the default ramp
(``experiments.services.definitions.DEFAULT_RAMP``). It is created as a draft: clients reach an
experiment through its own key (``/proxy/{key}/``), so someone points traffic at it and starts
it. Its key is ``{source}-{shadow}-canary`` (cut to 64 characters).

Idempotent: the source experiment's row is locked, and when the canary's key exists already
the existing experiment is returned if it is this shadow's canary (control and canary
upstreams match); a different experiment under that key is a 400 naming ``key``. Two clicks
racing on SQLite, which has no row locks, meet at the key's unique constraint; the loser
returns the winner's experiment. The source gets one audit entry, ``canary_from_shadow``.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import IntegrityError, transaction

from experiments.errors import InvalidInput, NotFound
from experiments.models import Experiment, ExperimentMetric, Variant
from experiments.services.common import audit
from experiments.services.definitions import MetricUseInput, VariantInput, experiment_create
from experiments.services.quality import QUALITY_FIELDS

KEY_LENGTH = 64
# Settings the canary takes from the source experiment (beside variants, metrics and ramp).
COPIED_FIELDS = (
    "alpha",
    "decision_sample_size",
    "on_health_failure",
    "fallback_to_control",
    "cache_ttl_s",
    "cache_max_entries",
    "slack_webhook_url",
    "unit_source",
    "unit_attribute",
    "hash_version",
    *QUALITY_FIELDS,
)


@dataclass(frozen=True)
class ShadowCanary:
    experiment: Experiment
    created: bool


def canary_key(source_key: str, shadow_key: str) -> str:
    return f"{source_key}-{shadow_key}-canary"[:KEY_LENGTH].rstrip("-_")


def _variants(source: Experiment, shadow: Variant) -> list[VariantInput]:
    control = source.variants.get(is_control=True)
    return [
        VariantInput(
            key=control.key,
            name=control.name,
            upstream_url=control.upstream_url,
            weight=0.5,
            is_control=True,
            price_input_per_m=control.price_input_per_m,
            price_output_per_m=control.price_output_per_m,
        ),
        VariantInput(
            key=shadow.key,
            name=shadow.name,
            upstream_url=shadow.upstream_url,
            weight=0.5,
            price_input_per_m=shadow.price_input_per_m,
            price_output_per_m=shadow.price_output_per_m,
        ),
    ]


def _is_canary_of(experiment: Experiment, source: Experiment, shadow: Variant) -> bool:
    control = source.variants.get(is_control=True)
    upstreams = {
        (v.is_control, v.upstream_url) for v in experiment.variants.filter(is_shadow=False)
    }
    return experiment.kind == "canary" and upstreams == {
        (True, control.upstream_url),
        (False, shadow.upstream_url),
    }


def _existing(key: str, source: Experiment, shadow: Variant) -> ShadowCanary | None:
    found = Experiment.objects.filter(key=key).first()
    if found is None:
        return None
    if not _is_canary_of(found, source, shadow):
        raise InvalidInput(
            {"key": [f"An experiment with key {key!r} exists and is not this shadow's canary."]}
        )
    return ShadowCanary(experiment=found, created=False)


def canary_from_shadow(*, actor: str, key: str, shadow_key: str) -> ShadowCanary:
    """Create the shadow's draft canary once; later calls return the same experiment."""
    try:
        with transaction.atomic():
            try:
                source = Experiment.objects.select_for_update().get(key=key)
            except Experiment.DoesNotExist:
                raise NotFound("experiment", key) from None
            shadow = source.variants.filter(key=shadow_key, is_shadow=True).first()
            if shadow is None:
                raise InvalidInput(
                    {"shadow": [f"Experiment {key!r} has no shadow variant {shadow_key!r}."]}
                )
            new_key = canary_key(key, shadow_key)
            existing = _existing(new_key, source, shadow)
            if existing is not None:
                return existing
            uses = ExperimentMetric.objects.filter(experiment=source).select_related("metric")
            experiment = experiment_create(
                actor=actor,
                key=new_key,
                name=f"{source.name}: canary of {shadow.name or shadow.key}"[:200],
                kind="canary",
                variants=_variants(source, shadow),
                metrics=[
                    MetricUseInput(metric_key=use.metric.key, role=use.role, margin=use.margin)
                    for use in uses
                ],
                ramp_steps=None,
                description=f"Started from shadow {shadow_key!r} of experiment {key!r}.",
                **{name: getattr(source, name) for name in COPIED_FIELDS},
            )
            audit(
                experiment=source,
                actor=actor,
                action="canary_from_shadow",
                after={"shadow": shadow_key, "canary": new_key},
            )
            return ShadowCanary(experiment=experiment, created=True)
    except (IntegrityError, InvalidInput):
        # A racing call created it between our check and our insert (SQLite: no row locks),
        # which the key's check or its unique constraint reports; other errors stand.
        source = Experiment.objects.get(key=key)
        shadow = source.variants.filter(key=shadow_key, is_shadow=True).first()
        existing = (
            None if shadow is None else _existing(canary_key(key, shadow_key), source, shadow)
        )
        if existing is None:
            raise
        return existing
