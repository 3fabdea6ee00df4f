"""Web UI views of experiments: log-in, list, form (with service errors inline), actions, keys."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from experiments import services
from experiments.models import ApiKey, AuditEntry, Experiment, ExperimentStatus
from tests.factories import create_experiment

S = ExperimentStatus
SECRET_SLACK = "https://hooks.slack.com/services/T000/B000/very-secret-token"


@pytest.fixture
def user(db: None) -> User:
    """An admin: these tests cover every page; tests/experiments/test_roles.py covers roles."""
    user = User.objects.create_user("alice", password="correct horse battery staple")
    services.user_role_assign(actor="test", username="alice", role="admin")
    return user


@pytest.fixture
def web(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def experiment_form(**overrides: Any) -> dict[str, Any]:
    """POST data of the experiment form: a canary v1 -> v2 with two guardrails."""
    data: dict[str, Any] = {
        "name": "Ranker v2",
        "key": "ranker-v2",
        "kind": "canary",
        "description": "",
        "hypothesis": "",
        "unit_source": "header",
        "unit_attribute": "X-Rampart-Unit",
        "seed": "",
        "coverage_pct": "100",
        "hash_version": "2",
        "alpha": "0.05",
        "decision_sample_size": "10000",
        "on_health_failure": "hold",
        "fallback_to_control": "on",
        "namespace_id": "",
        "namespace_start_pct": "",
        "namespace_end_pct": "",
        "overrides": "",
        "shadow_compare_field": "",
        "cache_ttl_s": "0",
        "cache_max_entries": "10000",
        "slack_webhook_url": "",
        "control": "variants-0",
        "variants-TOTAL_FORMS": "2",
        "variants-INITIAL_FORMS": "2",
        "variants-0-key": "v1",
        "variants-0-upstream_url": "http://127.0.0.1:9001",
        "variants-0-weight_pct": "50",
        "variants-1-key": "v2",
        "variants-1-upstream_url": "http://127.0.0.1:9002",
        "variants-1-weight_pct": "50",
        "metrics-TOTAL_FORMS": "2",
        "metrics-INITIAL_FORMS": "0",
        "metrics-0-metric": "latency-p95",
        "metrics-0-role": "guardrail",
        "metrics-0-margin_pct": "10",
        "metrics-1-metric": "conversion",
        "metrics-1-role": "primary",
        "metrics-1-margin_pct": "",
        "ramp-TOTAL_FORMS": "3",
        "ramp-INITIAL_FORMS": "3",
    }
    for index, share in enumerate(("5", "50", "100")):
        data[f"ramp-{index}-share_pct"] = share
        data[f"ramp-{index}-min_duration_s"] = "60"
        data[f"ramp-{index}-min_exposures_per_arm"] = "100"
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def field_errors(html: str, field_id: str) -> str:
    """Text of the inline error list rendered next to the input with this id."""
    match = re.search(
        rf'<ul class="errorlist" id="{re.escape(field_id)}_error">(.*?)</ul>', html, re.S
    )
    assert match, f"no inline errors next to #{field_id}"
    return match.group(1)


def test_every_page_requires_login(metrics: Any) -> None:
    create_experiment("gated")
    client = Client()
    for url in (
        reverse("experiments:list"),
        reverse("experiments:create"),
        reverse("experiments:detail", args=["gated"]),
        reverse("experiments:edit", args=["gated"]),
        reverse("experiments:overview", args=["gated"]),
        reverse("experiments:audit", args=["gated"]),
        reverse("experiments:action", args=["gated", "start"]),
        reverse("experiments:metric-list"),
        reverse("experiments:settings"),
    ):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/accounts/login/?next="), url


def test_login_page_signs_in(user: User) -> None:
    client = Client()
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    assert 'name="username"' in page.content.decode()
    response = client.post(
        "/accounts/login/",
        {"username": "alice", "password": "correct horse battery staple", "next": "/"},
    )
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200


def test_list_shows_status_kind_ramp_step_split_and_filters(web: Client, metrics: Any) -> None:
    create_experiment("draft-one")
    create_experiment("live-one")
    services.experiment_start(actor="t", key="live-one")
    html = web.get("/").content.decode()
    assert "Running" in html and "Draft" in html
    assert "Canary" in html
    # The default ramp starts at 1%: control keeps 99%.
    assert "Step 1 of 6 · 1%" in html
    assert "<b>v1</b> 99%" in html and "<b>v2</b> 1%" in html
    running_only = web.get("/?status=running").content.decode()
    assert "live-one" in running_only and "draft-one" not in running_only
    assert 'aria-current="true">Running<span class="count">1</span>' in running_only


def test_create_form_offers_the_default_ramp(web: Client, metrics: Any) -> None:
    html = web.get(reverse("experiments:create")).content.decode()
    shares = re.findall(r'name="ramp-\d+-share_pct" value="([\d.]+)"', html)
    assert [float(s) for s in shares] == [1.0, 5.0, 10.0, 25.0, 50.0, 100.0]
    # The catalogue feeds the metric picker, and the margin phrase knows each direction.
    assert '<option value="latency-p95">p95 latency (latency-p95)</option>' in html
    assert '"latency-p95": {"name": "p95 latency", "direction": "lower"}' in html


def test_create_calls_the_service_with_percentages_as_fractions(
    web: Client, user: User, metrics: Any
) -> None:
    response = web.post(reverse("experiments:create"), experiment_form())
    assert response.status_code == 302
    assert response["Location"] == reverse("experiments:detail", args=["ranker-v2"])
    experiment = Experiment.objects.get(key="ranker-v2")
    assert experiment.status == S.DRAFT
    assert [(v.key, v.weight, v.is_control) for v in experiment.variants.all()] == [
        ("v1", 0.5, True),
        ("v2", 0.5, False),
    ]
    assert [(m.metric.key, m.role, m.margin) for m in experiment.metrics.all()] == [
        ("latency-p95", "guardrail", 0.1),
        ("conversion", "primary", 0.0),
    ]
    assert [s.canary_share for s in experiment.ramp_steps.all()] == [0.05, 0.5, 1.0]
    assert AuditEntry.objects.get(experiment=experiment, action="create").actor == "alice"


def test_service_errors_appear_next_to_their_fields(web: Client, metrics: Any) -> None:
    create_experiment("taken")
    response = web.post(
        reverse("experiments:create"),
        experiment_form(
            **{
                "key": "taken",
                "variants-1-upstream_url": "not-a-url",
                "ramp-2-share_pct": "40",
                "metrics-1-margin_pct": "5",
            }
        ),
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "already exists" in field_errors(html, "id_key")
    assert "Must be an http or https URL." in field_errors(html, "id_variants-1-upstream_url")
    assert "Shares must increase step by step." in field_errors(html, "id_ramp-2-share_pct")
    assert "Only guardrails have a margin." in field_errors(html, "id_metrics-1-margin_pct")
    # The inputs point at their messages for screen readers.
    assert re.search(r'aria-invalid="true"[^>]*id="id_variants-1-upstream_url"', html)
    assert Experiment.objects.filter(key="ranker-v2").count() == 0


def test_row_errors_follow_the_rows_the_user_kept(web: Client, metrics: Any) -> None:
    # Row 1 is removed, so the service's variants[1] is the form's row 2.
    data = experiment_form(
        **{
            "variants-TOTAL_FORMS": "3",
            "variants-1-DELETE": "on",
            "variants-2-key": "v3",
            "variants-2-upstream_url": "ftp://nope",
            "variants-2-weight_pct": "50",
        }
    )
    html = web.post(reverse("experiments:create"), data).content.decode()
    assert "Must be an http or https URL." in field_errors(html, "id_variants-2-upstream_url")
    assert 'id="id_variants-1-upstream_url_error"' not in html


def test_whole_row_set_errors_are_shown_on_the_set(web: Client, metrics: Any) -> None:
    data = experiment_form(**{"variants-1-weight_pct": "40", "control": ""})
    html = web.post(reverse("experiments:create"), data).content.decode()
    errors = re.search(r'id="variants-errors">(.*?)</ul>', html, re.S)
    assert errors is not None
    assert "Weights must sum to 1" in errors.group(1)
    assert "Exactly one variant must be the control (got 0)." in errors.group(1)


def test_form_type_errors_are_inline_before_any_service_call(web: Client, metrics: Any) -> None:
    html = web.post(
        reverse("experiments:create"), experiment_form(**{"ramp-0-share_pct": "150"})
    ).content.decode()
    assert "less than or equal to 100" in field_errors(html, "id_ramp-0-share_pct")


def test_the_creation_page_key_is_reserved(web: Client, metrics: Any) -> None:
    html = web.post(reverse("experiments:create"), experiment_form(key="new")).content.decode()
    assert "is reserved by the web UI" in field_errors(html, "id_key")


def test_ab_test_ignores_the_hidden_ramp_rows(web: Client, metrics: Any) -> None:
    response = web.post(
        reverse("experiments:create"), experiment_form(kind="ab", **{"ramp-0-share_pct": "x"})
    )
    assert response.status_code == 302
    experiment = Experiment.objects.get(key="ranker-v2")
    assert experiment.kind == "ab" and not experiment.ramp_steps.exists()


def test_edit_draft_sends_only_what_changed(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    page = web.get(reverse("experiments:edit", args=["ranker-v2"])).content.decode()
    assert re.search(r'name="key"[^>]*disabled', page)
    data = experiment_form(
        name="Ranker v2 (edited)",
        **{
            "metrics-TOTAL_FORMS": "3",
            "metrics-INITIAL_FORMS": "3",
            "metrics-1-metric": "error-rate",
            "metrics-1-role": "guardrail",
            "metrics-1-margin_pct": "",
            "metrics-2-metric": "conversion",
            "metrics-2-role": "primary",
            "ramp-TOTAL_FORMS": "6",
            "ramp-INITIAL_FORMS": "6",
            **{f"ramp-{i}-share_pct": s for i, s in enumerate(("1", "5", "10", "25", "50", "100"))},
            **{f"ramp-{i}-min_duration_s": "60" for i in range(6)},
            **{f"ramp-{i}-min_exposures_per_arm": "100" for i in range(6)},
        },
    )
    response = web.post(reverse("experiments:edit", args=["ranker-v2"]), data)
    assert response.status_code == 302
    entry = AuditEntry.objects.filter(action="update").get()
    assert entry.after["fields"] == ["name"]
    assert Experiment.objects.get(key="ranker-v2").name == "Ranker v2 (edited)"


def test_live_experiment_locks_structure_but_changes_weights_and_ramp(
    web: Client, metrics: Any
) -> None:
    create_experiment("ab-live", kind="ab")
    services.experiment_start(actor="t", key="ab-live")
    page = web.get(reverse("experiments:edit", args=["ab-live"])).content.decode()
    assert re.search(r'name="variants-0-upstream_url"[^>]*disabled', page)
    assert re.search(r'name="unit_attribute"[^>]*disabled', page)
    data = experiment_form(
        key="ab-live",
        kind="ab",
        name="Ranker v2 canary",
        # Attempts to change frozen fields are ignored: disabled fields keep their values.
        unit_attribute="X-Other",
        **{
            "variants-0-upstream_url": "http://elsewhere:1",
            "variants-0-weight_pct": "70",
            "variants-1-weight_pct": "30",
            "metrics-TOTAL_FORMS": "0",
        },
    )
    response = web.post(reverse("experiments:edit", args=["ab-live"]), data)
    assert response.status_code == 302, response.content.decode()
    experiment = Experiment.objects.get(key="ab-live")
    assert {v.key: v.weight for v in experiment.variants.all()} == {"v1": 0.7, "v2": 0.3}
    assert experiment.unit_attribute == "X-Rampart-Unit"
    assert experiment.variants.get(key="v1").upstream_url == "http://127.0.0.1:9001"
    assert AuditEntry.objects.filter(action="update").get().after["fields"] == ["weights"]


def test_slack_webhook_is_never_rendered(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    services.experiment_update(actor="t", key="ranker-v2", slack_webhook_url=SECRET_SLACK)
    for url in (
        reverse("experiments:detail", args=["ranker-v2"]),
        reverse("experiments:edit", args=["ranker-v2"]),
        reverse("experiments:settings"),
        "/",
    ):
        html = web.get(url).content.decode()
        assert "very-secret-token" not in html, url
        assert "hooks.slack.com/services/T000" not in html, url
    edit = web.get(reverse("experiments:edit", args=["ranker-v2"])).content.decode()
    assert "configured" in edit
    # Saving the form without typing a new URL keeps the stored one.
    web.post(reverse("experiments:edit", args=["ranker-v2"]), experiment_form(name="Renamed"))
    assert Experiment.objects.get(key="ranker-v2").slack_webhook_url == SECRET_SLACK
    web.post(
        reverse("experiments:edit", args=["ranker-v2"]),
        experiment_form(name="Renamed", slack_webhook_clear="on"),
    )
    assert Experiment.objects.get(key="ranker-v2").slack_webhook_url == ""


def test_settings_show_default_slack_as_configured_only(
    web: Client, settings: Any, db: None
) -> None:
    settings.SLACK_WEBHOOK_URL = SECRET_SLACK
    html = web.get(reverse("experiments:settings")).content.decode()
    assert "very-secret-token" not in html
    assert re.search(r"SLACK_WEBHOOK_URL</code>\):\s*<span class=\"badge badge-ok\">", html)
    settings.SLACK_WEBHOOK_URL = ""
    assert "not configured" in web.get(reverse("experiments:settings")).content.decode()


def test_actions_have_a_confirmation_step_and_use_the_services(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    detail = web.get(reverse("experiments:detail", args=["ranker-v2"])).content.decode()
    assert '<dialog id="dialog-start"' in detail
    confirm = web.get(reverse("experiments:action", args=["ranker-v2", "start"]))
    assert "Start this experiment?" in confirm.content.decode()
    # Starting records no reason, so the confirmation asks for none.
    assert 'name="reason"' not in confirm.content.decode()
    assert Experiment.objects.get(key="ranker-v2").status == S.DRAFT
    response = web.post(reverse("experiments:action", args=["ranker-v2", "start"]))
    assert response.status_code == 302
    assert Experiment.objects.get(key="ranker-v2").status == S.RUNNING
    assert AuditEntry.objects.get(action="start").actor == "alice"

    web.post(reverse("experiments:action", args=["ranker-v2", "advance"]), {"reason": "looks ok"})
    experiment = Experiment.objects.get(key="ranker-v2")
    assert experiment.ramp_position == 1
    web.post(reverse("experiments:action", args=["ranker-v2", "pause"]), {"reason": ""})
    assert Experiment.objects.get(key="ranker-v2").status == S.PAUSED
    web.post(reverse("experiments:action", args=["ranker-v2", "resume"]))
    assert Experiment.objects.get(key="ranker-v2").status == S.RUNNING
    web.post(
        reverse("experiments:action", args=["ranker-v2", "complete"]),
        {"winner": "v2", "reason": "ship it"},
    )
    experiment = Experiment.objects.get(key="ranker-v2")
    assert experiment.status == S.COMPLETED and experiment.winner is not None
    assert experiment.winner.key == "v2"


def test_rollback_needs_a_reason(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    services.experiment_start(actor="t", key="ranker-v2")
    url = reverse("experiments:action", args=["ranker-v2", "rollback"])
    confirm = web.get(url).content.decode()
    assert re.search(r'<textarea name="reason"[^>]*required', confirm)
    refused = web.post(url, {"reason": "  "})
    assert refused.status_code == 400
    assert "This field is required." in field_errors(refused.content.decode(), "id_rollback_reason")
    assert Experiment.objects.get(key="ranker-v2").status == S.RUNNING
    web.post(url, {"reason": "p95 latency up 40% on v2"})
    assert Experiment.objects.get(key="ranker-v2").status == S.ROLLED_BACK
    audit = web.get(reverse("experiments:audit", args=["ranker-v2"])).content.decode()
    assert "Rolled back" in audit and "p95 latency up 40% on v2" in audit and "alice" in audit


def test_invalid_transition_becomes_a_visible_message(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    response = web.post(reverse("experiments:action", args=["ranker-v2", "resume"]), follow=True)
    html = response.content.decode()
    assert "Could not resume: the experiment is draft, which does not allow it." in html
    assert Experiment.objects.get(key="ranker-v2").status == S.DRAFT


def test_unknown_action_and_experiment_are_404(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    assert web.get(reverse("experiments:action", args=["ranker-v2", "explode"])).status_code == 404
    assert web.get(reverse("experiments:detail", args=["nope"])).status_code == 404


def test_csrf_protection_stays_on(user: User, metrics: Any) -> None:
    create_experiment("ranker-v2")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(reverse("experiments:action", args=["ranker-v2", "start"]))
    assert response.status_code == 403
    assert Experiment.objects.get(key="ranker-v2").status == S.DRAFT


def test_overview_poll_reloads_the_page_when_the_state_moved(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    services.experiment_start(actor="t", key="ranker-v2")
    url = reverse("experiments:overview", args=["ranker-v2"])
    same = web.get(url, {"seen": "running:0"}, HTTP_HX_REQUEST="true")
    assert same.status_code == 200 and "Ramp schedule" in same.content.decode()
    services.experiment_rollback(actor="guardrail", key="ranker-v2", reason="p95 breach")
    moved = web.get(url, {"seen": "running:0"}, HTTP_HX_REQUEST="true")
    assert moved.status_code == 204 and moved["HX-Refresh"] == "true"


def test_detail_shows_ramp_progress_and_configuration(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    services.experiment_start(actor="t", key="ranker-v2")
    services.experiment_advance_ramp(actor="t", key="ranker-v2")
    html = web.get(reverse("experiments:detail", args=["ranker-v2"])).content.decode()
    assert html.count('<li class="done">') == 1
    assert '<li class="current" aria-current="step">' in html
    assert "p95 latency may rise at most 10%" in html
    assert "Error rate may not rise at all" in html
    for action in ("pause", "advance", "rollback", "complete"):
        assert f'data-action="{action}"' in html
    assert 'data-action="start"' not in html
    listing = web.get("/").content.decode()
    assert "Step 2 of 6 · 5%" in listing
    services.experiment_rollback(actor="t", key="ranker-v2", reason="slow")
    html = web.get(reverse("experiments:detail", args=["ranker-v2"])).content.decode()
    assert '<li class="stopped">' in html and "Stopped here" in html
    assert "Stopped at step 2 of 6" in web.get("/").content.decode()


def test_metric_catalogue_create_and_edit(web: Client, metrics: Any) -> None:
    listing = web.get(reverse("experiments:metric-list")).content.decode()
    assert "p95 latency" in listing and "Conversion" in listing
    bad = web.post(
        reverse("experiments:metric-create"),
        {
            "key": "p99",
            "name": "p99 latency",
            "kind": "quantile",
            "source": "latency_ms",
            "direction": "lower",
        },
    )
    assert bad.status_code == 400
    assert "needs a level in (0, 1)" in field_errors(bad.content.decode(), "id_quantile")
    good = web.post(
        reverse("experiments:metric-create"),
        {
            "key": "p99",
            "name": "p99 latency",
            "kind": "quantile",
            "source": "latency_ms",
            "quantile": "0.99",
            "direction": "lower",
        },
    )
    assert good.status_code == 302
    edit_url = reverse("experiments:metric-edit", args=["p99"])
    renamed = web.post(
        edit_url,
        {
            "key": "ignored",
            "name": "Tail latency",
            "kind": "quantile",
            "source": "latency_ms",
            "quantile": "0.99",
            "direction": "lower",
        },
    )
    assert renamed.status_code == 302
    assert services.metric_update  # the same service the API uses
    from experiments.models import Metric

    assert Metric.objects.get(key="p99").name == "Tail latency"


def test_metric_used_by_a_started_experiment_keeps_its_meaning(web: Client, metrics: Any) -> None:
    create_experiment("ranker-v2")
    services.experiment_start(actor="t", key="ranker-v2")
    response = web.post(
        reverse("experiments:metric-edit", args=["latency-p95"]),
        {
            "name": "p95 latency",
            "kind": "quantile",
            "source": "latency_ms",
            "quantile": "0.9",
            "direction": "lower",
        },
    )
    assert response.status_code == 400
    assert "create a new metric" in field_errors(response.content.decode(), "id_quantile")


def test_api_key_is_shown_once_then_listed_and_revoked(web: Client, db: None) -> None:
    created = web.post(
        reverse("experiments:api-key-create"), {"name": "checkout", "scopes": ["decide", "ingest"]}
    )
    assert created.status_code == 200
    assert created["Cache-Control"] == "no-store"
    secret = re.search(r'id="new-api-key"[^>]*>(rk_[^<]+)<', created.content.decode())
    assert secret is not None
    key = ApiKey.objects.get(name="checkout")
    assert services.api_key_matches(secret.group(1), key.key_hash)
    listing = web.get(reverse("experiments:settings")).content.decode()
    assert secret.group(1) not in listing
    assert f"rk_{key.prefix}_…" in listing and "decide, ingest" in listing
    confirm = web.get(reverse("experiments:api-key-revoke", args=[key.prefix]))
    assert "cannot be undone" in confirm.content.decode()
    web.post(reverse("experiments:api-key-revoke", args=[key.prefix]))
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEntry.objects.filter(action="apikey.revoke", actor="alice").exists()


def test_api_key_without_scopes_is_refused_inline(web: Client, db: None) -> None:
    response = web.post(reverse("experiments:api-key-create"), {"name": "empty"})
    assert response.status_code == 400
    assert "Give at least one of" in field_errors(response.content.decode(), "id_apikey_scopes")
    assert not ApiKey.objects.exists()
