"""Web UI views of experiments, metrics and API keys: parse the request, call a service, render.

Pages that need analysis results (results table, charts, health, alerts, latest decision,
webhooks) are served by `analysis.views` and pulled into these pages as htmx partials, so
this app never imports the analysis or routing apps.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.timesince import timesince
from django.views.decorators.http import require_http_methods, require_POST

from experiments import roles, selectors, services
from experiments.errors import InvalidInput, InvalidTransition, NotEditable, NotFound
from experiments.forms import ActionForm, ApiKeyForm, ExperimentEditor, MetricForm
from experiments.models import ApiKey, Experiment, ExperimentStatus, Metric, MetricRole
from experiments.presentation import (
    ACTIONS,
    LIVE_STATUSES,
    ActionSpec,
    ExperimentRow,
    audit_lines,
    format_percent,
    guardrail_phrase,
    planned_split,
    ramp_states,
    ramp_text,
    step_clock,
    time_ago,
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
AUDIT_ROWS = 50


def _actor(request: HttpRequest) -> str:
    return request.user.get_username() or "web"


def _experiment_or_404(key: str) -> Experiment:
    try:
        return selectors.experiment_get(key=key)
    except NotFound:
        raise Http404(f"No experiment {key!r}.") from None


def _row(experiment: Experiment, now: datetime) -> ExperimentRow:
    return ExperimentRow(
        experiment=experiment,
        split=planned_split(experiment),
        step_text=ramp_text(experiment),
        started_text=time_ago(experiment.started_at, now),
    )


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


@roles.role_required(roles.READ)
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


@roles.role_required(roles.CREATE_EXPERIMENTS)
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


@roles.role_required(roles.EDIT_EXPERIMENTS)
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


def _detail_context(experiment: Experiment, user: Any) -> dict[str, Any]:
    now = timezone.now()
    # Only the actions this user's role may take get a button (and a dialog).
    may_run = user.has_perm(roles.RUN_EXPERIMENTS)
    available = [spec for spec in ACTIONS.values() if may_run and spec.allowed(experiment)]
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
            {"variant": v, "weight": format_percent(v.weight)} for v in experiment.variants.all()
        ],
        "coverage": format_percent(experiment.coverage),
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


@roles.role_required(roles.READ)
def experiment_detail(request: HttpRequest, key: str) -> HttpResponse:
    experiment = _experiment_or_404(key)
    context = _detail_context(experiment, request.user)
    context["audit"] = audit_lines(list(experiment.audit.all()[:AUDIT_ROWS]))
    return render(request, "experiments/detail.html", context)


@roles.role_required(roles.READ)
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
    return render(request, "experiments/_overview.html", _detail_context(experiment, request.user))


@roles.role_required(roles.READ)
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


@roles.role_required(roles.RUN_EXPERIMENTS)
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


@roles.role_required(roles.READ)
def metric_list(request: HttpRequest) -> HttpResponse:
    metrics = selectors.metric_list().annotate(uses_count=Count("uses"))
    return render(request, "experiments/metric_list.html", {"nav": "metrics", "metrics": metrics})


@roles.role_required(roles.CREATE_METRICS)
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


@roles.role_required(roles.EDIT_METRICS)
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


def _may_grant_manage(request: HttpRequest) -> bool:
    return request.user.has_perm(roles.GRANT_MANAGE_SCOPE)


def _keys_with_warnings(keys: list[ApiKey]) -> list[tuple[ApiKey, str]]:
    """Each key with what revoking it would risk (the last active manage key)."""
    active = [k for k in keys if k.revoked_at is None]
    return [(key, " ".join(services.api_key_lockout_warnings(key, active=active))) for key in keys]


def _settings_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {
        "nav": "settings",
        "keys": _keys_with_warnings(list(selectors.api_key_list())),
        "key_form": ApiKeyForm(may_grant_manage=_may_grant_manage(request)),
        "slack_default_configured": bool(settings.SLACK_WEBHOOK_URL),
        "slack_experiments": Experiment.objects.exclude(slack_webhook_url="")
        .order_by("key")
        .values_list("key", flat=True),
        **extra,
    }


@roles.role_required(roles.READ)
def settings_page(request: HttpRequest) -> HttpResponse:
    return render(request, "experiments/settings.html", _settings_context(request))


@roles.role_required(roles.CREATE_KEYS)
@require_POST
def api_key_create(request: HttpRequest) -> HttpResponse:
    form = ApiKeyForm(request.POST, may_grant_manage=_may_grant_manage(request))
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


@roles.role_required(roles.REVOKE_KEYS)
@require_http_methods(["GET", "POST"])
def api_key_revoke(request: HttpRequest, prefix: str) -> HttpResponse:
    key = selectors.api_key_list().filter(prefix=prefix).first()
    if key is None:
        raise Http404(f"No API key {prefix!r}.")
    active = list(selectors.api_key_list().filter(revoked_at__isnull=True))
    warning = " ".join(services.api_key_lockout_warnings(key, active=active))
    if request.method == "GET":
        return render(
            request,
            "experiments/api_key_revoke.html",
            {"nav": "settings", "key": key, "warning": warning},
        )
    # The dialog or this page, which show the warning, are the confirmation; a person logged
    # in keeps access whatever happens to the keys.
    services.api_key_revoke(actor=_actor(request), prefix=prefix, confirmed=True)
    messages.success(
        request, f"Revoked key “{key.name}” ({prefix}). Edges reject it within seconds."
    )
    if warning:
        messages.warning(request, warning)
    return redirect(reverse("experiments:settings") + "#api-keys")
