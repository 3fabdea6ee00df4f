"""Web UI views of experiments, metrics and API keys: parse the request, call a service, render.

Pages that need analysis results (results table, charts, health, alerts, latest decision,
webhooks) are served by `analysis.views` and pulled into these pages as htmx partials, so
this app never imports the analysis or routing apps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.timesince import timesince
from django.views.decorators.http import require_http_methods, require_POST

from experiments import selectors, services
from experiments.errors import InvalidInput, InvalidTransition, NotEditable, NotFound
from experiments.forms import ActionForm, ApiKeyForm, ExperimentEditor, MetricForm
from experiments.models import (
    AuditEntry,
    Experiment,
    ExperimentKind,
    ExperimentStatus,
    Metric,
    MetricRole,
)

S = ExperimentStatus
STATUS_FILTERS = (
    ("", "All"),
    (S.RUNNING, "Running"),
    (S.PAUSED, "Paused"),
    (S.DRAFT, "Draft"),
    (S.COMPLETED, "Completed"),
    (S.ROLLED_BACK, "Rolled back"),
)
LIVE_STATUSES = (S.RUNNING, S.PAUSED)
AUDIT_ROWS = 50


def _actor(request: HttpRequest) -> str:
    return request.user.get_username() or "web"


def _experiment_or_404(key: str) -> Experiment:
    try:
        return selectors.experiment_get(key=key)
    except NotFound:
        raise Http404(f"No experiment {key!r}.") from None


# --- presentation helpers -------------------------------------------------------------


@dataclass(frozen=True)
class ArmShare:
    key: str
    share: float
    is_control: bool
    css: str

    @property
    def percent(self) -> str:
        return _format_percent(self.share)


def _format_percent(share: float) -> str:
    """12.5% / 1% / 0.1%: as many digits as the value needs, no trailing zeros."""
    text = f"{share * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def planned_split(experiment: Experiment) -> list[ArmShare]:
    """How traffic is split between the routed variants now (or, for a draft, at start).

    A canary at step s sends s of the traffic to the canaries (divided by their weights,
    equally when those are all zero) and the rest to control; an A/B test follows its
    weights. A rolled-back experiment sends everything to control, a completed one to its
    winner.
    """
    variants = [v for v in experiment.variants.all() if not v.is_shadow]
    css = {v.key: f"arm-{i % 6}" for i, v in enumerate(variants)}
    shares: dict[str, float]
    if experiment.status == S.ROLLED_BACK:
        shares = {v.key: 1.0 if v.is_control else 0.0 for v in variants}
    elif experiment.status == S.COMPLETED and experiment.winner_id:
        shares = {v.key: 1.0 if v.pk == experiment.winner_id else 0.0 for v in variants}
    elif experiment.kind == ExperimentKind.CANARY:
        steps = list(experiment.ramp_steps.all())
        position = experiment.ramp_position or 0
        share = steps[min(position, len(steps) - 1)].canary_share if steps else 0.0
        canaries = [v for v in variants if not v.is_control]
        total_weight = sum(v.weight for v in canaries)
        shares = {}
        for v in variants:
            if v.is_control:
                shares[v.key] = 1.0 - share
            elif total_weight > 0:
                shares[v.key] = share * v.weight / total_weight
            else:
                shares[v.key] = share / len(canaries)
    else:
        shares = {v.key: v.weight for v in variants}
    return [ArmShare(v.key, shares[v.key], v.is_control, css[v.key]) for v in variants]


@dataclass(frozen=True)
class StepState:
    number: int
    share: str
    min_duration_s: int
    min_exposures_per_arm: int
    state: str  # done | current | stopped | next

    @property
    def duration_text(self) -> str:
        return _format_duration(self.min_duration_s)


def time_ago(moment: datetime | None, now: datetime) -> str:
    """“just now” under a minute (timesince would say “0 minutes”), else “3 hours ago”."""
    if moment is None:
        return ""
    if (now - moment).total_seconds() < 60:
        return "just now"
    return f"{timesince(moment, now)} ago"


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h" + (f" {rest // 60} min" if rest // 60 else "")


def ramp_states(experiment: Experiment) -> list[StepState]:
    steps = list(experiment.ramp_steps.all())
    position = experiment.ramp_position
    finished = experiment.status == S.COMPLETED
    states = []
    for step in steps:
        if finished or (position is not None and step.position < position):
            state = "done"
        elif position is not None and step.position == position and experiment.status != S.DRAFT:
            state = "stopped" if experiment.status == S.ROLLED_BACK else "current"
        else:
            state = "next"
        states.append(
            StepState(
                number=step.position + 1,
                share=_format_percent(step.canary_share),
                min_duration_s=step.min_duration_s,
                min_exposures_per_arm=step.min_exposures_per_arm,
                state=state,
            )
        )
    return states


@dataclass(frozen=True)
class StepClock:
    """How long the current ramp step has run against its minimum duration."""

    elapsed_text: str
    minimum_text: str
    fraction: float


def step_clock(experiment: Experiment, now: datetime) -> StepClock | None:
    if experiment.kind != ExperimentKind.CANARY or experiment.status not in LIVE_STATUSES:
        return None
    steps = list(experiment.ramp_steps.all())
    if experiment.ramp_position is None or experiment.step_started_at is None or not steps:
        return None
    step = steps[min(experiment.ramp_position, len(steps) - 1)]
    elapsed = max(0.0, (now - experiment.step_started_at).total_seconds())
    fraction = 1.0 if step.min_duration_s == 0 else min(1.0, elapsed / step.min_duration_s)
    return StepClock(
        elapsed_text=_format_duration(elapsed),
        minimum_text=_format_duration(step.min_duration_s),
        fraction=fraction,
    )


def guardrail_phrase(name: str, direction: str, margin: float) -> str:
    """“p95 latency may rise at most 10%” for a lower-is-better metric with margin 0.1."""
    verb = "rise" if direction == "lower" else "fall"
    if margin <= 0:
        return f"{name} may not {verb} at all"
    return f"{name} may {verb} at most {_format_percent(margin)}"


ACTION_LABELS = {
    "create": "Created the experiment",
    "update": "Edited the settings",
    "start": "Started",
    "pause": "Paused",
    "resume": "Resumed",
    "complete": "Completed",
    "rollback": "Rolled back",
    "advance": "Advanced the ramp",
}


@dataclass(frozen=True)
class AuditLine:
    at: datetime
    actor: str
    what: str
    reason: str
    evidence: dict[str, Any] | None
    tone: str  # ok | warn | bad | info | neutral


def audit_lines(entries: Sequence[AuditEntry]) -> list[AuditLine]:
    tones = {"rollback": "bad", "pause": "warn", "complete": "ok", "advance": "info"}
    lines = []
    for entry in entries:
        what = ACTION_LABELS.get(entry.action, entry.action)
        after = entry.after or {}
        if entry.action == "advance" and "canary_share" in after:
            what = f"Advanced the ramp to {_format_percent(float(after['canary_share']))}"
        elif entry.action == "complete" and after.get("winner"):
            what = f"Completed, winner {after['winner']}"
        elif entry.action == "update" and after.get("fields"):
            what = f"Edited {', '.join(after['fields'])}"
        evidence = after.get("evidence")
        lines.append(
            AuditLine(
                at=entry.created_at,
                actor=entry.actor,
                what=what,
                reason=entry.reason,
                evidence=evidence if isinstance(evidence, dict) else None,
                tone=tones.get(entry.action, "neutral"),
            )
        )
    return lines


@dataclass(frozen=True)
class ExperimentRow:
    experiment: Experiment
    split: list[ArmShare]
    step_text: str
    started_text: str


def ramp_text(experiment: Experiment) -> str:
    """Where a canary is on its ramp: “Step 2 of 6 · 5%”, “Stopped at step 2 of 6”."""
    steps = list(experiment.ramp_steps.all())
    if experiment.kind != ExperimentKind.CANARY or not steps:
        return ""
    if experiment.status == S.DRAFT or experiment.ramp_position is None:
        return f"{len(steps)} steps planned"
    position = min(experiment.ramp_position, len(steps) - 1)
    where = f"step {position + 1} of {len(steps)}"
    if experiment.status == S.ROLLED_BACK:
        return f"Stopped at {where}"
    if experiment.status == S.COMPLETED:
        return "All steps done" if position == len(steps) - 1 else f"Promoted at {where}"
    return f"Step {position + 1} of {len(steps)} · {_format_percent(steps[position].canary_share)}"


def _row(experiment: Experiment, now: datetime) -> ExperimentRow:
    return ExperimentRow(
        experiment=experiment,
        split=planned_split(experiment),
        step_text=ramp_text(experiment),
        started_text=time_ago(experiment.started_at, now),
    )


@dataclass(frozen=True)
class ActionSpec:
    name: str
    label: str
    title: str
    explanation: str
    button_class: str
    reason: str  # none | optional | required: whether the service records a reason
    allowed: Callable[[Experiment], bool]


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "start",
            "Start",
            "Start this experiment?",
            "Traffic starts flowing to the variants at once; a canary starts at its first "
            "ramp step. Variants, metrics and the unit attribute are frozen from now on.",
            "btn-primary",
            "none",
            lambda e: e.status == S.DRAFT,
        ),
        ActionSpec(
            "pause",
            "Pause",
            "Pause this experiment?",
            "While paused every user gets control; assignments are kept and resume "
            "unchanged. A paused canary restarts its current step's minimum duration.",
            "",
            "optional",
            lambda e: e.status == S.RUNNING,
        ),
        ActionSpec(
            "resume",
            "Resume",
            "Resume this experiment?",
            "Users get their variants again, exactly as before the pause.",
            "btn-primary",
            "none",
            lambda e: e.status == S.PAUSED,
        ),
        ActionSpec(
            "advance",
            "Advance ramp",
            "Advance the canary to its next ramp step?",
            "More users move from control to the canary now, without waiting for the "
            "minimum duration or exposures. At the last step this completes the canary.",
            "",
            "optional",
            lambda e: e.status == S.RUNNING and e.kind == ExperimentKind.CANARY,
        ),
        ActionSpec(
            "rollback",
            "Roll back",
            "Roll back this experiment?",
            "Every user goes back to control at once and the experiment ends; it cannot be "
            "restarted. The reason goes into the audit log.",
            "btn-danger",
            "required",
            lambda e: e.status in LIVE_STATUSES,
        ),
        ActionSpec(
            "complete",
            "Complete",
            "Complete this experiment and ship a winner?",
            "Every user gets the winner from now on and the experiment ends.",
            "",
            "optional",
            lambda e: e.status in LIVE_STATUSES,
        ),
    )
}


def _action_form(spec: ActionSpec, experiment: Experiment, data: Any = None) -> ActionForm:
    winners: list[tuple[str, str]] = []
    if spec.name == "complete":
        routed = [v for v in experiment.variants.all() if not v.is_shadow]
        # Offer the canary first: completing is usually shipping the new version.
        routed.sort(key=lambda v: v.is_control)
        winners = [(v.key, f"{v.key} (control)" if v.is_control else v.key) for v in routed]
    return ActionForm(
        data,
        reason=spec.reason,
        winner_choices=winners,
        auto_id=f"id_{spec.name}_%s",
    )


# --- experiments ----------------------------------------------------------------------


@login_required
def experiment_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    if status not in S.values:
        status = ""
    counts = dict(
        Experiment.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n")
    )
    filters = [
        {
            "value": value,
            "label": label,
            "count": sum(counts.values()) if not value else counts.get(value, 0),
            "current": value == status,
        }
        for value, label in STATUS_FILTERS
    ]
    now = timezone.now()
    rows = [_row(e, now) for e in selectors.experiment_list(status=status or None)]
    return render(
        request,
        "experiments/list.html",
        {
            "nav": "experiments",
            "rows": rows,
            "filters": filters,
            "status": status,
            "keys": ",".join(r.experiment.key for r in rows),
        },
    )


def _metric_catalogue() -> list[Metric]:
    return list(selectors.metric_list())


def _editor_context(editor: ExperimentEditor, **extra: Any) -> dict[str, Any]:
    return {
        "nav": "experiments",
        "editor": editor,
        "form": editor.form,
        "metric_options_json": {
            m.key: {"name": m.name, "direction": m.direction} for m in editor.metric_options
        },
        "slack_default_configured": bool(settings.SLACK_WEBHOOK_URL),
        **extra,
    }


@login_required
@require_http_methods(["GET", "POST"])
def experiment_create(request: HttpRequest) -> HttpResponse:
    metrics = _metric_catalogue()
    if request.method == "GET":
        editor = ExperimentEditor(metrics=metrics)
        return render(request, "experiments/form.html", _editor_context(editor, creating=True))
    editor = ExperimentEditor(request.POST, metrics=metrics)
    if editor.is_valid():
        try:
            experiment = services.experiment_create(actor=_actor(request), **editor.create_kwargs())
        except InvalidInput as exc:
            editor.show_errors(exc.errors)
        else:
            messages.success(
                request, f"Created “{experiment.name}” as a draft. Start it when ready."
            )
            return redirect("experiments:detail", key=experiment.key)
    return render(
        request, "experiments/form.html", _editor_context(editor, creating=True), status=400
    )


@login_required
@require_http_methods(["GET", "POST"])
def experiment_edit(request: HttpRequest, key: str) -> HttpResponse:
    experiment = _experiment_or_404(key)
    metrics = _metric_catalogue()
    context = {"creating": False, "experiment": experiment}
    if request.method == "GET":
        editor = ExperimentEditor(experiment=experiment, metrics=metrics)
        return render(request, "experiments/form.html", _editor_context(editor, **context))
    editor = ExperimentEditor(request.POST, experiment=experiment, metrics=metrics)
    if editor.is_valid():
        changes = editor.update_kwargs()
        if not changes:
            messages.info(request, "Nothing changed.")
            return redirect("experiments:detail", key=key)
        try:
            services.experiment_update(actor=_actor(request), key=key, **changes)
        except InvalidInput as exc:
            editor.show_errors(exc.errors)
        except NotEditable as exc:
            editor.show_not_editable(exc.status, exc.fields)
        else:
            messages.success(request, "Saved. Edges pick the change up within seconds.")
            return redirect("experiments:detail", key=key)
    return render(request, "experiments/form.html", _editor_context(editor, **context), status=400)


def _detail_context(experiment: Experiment) -> dict[str, Any]:
    now = timezone.now()
    available = [spec for spec in ACTIONS.values() if spec.allowed(experiment)]
    return {
        "nav": "experiments",
        "experiment": experiment,
        "live": experiment.status in LIVE_STATUSES,
        "split": planned_split(experiment),
        "steps": ramp_states(experiment),
        "clock": step_clock(experiment, now),
        "running_for": timesince(experiment.started_at, now)
        if experiment.started_at and (now - experiment.started_at).total_seconds() >= 60
        else "less than a minute",
        "actions": [(spec, _action_form(spec, experiment)) for spec in available],
        "variants": [
            {"variant": v, "weight": _format_percent(v.weight)} for v in experiment.variants.all()
        ],
        "coverage": _format_percent(experiment.coverage),
        "slack_default_configured": bool(settings.SLACK_WEBHOOK_URL),
        "metric_uses": [
            {
                "use": use,
                "phrase": guardrail_phrase(use.metric.name, use.metric.direction, use.margin)
                if use.role == MetricRole.GUARDRAIL
                else "",
            }
            for use in experiment.metrics.all()
        ],
        "seen": _seen_token(experiment),
    }


def _seen_token(experiment: Experiment) -> str:
    """What the page was rendered from; a poll that sees a different token reloads it."""
    return f"{experiment.status}:{experiment.ramp_position}"


@login_required
def experiment_detail(request: HttpRequest, key: str) -> HttpResponse:
    experiment = _experiment_or_404(key)
    context = _detail_context(experiment)
    context["audit"] = audit_lines(list(experiment.audit.all()[:AUDIT_ROWS]))
    return render(request, "experiments/detail.html", context)


@login_required
def experiment_overview(request: HttpRequest, key: str) -> HttpResponse:
    """The live header of the experiment page (ramp, split, step clock), polled by htmx.

    When the status or ramp step changed since the page was drawn (an automatic rollback,
    a ramp advance by the analysis worker), the whole page reloads so that its action
    buttons match the new state.
    """
    experiment = _experiment_or_404(key)
    seen = request.GET.get("seen")
    if seen and seen != _seen_token(experiment) and request.headers.get("HX-Request"):
        response = HttpResponse(status=204)
        response["HX-Refresh"] = "true"
        return response
    return render(request, "experiments/_overview.html", _detail_context(experiment))


@login_required
def experiment_audit(request: HttpRequest, key: str) -> HttpResponse:
    experiment = _experiment_or_404(key)
    return render(
        request,
        "experiments/_audit.html",
        {
            "experiment": experiment,
            "live": experiment.status in LIVE_STATUSES,
            "audit": audit_lines(list(experiment.audit.all()[:AUDIT_ROWS])),
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def experiment_action(request: HttpRequest, key: str, action: str) -> HttpResponse:
    """Confirm (GET) and perform (POST) one lifecycle action through the services."""
    spec = ACTIONS.get(action)
    if spec is None:
        raise Http404(f"No action {action!r}.")
    experiment = _experiment_or_404(key)
    if request.method == "GET":
        return render(
            request,
            "experiments/confirm.html",
            {
                "nav": "experiments",
                "experiment": experiment,
                "spec": spec,
                "form": _action_form(spec, experiment),
            },
        )
    form = _action_form(spec, experiment, request.POST)
    if form.is_valid():
        try:
            changed = _perform(spec.name, _actor(request), key, form.cleaned_data)
        except InvalidTransition as exc:
            messages.error(
                request,
                f"Could not {spec.label.lower()}: the experiment is "
                f"{exc.current.replace('_', ' ')}, which does not allow it.",
            )
            return redirect("experiments:detail", key=key)
        except InvalidInput as exc:
            for name, errors in exc.errors.items():
                for error in errors:
                    form.add_error(name if name in form.fields else None, error)
        else:
            if changed:
                messages.success(request, _done_message(spec.name, form.cleaned_data))
            else:
                messages.info(request, "Nothing to do: the experiment was already there.")
            return redirect("experiments:detail", key=key)
    return render(
        request,
        "experiments/confirm.html",
        {"nav": "experiments", "experiment": experiment, "spec": spec, "form": form},
        status=400,
    )


def _perform(action: str, actor: str, key: str, data: dict[str, Any]) -> bool:
    reason = data.get("reason", "")
    if action == "start":
        result = services.experiment_start(actor=actor, key=key)
    elif action == "pause":
        result = services.experiment_pause(actor=actor, key=key, reason=reason)
    elif action == "resume":
        result = services.experiment_resume(actor=actor, key=key)
    elif action == "advance":
        result = services.experiment_advance_ramp(actor=actor, key=key, reason=reason)
    elif action == "rollback":
        result = services.experiment_rollback(actor=actor, key=key, reason=reason)
    else:
        result = services.experiment_complete(
            actor=actor, key=key, winner_key=data["winner"], reason=reason
        )
    return result.changed


def _done_message(action: str, data: dict[str, Any]) -> str:
    return {
        "start": "Started. Traffic is flowing; results appear as data arrives.",
        "pause": "Paused. Every user gets control until you resume.",
        "resume": "Resumed.",
        "advance": "Advanced to the next ramp step.",
        "rollback": "Rolled back. Every user gets control again.",
        "complete": f"Completed. Every user now gets {data.get('winner', 'the winner')}.",
    }[action]


# --- metric catalogue -----------------------------------------------------------------


@login_required
def metric_list(request: HttpRequest) -> HttpResponse:
    metrics = selectors.metric_list().annotate(uses_count=Count("uses"))
    return render(request, "experiments/metric_list.html", {"nav": "metrics", "metrics": metrics})


@login_required
@require_http_methods(["GET", "POST"])
def metric_create(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        form = MetricForm(initial={"direction": "higher", "kind": "binomial"})
        return render(request, "experiments/metric_form.html", {"nav": "metrics", "form": form})
    form = MetricForm(request.POST)
    if form.is_valid():
        try:
            metric = services.metric_create(
                actor=_actor(request), key=form.cleaned_data["key"], **form.service_values()
            )
        except InvalidInput as exc:
            form.show_errors(exc.errors)
        else:
            messages.success(request, f"Added metric “{metric.name}” to the catalogue.")
            return redirect("experiments:metric-list")
    return render(
        request, "experiments/metric_form.html", {"nav": "metrics", "form": form}, status=400
    )


@login_required
@require_http_methods(["GET", "POST"])
def metric_edit(request: HttpRequest, key: str) -> HttpResponse:
    try:
        metric = selectors.metric_get(key=key)
    except NotFound:
        raise Http404(f"No metric {key!r}.") from None
    initial = {name: getattr(metric, name) for name in ("key", *services.METRIC_FIELDS)}
    context: dict[str, Any] = {"nav": "metrics", "metric": metric}
    if request.method == "GET":
        form = MetricForm(initial=initial, editing=True)
        return render(request, "experiments/metric_form.html", {**context, "form": form})
    form = MetricForm(request.POST, initial=initial, editing=True)
    if form.is_valid():
        changed = {
            name: value
            for name, value in form.service_values().items()
            if value != getattr(metric, name)
        }
        try:
            if changed:
                services.metric_update(actor=_actor(request), key=key, **changed)
        except InvalidInput as exc:
            form.show_errors(exc.errors)
        else:
            messages.success(request, f"Saved metric “{form.cleaned_data['name']}”.")
            return redirect("experiments:metric-list")
    return render(request, "experiments/metric_form.html", {**context, "form": form}, status=400)


# --- settings: API keys and alert destinations ----------------------------------------


def _settings_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {
        "nav": "settings",
        "keys": selectors.api_key_list(),
        "key_form": ApiKeyForm(),
        "slack_default_configured": bool(settings.SLACK_WEBHOOK_URL),
        "slack_experiments": Experiment.objects.exclude(slack_webhook_url="")
        .order_by("key")
        .values_list("key", flat=True),
        **extra,
    }


@login_required
def settings_page(request: HttpRequest) -> HttpResponse:
    return render(request, "experiments/settings.html", _settings_context(request))


@login_required
@require_POST
def api_key_create(request: HttpRequest) -> HttpResponse:
    form = ApiKeyForm(request.POST)
    if form.is_valid():
        try:
            key, secret = services.api_key_create(
                actor=_actor(request),
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
            )
        except InvalidInput as exc:
            form.show_errors(exc.errors)
        else:
            # The secret is rendered into this response only: it is never stored, never put
            # in the session or a cookie, and the page must not be cached.
            response = render(
                request,
                "experiments/settings.html",
                _settings_context(request, new_key=key, new_secret=secret),
            )
            response["Cache-Control"] = "no-store"
            return response
    return render(
        request, "experiments/settings.html", _settings_context(request, key_form=form), status=400
    )


@login_required
@require_http_methods(["GET", "POST"])
def api_key_revoke(request: HttpRequest, prefix: str) -> HttpResponse:
    key = selectors.api_key_list().filter(prefix=prefix).first()
    if key is None:
        raise Http404(f"No API key {prefix!r}.")
    if request.method == "GET":
        return render(request, "experiments/api_key_revoke.html", {"nav": "settings", "key": key})
    services.api_key_revoke(actor=_actor(request), prefix=prefix)
    messages.success(
        request, f"Revoked key “{key.name}” ({prefix}). Edges reject it within seconds."
    )
    return redirect(reverse("experiments:settings") + "#api-keys")
