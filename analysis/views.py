"""Web UI parts that need analysis results: results table, charts, health, alerts, webhooks.

The experiment pages (served by `experiments.views`) pull these in as htmx partials and, for
the charts, as JSON. Everything here reads through selectors: analysis results from
`analysis.selectors`, experiments from `experiments.selectors` (frozen views, never models),
live exposure counts from `routing.selectors`; webhooks change through `analysis.services`.
Webhook URLs and secrets never reach a page: a webhook is shown by its name and host.
Labels, number formatting and the chart series come from `analysis.presentation`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from analysis import selectors, services
from analysis.drift_presentation import drift_panel, input_panel
from analysis.llm_presentation import llm_lines, llm_series
from analysis.presentation import (
    ALERT_STATUSES,
    DECISIONS,
    SHORT_DECISIONS,
    AlertLine,
    Tone,
    arm_lines,
    chart_series,
    destination_name,
    health_warnings,
    label_lines,
    metric_lines,
    time_ago,
    tone_for,
)
from analysis.shadow_presentation import shadow_lines, tolerance_text
from experiments import selectors as experiment_selectors
from experiments.contracts import ExperimentView
from experiments.errors import InvalidInput, NotFound
from experiments.roles import CREATE_EXPERIMENTS, role_required
from routing import selectors as routing_selectors

ENDED_STATUSES = ("completed", "rolled_back")
# Decisions that end an experiment; any other decision is stale once it has ended.
FINAL_DECISIONS = ("rollback", "complete")
HISTORY_POINTS = 500
# Analysis runs the input-drift sparklines show.
INPUT_DRIFT_POINTS = 60
ALERT_ROWS = 50

_URL = re.compile(r"https?://\S+")

# Django permissions of the views (granted through roles, see experiments.roles).
READ_RESULTS = "analysis.view_resultsnapshot"
READ_WEBHOOKS = "analysis.view_webhookendpoint"
ADD_WEBHOOKS = "analysis.add_webhookendpoint"
DELETE_WEBHOOKS = "analysis.delete_webhookendpoint"
# Sending a test alert exercises the webhooks: part of managing them.
TEST_WEBHOOKS = "analysis.change_webhookendpoint"


def _view_or_404(key: str) -> ExperimentView:
    try:
        return experiment_selectors.experiment_view_get(key=key)
    except NotFound:
        raise Http404(f"No experiment {key!r}.") from None


# --- experiment page partials -----------------------------------------------------------


@role_required(READ_RESULTS)
def results(request: HttpRequest, key: str) -> HttpResponse:
    """Decision, health warnings, per-arm traffic and latency, and the results table."""
    view = _view_or_404(key)
    snapshot = selectors.latest_result(experiment_id=view.id)
    exposures = routing_selectors.exposure_counts(view.id)
    context: dict[str, Any] = {
        "view": view,
        "snapshot": snapshot,
        "arms": arm_lines(view, exposures, snapshot.latency if snapshot else {}),
        "llm": llm_lines(view, snapshot.latency if snapshot else {}),
        "analysis_interval_s": int(settings.ANALYSIS_INTERVAL_S),
    }
    if any(variant.is_shadow for variant in view.variants):
        context["shadows"] = shadow_lines(view)
        context["shadow_tolerances"] = tolerance_text()
        context["may_start_canary"] = request.user.has_perm(CREATE_EXPERIMENTS)
    if snapshot is not None:
        decision = tone_for(DECISIONS, snapshot.decision)
        if view.status in ENDED_STATUSES and snapshot.decision not in FINAL_DECISIONS:
            # The experiment ended by hand after this run: its verdict is history, not news.
            short = SHORT_DECISIONS.get(snapshot.decision, decision.label).lower()
            decision = Tone("neutral", "•", f"Last analysis before the experiment ended: {short}")
        context.update(
            analysed=time_ago(snapshot.created_at, timezone.now()),
            decision=decision,
            warnings=health_warnings(snapshot.health or {}, view.status),
            lines=metric_lines(snapshot.metrics or [], view),
            labels=label_lines(snapshot.health or {}),
            drift=drift_panel(snapshot.health or {}),
            inputs=input_panel(
                snapshot.health or {},
                [
                    past.health or {}
                    for past in selectors.result_history(
                        experiment_id=view.id, limit=INPUT_DRIFT_POINTS
                    )
                ]
                if (snapshot.health or {}).get("input_drift")
                else [],
            ),
        )
    return render(request, "analysis/_results.html", context)


@role_required(READ_RESULTS)
def chart_data(request: HttpRequest, key: str) -> JsonResponse:
    """Time series for the charts: relative lift with its always-valid interval per metric
    and treatment arm, and latency percentiles per arm, one point per analysis run."""
    view = _view_or_404(key)
    history = selectors.result_history(experiment_id=view.id, limit=HISTORY_POINTS)
    series = chart_series(view, history)
    series["llm"] = llm_series(series["arms"], history)
    return JsonResponse(series)


@role_required(READ_RESULTS)
def alerts(request: HttpRequest, key: str) -> HttpResponse:
    view = _view_or_404(key)
    names = {w.pk: w.name for w in selectors.webhook_list()}
    lines = [
        AlertLine(
            at=row.created_at,
            kind=row.kind.replace("_", " "),
            destination=destination_name(row.destination, names),
            status=tone_for(ALERT_STATUSES, row.status),
            attempts=row.attempts,
            action=str((row.payload or {}).get("action", "")),
            reason=str((row.payload or {}).get("reason", "")),
            # Delivery errors can quote the URL they failed on; URLs are secrets here.
            error=_URL.sub("[url]", row.last_error or "")[:300],
        )
        for row in selectors.alerts_for(experiment_id=view.id)[:ALERT_ROWS]
    ]
    return render(request, "analysis/_alerts.html", {"view": view, "alerts": lines})


# --- experiment list: latest decision per row --------------------------------------------


@role_required(READ_RESULTS)
def decisions(request: HttpRequest) -> HttpResponse:
    """Out-of-band swaps that fill the list page's "Latest decision" cells."""
    wanted = {k for k in request.GET.get("keys", "").split(",") if k}
    views = experiment_selectors.experiment_views(
        statuses=["running", "paused", "completed", "rolled_back"]
    )
    cells = []
    now = timezone.now()
    for view in views:
        if view.key not in wanted:
            continue
        snapshot = selectors.latest_result(experiment_id=view.id)
        if snapshot is None:
            continue
        # Once an experiment has ended, an earlier "healthy" is no longer news: only a
        # decision that ended it (an automatic rollback or completion) stays in the list.
        if view.status in ENDED_STATUSES and snapshot.decision not in FINAL_DECISIONS:
            continue
        tone = tone_for(DECISIONS, snapshot.decision)
        failing = bool(health_warnings(snapshot.health or {}, view.status))
        cells.append(
            {
                "key": view.key,
                "tone": tone.tone,
                "icon": tone.icon,
                "label": SHORT_DECISIONS.get(snapshot.decision, tone.label),
                "reason": snapshot.reason,
                "analysed": time_ago(snapshot.created_at, now),
                "health_warning": failing,
            }
        )
    return render(request, "analysis/_decisions.html", {"cells": cells})


# --- settings: generic webhooks ----------------------------------------------------------


class WebhookForm(forms.Form):
    name = forms.CharField(max_length=200, help_text="Shown in the alert log: “PagerDuty”.")
    url = forms.CharField(
        label="URL",
        max_length=500,
        widget=forms.URLInput(attrs={"autocomplete": "off"}),
        help_text="Receives every alert as signed JSON. Shown afterwards by its host only.",
    )
    secret = forms.CharField(
        max_length=200,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="Signs each delivery (X-Rampart-Signature, HMAC-SHA256). Never shown again.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The settings page also holds the API key form: ids must not collide ("id_name").
        kwargs.setdefault("auto_id", "id_webhook_%s")
        super().__init__(*args, **kwargs)

    def show_errors(self, errors: Mapping[str, Sequence[str]]) -> None:
        for name, messages_ in errors.items():
            target = name if name in self.fields else None
            for message in messages_:
                self.add_error(target, message)


def _host(url: str) -> str:
    return urlsplit(url).hostname or "?"


def _webhooks_response(
    request: HttpRequest,
    *,
    form: WebhookForm | None = None,
    notice: str = "",
) -> HttpResponse:
    endpoints = [
        {"id": w.pk, "name": w.name, "host": _host(w.url), "enabled": w.enabled}
        for w in selectors.webhook_list()
    ]
    return render(
        request,
        "analysis/_webhooks.html",
        {
            "endpoints": endpoints,
            "form": form or WebhookForm(),
            "notice": notice,
            "slack_default_configured": bool(settings.SLACK_WEBHOOK_URL),
        },
    )


def _actor(request: HttpRequest) -> str:
    return request.user.get_username() or "web"


def _back_to_settings() -> HttpResponse:
    return redirect(reverse("experiments:settings") + "#webhooks")


@role_required(READ_WEBHOOKS)
def webhooks(request: HttpRequest) -> HttpResponse:
    return _webhooks_response(request)


@role_required(ADD_WEBHOOKS)
@require_POST
def webhook_create(request: HttpRequest) -> HttpResponse:
    form = WebhookForm(request.POST)
    if form.is_valid():
        try:
            endpoint = services.webhook_create(
                actor=_actor(request),
                name=form.cleaned_data["name"],
                url=form.cleaned_data["url"],
                secret=form.cleaned_data["secret"],
            )
        except InvalidInput as exc:
            form.show_errors(exc.errors)
        else:
            notice = f"Added webhook “{endpoint.name}” ({_host(endpoint.url)})."
            if not request.headers.get("HX-Request"):
                messages.success(request, notice)
                return _back_to_settings()
            return _webhooks_response(request, notice=notice)
    if not request.headers.get("HX-Request"):
        for field, errors in form.errors.items():
            messages.error(request, f"Webhook {field}: {' '.join(errors)}")
        return _back_to_settings()
    # 200, not 400: htmx does not swap error responses, and the errors must show inline.
    return _webhooks_response(request, form=form)


@role_required(DELETE_WEBHOOKS)
@require_http_methods(["GET", "POST"])
def webhook_delete(request: HttpRequest, webhook_id: int) -> HttpResponse:
    endpoint = selectors.webhook_list().filter(pk=webhook_id).first()
    if endpoint is None:
        raise Http404(f"No webhook {webhook_id}.")
    if request.method == "GET":
        return render(
            request,
            "analysis/webhook_delete.html",
            {
                "nav": "settings",
                "endpoint": {"id": endpoint.pk, "name": endpoint.name, "host": _host(endpoint.url)},
            },
        )
    try:
        services.webhook_delete(actor=_actor(request), webhook_id=webhook_id)
    except NotFound:
        raise Http404(f"No webhook {webhook_id}.") from None
    notice = f"Deleted webhook “{endpoint.name}”."
    if not request.headers.get("HX-Request"):
        messages.success(request, notice)
        return _back_to_settings()
    return _webhooks_response(request, notice=notice)


@role_required(TEST_WEBHOOKS)
@require_POST
def alert_test(request: HttpRequest) -> HttpResponse:
    queued = services.alert_test(actor=_actor(request))
    notice = (
        f"Queued a test alert to {queued} destination{'s' if queued != 1 else ''}; "
        "the worker delivers it within seconds."
        if queued
        else "No destination to send to: add a webhook or set SLACK_WEBHOOK_URL."
    )
    if not request.headers.get("HX-Request"):
        level = messages.SUCCESS if queued else messages.WARNING
        messages.add_message(request, level, notice)
        return _back_to_settings()
    return _webhooks_response(request, notice=notice)
