"""Services of the analysis app: one analysis run (and its actions), webhooks, test alerts.

`analysis_run` is the whole loop for one experiment: lock its analysis state, bring the
aggregates up to date, evaluate health, guardrails and metrics, persist the sequential state
and a result snapshot, and act: roll back (`experiments.services.experiment_rollback`), hold
the ramp, or advance it (`experiment_advance_ramp`), queuing the alerts in the same
transaction as the change. Two workers that analyse the same experiment at the same moment
are serialised by the row lock on `AnalysisState` (and the experiment services are
idempotent themselves), so a rollback, its audit entry and its alert happen exactly once.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from analysis import alerts, metrics
from analysis.aggregation import aggregate, events_to_fold, fold_unit_events, note_event_horizon
from analysis.drift_actions import drift_alert, drift_decided
from analysis.evidence import ArmState
from analysis.folding import event_windows
from analysis.followup_tasks import events_fold as fold_task
from analysis.guardrails import ExperimentAnalysis, analyse
from analysis.health import HealthSettings, arms
from analysis.input_drift import input_drift_alerts, input_drift_decided, input_drift_report
from analysis.label_health import label_health_json
from analysis.latency_means import user_latency
from analysis.llm_means import user_llm_means
from analysis.models import AnalysisState, ResultSnapshot, SequentialState, WebhookEndpoint
from analysis.prediction_drift import drift_json, prediction_drift_update
from analysis.quantile_guardrails import quantile_bets_update
from analysis.rate_guardrails import rate_bets_update
from analysis.shadow_verdicts import shadow_analyses_update
from analysis.stats.quantile_users import UserQuantileBets
from analysis.stats.rate_guardrail import UserRateBets
from experiments import selectors as experiment_selectors
from experiments import services as experiment_services
from experiments.contracts import ExperimentView
from experiments.errors import InvalidInput, InvalidTransition, NotFound
from routing.logcontext import log_context

logger = logging.getLogger(__name__)

ACTOR = alerts.ANALYSIS_ACTOR
# Event ids an analysis run folds into the rollup itself; with a larger backlog each run
# queues one `analysis.fold_events` task for a chunk of FOLD_CHUNK ids (analysis.folding), so
# no run waits for a big fold and the backlog shrinks by a chunk per interval.
INLINE_FOLD = 50_000
# A new ramp step is counted for the SRM only after the edges have had time to load it.
STEP_GRACE_FACTOR = 3


@dataclass(frozen=True)
class RunResult:
    snapshot: ResultSnapshot
    analysis: ExperimentAnalysis
    action_taken: bool


def health_settings() -> HealthSettings:
    interval = float(settings.ANALYSIS_INTERVAL_S)
    return HealthSettings(no_traffic_after_s=max(60.0, 6 * interval))


def _step_view(view: ExperimentView) -> ExperimentView:
    """For the step's counts, start the step a little later: edges switch within seconds."""
    if view.kind != "canary" or view.step_started_at is None:
        return view
    grace = STEP_GRACE_FACTOR * float(settings.SNAPSHOT_REFRESH_S) + 1.0
    return replace(view, step_started_at=view.step_started_at + timedelta(seconds=grace))


def _load_states(experiment_id: int) -> dict[tuple[str, str], ArmState]:
    return {
        (row.metric_key, row.arm): ArmState(
            looks=row.looks,
            max_log_e_value=row.max_log_e_value,
            min_p_value=row.min_p_value,
            lower=row.lower,
            upper=row.upper,
            empty_intersection=row.empty_intersection,
            fired=row.fired,
        )
        for row in SequentialState.objects.filter(experiment_id=experiment_id)
    }


def _save_states(
    experiment_id: int,
    old: dict[tuple[str, str], ArmState],
    new: dict[tuple[str, str], ArmState],
) -> None:
    for (metric_key, arm), state in new.items():
        if old.get((metric_key, arm)) == state:
            continue
        SequentialState.objects.update_or_create(
            experiment_id=experiment_id,
            metric_key=metric_key,
            arm=arm,
            defaults={
                "looks": state.looks,
                "max_log_e_value": state.max_log_e_value,
                "min_p_value": state.min_p_value,
                "lower": state.lower,
                "upper": state.upper,
                "empty_intersection": state.empty_intersection,
                "fired": state.fired,
            },
        )


def _alert(
    view: ExperimentView, kind: str, action: str, reason: str, dedupe: str, **details: Any
) -> None:
    payload = alerts.alert_payload(
        kind=kind,
        experiment_key=view.key,
        experiment_name=view.name,
        action=action,
        reason=reason,
        details=details,
    )
    alerts.alert_enqueue(experiment_id=view.id, kind=kind, payload=payload, dedupe=dedupe)


def _rollback(view: ExperimentView, result: ExperimentAnalysis) -> bool:
    breach = result.breach
    cause = "guardrail" if breach is not None else "health"
    evidence: dict[str, Any] = (
        breach.evidence() if breach is not None else {"health": result.health.as_json()}
    )
    try:
        transition = experiment_services.experiment_rollback(
            actor=ACTOR, key=view.key, reason=result.reason, evidence=evidence
        )
    except (InvalidTransition, NotFound) as exc:
        logger.info("rollback of %s not possible: %s", view.key, exc)
        return False
    if not transition.changed:
        return False
    metrics.ROLLBACKS.labels(cause).inc()
    details: dict[str, Any] = {}
    if breach is not None:
        details = {**breach.evidence(), "metric_name": breach.name}
    _alert(
        view,
        "rollback",
        "rolled back: all traffic goes to control",
        result.reason,
        f"rollback:{view.id}",
        **details,
    )
    return True


def _advance(view: ExperimentView, result: ExperimentAnalysis) -> str | None:
    position = view.ramp_position or 0
    evidence = {
        "from_position": position,
        "exposures": result.exposures,
        "reason": result.reason,
    }
    try:
        transition = experiment_services.experiment_advance_ramp(
            actor=ACTOR,
            key=view.key,
            from_position=position,
            reason=result.reason,
            evidence=evidence,
        )
    except (InvalidTransition, NotFound) as exc:
        logger.info("ramp step of %s not possible: %s", view.key, exc)
        return None
    if not transition.changed:
        return None
    completed = transition.experiment.status == "completed"
    kind = "complete" if completed else "advance"
    metrics.RAMP_STEPS.labels(kind).inc()
    steps = view.ramp_steps
    if completed:
        action = "completed: the canary is the new control"
    else:
        action = f"advanced to step {position + 1} ({steps[position + 1].canary_share:.0%})"
    _alert(
        view,
        kind,
        action,
        result.reason,
        f"{kind}:{view.id}:{position}",
        from_position=position,
        exposures=result.exposures,
    )
    return kind


def _health_alerts(view: ExperimentView, state: AnalysisState, result: ExperimentAnalysis) -> None:
    """Alert once when health starts failing (a new episode), not at every run."""
    failing = result.health.failing
    # A rollback because of health sends its own alert.
    if failing and not state.health_failing and result.decision != "rollback":
        state.health_episode += 1
        held = result.decision == "hold"
        _alert(
            view,
            "hold" if held else "health_warning",
            "ramp held, no rollback" if held else "alert only (on_health_failure = warn)",
            "; ".join(result.health.problems),
            f"health:{view.id}:{state.health_episode}",
            health=result.health.as_json(),
        )
    state.health_failing = failing


def analysis_run(*, experiment_id: int, now: datetime | None = None) -> RunResult | None:
    """Analyse one running experiment now and act on the result; None if there is nothing to do.

    Idempotent: a missing or no longer running experiment is a no-op.
    """
    started = time.perf_counter()
    found = experiment_selectors.experiment_view_by_id(experiment_id=experiment_id)
    if found is None:
        metrics.ANALYSIS_RUNS.labels("skipped").inc()
        return None
    with log_context(experiment=found.key):
        return _analysis_run_logged(experiment_id, now, started)


def _analysis_run_logged(
    experiment_id: int, now: datetime | None, started: float
) -> RunResult | None:
    try:
        with transaction.atomic():
            state, _ = AnalysisState.objects.get_or_create(experiment_id=experiment_id)
            state = AnalysisState.objects.select_for_update().get(pk=state.pk)
            # Read the experiment under the lock: a racing worker may have just acted.
            view = experiment_selectors.experiment_view_by_id(experiment_id=experiment_id)
            if view is None or view.status != "running":
                metrics.ANALYSIS_RUNS.labels("skipped").inc()
                return None
            result = _run_locked(view, state, now or timezone.now())
    except Exception:
        metrics.ANALYSIS_RUNS.labels("error").inc()
        raise
    finally:
        metrics.ANALYSIS_RUN_SECONDS.observe(time.perf_counter() - started)
    metrics.ANALYSIS_RUNS.labels(result.snapshot.decision).inc()
    return result


def schedule_fold(experiment_id: int) -> None:
    """Ask a worker to fold the event backlog (after commit); beat's next run retries."""
    try:
        fold_task.delay(experiment_id=experiment_id)
    except Exception as exc:  # a broker outage must not fail the committed analysis
        logger.warning("could not enqueue the event fold (%s)", type(exc).__name__)


def _run_locked(view: ExperimentView, state: AnalysisState, now: datetime) -> RunResult:
    note_event_horizon(state=state)
    if 0 < events_to_fold(state) <= INLINE_FOLD:
        fold_unit_events(state=state, event_windows=event_windows(view), limit=INLINE_FOLD)
    if events_to_fold(state) > 0:
        experiment_id = view.id
        transaction.on_commit(lambda: schedule_fold(experiment_id))
    aggregates = aggregate(experiment=_step_view(view), state=state, now=now)
    if view.kind == "canary" and state.srm_ramp_position != view.ramp_position:
        state.srm_max_log_e_value = 0.0
        state.srm_ramp_position = view.ramp_position
    old_states = _load_states(view.id)
    control, treatments = arms(view)
    # Rate and latency quantile guardrails take the user as the unit (STATS.md 12.1).
    rate_bets: dict[tuple[str, str], UserRateBets | UserQuantileBets] = dict(
        rate_bets_update(view, control=control, treatments=treatments, now=now.timestamp())
    )
    rate_bets.update(
        quantile_bets_update(
            view,
            control=control,
            treatments=treatments,
            latency_windows=aggregates.latency_windows,
            now=now.timestamp(),
            ttft_windows={arm: totals.ttft_windows for arm, totals in aggregates.llm.items()},
        )
    )
    result = analyse(
        view,
        aggregates,
        states=old_states,
        previous_srm_max_log_e_value=state.srm_max_log_e_value,
        now=now,
        health_settings=health_settings(),
        rate_bets=rate_bets,
        user_latency=user_latency(view, now=now.timestamp()),
        user_llm=user_llm_means(view, now=now.timestamp()),
    )
    drift = prediction_drift_update(view, control=control, treatments=treatments)
    drift_report = drift_json(view, drift, control=control, treatments=treatments) if drift else {}
    result = drift_decided(view, result, drift_report.get("prediction_drift"))
    inputs_report = input_drift_report(view, now=now) or {}
    result = input_drift_decided(result, inputs_report.get("input_drift"))
    _save_states(view.id, old_states, result.states)
    state.srm_max_log_e_value = result.health.srm_max_log_e_value
    decision = result.decision
    acted = False
    if decision == "rollback":
        acted = _rollback(view, result)
    elif decision == "advance":
        taken = _advance(view, result)
        acted = taken is not None
        decision = taken or "continue"
    _health_alerts(view, state, result)
    if any(variant.is_shadow for variant in view.variants):
        shadow_analyses_update(view=view, now=now)
    if drift is not None:
        drift_alert(view, drift, result, drift_report.get("prediction_drift"))
    input_drift_alerts(view, result, inputs_report.get("input_drift"))
    state.runs += 1
    state.last_run_at = now
    state.save()
    snapshot = ResultSnapshot.objects.create(
        experiment_id=view.id,
        created_at=now,
        decision=decision,
        reason=result.reason,
        health={
            **result.health.as_json(),
            **label_health_json(view, now=now),
            **drift_report,
            **inputs_report,
        },
        exposures=result.exposures,
        metrics=result.metrics,
        latency=result.latency,
    )
    return RunResult(snapshot=snapshot, analysis=result, action_taken=acted)


def analysis_run_for_key(*, key: str) -> RunResult | None:
    view = experiment_selectors.experiment_view_get(key=key)
    return analysis_run(experiment_id=view.id)


def running_experiment_ids() -> list[int]:
    return [v.id for v in experiment_selectors.experiment_views(statuses=["running"])]


# --------------------------------------------------------------------------- webhooks

_NAME = re.compile(r"\S")
MIN_SECRET_LENGTH = 16


def _check_webhook(name: str, url: str, secret: str) -> None:
    errors: dict[str, list[str]] = {}
    if not _NAME.search(name or ""):
        errors["name"] = ["This field may not be blank."]
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        errors["url"] = ["Enter an http or https URL."]
    if len(secret or "") < MIN_SECRET_LENGTH:
        errors["secret"] = [f"Use at least {MIN_SECRET_LENGTH} characters."]
    if errors:
        raise InvalidInput(errors)


def webhook_create(
    *, actor: str, name: str, url: str, secret: str, enabled: bool = True
) -> WebhookEndpoint:
    """Register a generic webhook; alerts are signed with `secret` (never shown again)."""
    _check_webhook(name, url, secret)
    endpoint = WebhookEndpoint.objects.create(name=name, url=url, secret=secret, enabled=enabled)
    logger.info("webhook %s (%s) created by %s", endpoint.pk, name, actor)
    return endpoint


def webhook_delete(*, actor: str, webhook_id: int) -> None:
    deleted, _ = WebhookEndpoint.objects.filter(pk=webhook_id).delete()
    if not deleted:
        raise NotFound("webhook", str(webhook_id))
    logger.info("webhook %s deleted by %s", webhook_id, actor)


def alert_test(*, actor: str) -> int:
    """Queue a test alert to every destination (global Slack webhook and every webhook)."""
    payload = alerts.alert_payload(
        kind="test",
        experiment_key="test",
        experiment_name="Rampart test alert",
        action="none (test)",
        reason=f"Test alert sent by {actor}: if you can read this, alerts reach you.",
    )
    with transaction.atomic():
        return alerts.alert_enqueue(
            experiment_id=None,
            kind="test",
            payload=payload,
            dedupe=f"test:{secrets.token_hex(8)}",
        )
