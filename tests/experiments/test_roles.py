"""Roles: groups and new users, every UI POST view per role, buttons, and the role command."""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from typing import Any

import pytest
from django.apps import apps as django_apps
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from analysis import services as analysis_services
from analysis.models import AlertOutbox, WebhookEndpoint
from experiments import roles, services
from experiments.models import ApiKey, AuditEntry, Experiment, ExperimentStatus, Metric
from tests.experiments.test_views import experiment_form
from tests.factories import create_experiment

pytestmark = pytest.mark.django_db
S = ExperimentStatus


def user_with_role(role: str, username: str) -> User:
    """A new user given `role` (new users start as viewers)."""
    user = User.objects.create_user(username, password="pw-for-role-tests")
    if role != roles.VIEWER:
        services.user_role_assign(actor="test", username=username, role=role)
    return user


def login_as(role: str, username: str | None = None) -> Client:
    """A web client logged in as a new user with `role`."""
    client = Client()
    client.force_login(user_with_role(role, username or f"{role}-user"))
    return client


# --- groups, new users, superusers ------------------------------------------------------------


def test_the_role_groups_hold_nested_permissions() -> None:
    perms = {
        group.name: {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.all()}
        for group in Group.objects.filter(name__in=roles.ROLES)
    }
    assert perms[roles.VIEWER] < perms[roles.EXPERIMENTER] < perms[roles.ADMIN]
    assert roles.READ in perms[roles.VIEWER]
    assert not {p for p in perms[roles.VIEWER] if not p.split(".")[1].startswith("view_")}
    assert roles.RUN_EXPERIMENTS in perms[roles.EXPERIMENTER]
    assert "experiments.add_apikey" not in perms[roles.EXPERIMENTER]
    assert "analysis.add_webhookendpoint" not in perms[roles.EXPERIMENTER]
    for perm in ("experiments.add_apikey", roles.GRANT_MANAGE_SCOPE, "auth.change_user"):
        assert perm in perms[roles.ADMIN]


def test_the_data_migration_is_idempotent_and_gives_existing_users_a_role() -> None:
    migration = importlib.import_module("experiments.migrations.0003_roles")
    staff = User.objects.create_user("old-staff", is_staff=True)
    plain = User.objects.create_user("old-plain")
    staff.groups.clear()
    plain.groups.clear()  # as if they existed before roles
    counts = (Group.objects.count(), Group.permissions.through.objects.count())
    migration.create_roles(django_apps, None)
    migration.create_roles(django_apps, None)
    assert (Group.objects.count(), Group.permissions.through.objects.count()) == counts
    assert roles.role_of(staff) == roles.ADMIN
    assert roles.role_of(plain) == roles.VIEWER
    assert plain.groups.count() == 1


def test_new_users_are_viewers_and_superusers_are_admins() -> None:
    user = User.objects.create_user("newbie", password="pw-123456789")
    assert roles.role_of(user) == roles.VIEWER
    assert user.has_perm(roles.READ) and not user.has_perm(roles.RUN_EXPERIMENTS)
    call_command("createsuperuser", "--noinput", "--username", "root", "--email", "r@example.com")
    root = User.objects.get(username="root")
    assert roles.role_of(root) == roles.ADMIN and root.has_perm(roles.GRANT_MANAGE_SCOPE)


def test_groups_deleted_by_hand_come_back_for_the_next_new_user() -> None:
    Group.objects.filter(name__in=roles.ROLES).delete()
    user = User.objects.create_user("after-delete")
    assert roles.role_of(user) == roles.VIEWER and user.has_perm(roles.READ)
    assert Group.objects.filter(name__in=roles.ROLES).count() == 3


# --- the role command --------------------------------------------------------------------------


def test_rampart_role_assigns_one_role_and_audits_it() -> None:
    user = User.objects.create_user("dana")
    out = io.StringIO()
    call_command("rampart_role", "dana", "experimenter", stdout=out)
    assert "dana is now experimenter (was viewer)" in out.getvalue()
    user = User.objects.get(pk=user.pk)
    assert roles.role_of(user) == roles.EXPERIMENTER and not user.is_staff
    assert set(user.groups.values_list("name", flat=True)) == {roles.EXPERIMENTER}
    call_command("rampart_role", "dana", "admin", stdout=out)
    user = User.objects.get(pk=user.pk)
    assert roles.role_of(user) == roles.ADMIN and user.is_staff
    entry = AuditEntry.objects.filter(action="user.role").first()
    assert entry is not None
    assert entry.after == {"user": "dana", "role": "admin"}
    assert entry.before == {"user": "dana", "role": "experimenter"}
    assert entry.actor == "cli:rampart_role" and entry.actor_role == roles.SYSTEM
    call_command("rampart_role", "dana", "admin", stdout=out)
    assert "already is admin" in out.getvalue()
    assert AuditEntry.objects.filter(action="user.role").count() == 2


def test_rampart_role_demotes_a_superuser_and_refuses_unknown_input() -> None:
    User.objects.create_superuser("boss", "b@example.com", "pw-123456789")
    call_command("rampart_role", "boss", "viewer", stdout=io.StringIO())
    boss = User.objects.get(username="boss")
    assert not boss.is_superuser and roles.role_of(boss) == roles.VIEWER
    with pytest.raises(CommandError, match="No user 'ghost'"):
        call_command("rampart_role", "ghost", "viewer")
    with pytest.raises(CommandError):
        call_command("rampart_role", "boss", "owner")


# --- every UI POST view, per role ---------------------------------------------------------------


def _webhook() -> WebhookEndpoint:
    return analysis_services.webhook_create(
        actor="test", name="pager", url="https://hooks.example.com/x", secret="s" * 20
    )


# (name, minimum role, request builder, did it take effect?)
POST_VIEWS: list[tuple[str, str, Callable[[], tuple[str, dict[str, Any]]], Callable[[], bool]]] = [
    (
        "experiment create",
        roles.EXPERIMENTER,
        lambda: (reverse("experiments:create"), experiment_form(key="ranker-v3", name="v3")),
        lambda: Experiment.objects.filter(key="ranker-v3").exists(),
    ),
    (
        "experiment edit",
        roles.EXPERIMENTER,
        lambda: (reverse("experiments:edit", args=["ranker-v2"]), {}),
        lambda: False,  # an empty form is a 400, not a change: only the 403 matters here
    ),
    (
        "action start",
        roles.EXPERIMENTER,
        lambda: (reverse("experiments:action", args=["ranker-v2", "start"]), {}),
        lambda: Experiment.objects.get(key="ranker-v2").status == S.RUNNING,
    ),
    (
        "action rollback",
        roles.EXPERIMENTER,
        lambda: (
            reverse("experiments:action", args=["ranker-v2", "rollback"]),
            {"reason": "p95 up"},
        ),
        lambda: Experiment.objects.get(key="ranker-v2").status == S.ROLLED_BACK,
    ),
    (
        "metric create",
        roles.EXPERIMENTER,
        lambda: (
            reverse("experiments:metric-create"),
            {
                "key": "clicks",
                "name": "Clicks",
                "kind": "binomial",
                "source": "click",
                "direction": "higher",
            },
        ),
        lambda: Metric.objects.filter(key="clicks").exists(),
    ),
    (
        "metric edit",
        roles.EXPERIMENTER,
        lambda: (
            reverse("experiments:metric-edit", args=["conversion"]),
            {
                "key": "conversion",
                "name": "Conversion rate",
                "kind": "binomial",
                "source": "purchase",
                "direction": "higher",
            },
        ),
        lambda: Metric.objects.get(key="conversion").name == "Conversion rate",
    ),
    (
        "api key create",
        roles.ADMIN,
        lambda: (reverse("experiments:api-key-create"), {"name": "svc", "scopes": ["decide"]}),
        lambda: ApiKey.objects.filter(name="svc").exists(),
    ),
    (
        "api key revoke",
        roles.ADMIN,
        lambda: (
            reverse("experiments:api-key-revoke", args=[ApiKey.objects.get(name="ci").prefix]),
            {},
        ),
        lambda: ApiKey.objects.get(name="ci").revoked_at is not None,
    ),
    (
        "webhook create",
        roles.ADMIN,
        lambda: (
            reverse("analysis:webhook-create"),
            {"name": "ops", "url": "https://ops.example.com/h", "secret": "x" * 20},
        ),
        lambda: WebhookEndpoint.objects.filter(name="ops").exists(),
    ),
    (
        "webhook delete",
        roles.ADMIN,
        lambda: (reverse("analysis:webhook-delete", args=[_webhook().pk]), {}),
        lambda: not WebhookEndpoint.objects.filter(name="pager").exists(),
    ),
    (
        "test alert",
        roles.ADMIN,
        lambda: (reverse("analysis:alert-test"), {}),
        lambda: AlertOutbox.objects.exists(),
    ),
]


@pytest.mark.parametrize("role", roles.ROLES)
@pytest.mark.parametrize("view", POST_VIEWS, ids=[v[0] for v in POST_VIEWS])
def test_every_ui_post_view_answers_by_role(
    role: str, view: tuple[str, str, Any, Any], metrics: Any, settings: Any
) -> None:
    settings.SLACK_WEBHOOK_URL = "https://hooks.slack.com/services/T/B/x"
    name, minimum, build, took_effect = view
    create_experiment("ranker-v2")
    if name == "action rollback":
        services.experiment_start(actor="test", key="ranker-v2")
    services.api_key_create(actor="test", name="ci", scopes=["read"])
    client = login_as(role)
    url, data = build()
    response = client.post(url, data)
    allowed = roles.ROLES.index(role) >= roles.ROLES.index(minimum)
    if allowed:
        assert response.status_code != 403, (name, role)
        if name != "experiment edit":
            assert took_effect(), (name, role, response.status_code)
    else:
        assert response.status_code == 403, (name, role, response.status_code)
        assert not took_effect(), (name, role)
        assert "Your role does not allow this" in response.content.decode()


def test_anonymous_posts_go_to_the_login_page(metrics: Any) -> None:
    create_experiment("ranker-v2")
    response = Client().post(reverse("experiments:action", args=["ranker-v2", "start"]))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_a_user_without_a_role_cannot_read() -> None:
    user = User.objects.create_user("nobody")
    user.groups.clear()
    client = Client()
    client.force_login(user)
    assert client.get(reverse("experiments:list")).status_code == 403


# --- what each role sees ------------------------------------------------------------------------


def test_viewers_see_no_buttons_they_cannot_use(metrics: Any) -> None:
    create_experiment("ranker-v2")
    page = login_as(roles.VIEWER).get(reverse("experiments:detail", args=["ranker-v2"]))
    html = page.content.decode()
    assert page.status_code == 200
    assert 'data-action="start"' not in html
    assert reverse("experiments:edit", args=["ranker-v2"]) not in html
    assert "Your role (viewer) can read this experiment" in html
    listing = login_as(roles.VIEWER, "v2").get(reverse("experiments:list")).content.decode()
    assert reverse("experiments:create") not in listing
    catalogue = login_as(roles.VIEWER, "v3").get(reverse("experiments:metric-list"))
    assert reverse("experiments:metric-create") not in catalogue.content.decode()


def test_experimenters_run_experiments_but_do_not_manage_keys_or_webhooks(metrics: Any) -> None:
    create_experiment("ranker-v2")
    services.api_key_create(actor="test", name="ci", scopes=["read"])
    _webhook()
    client = login_as(roles.EXPERIMENTER)
    html = client.get(reverse("experiments:detail", args=["ranker-v2"])).content.decode()
    assert 'data-action="start"' in html and 'id="role-hint"' not in html
    settings_page = client.get(reverse("experiments:settings")).content.decode()
    assert reverse("experiments:api-key-create") not in settings_page
    assert "Revoke…" not in settings_page
    assert "Only admins create and revoke API keys." in settings_page
    webhooks = client.get(reverse("analysis:webhooks")).content.decode()
    assert "pager" in webhooks and "Delete…" not in webhooks
    assert "send-test-alert" not in webhooks and "Add a webhook" not in webhooks


def test_admins_see_key_and_webhook_management_and_the_role_badge(metrics: Any) -> None:
    services.api_key_create(actor="test", name="ci", scopes=["manage"])
    _webhook()
    client = login_as(roles.ADMIN)
    page = client.get(reverse("experiments:settings")).content.decode()
    assert reverse("experiments:api-key-create") in page and "Revoke…" in page
    assert 'value="manage"' in page
    # Revoking the only manage key warns in its dialog.
    assert "last active key with the manage scope" in page
    assert 'title="Your role">admin<' in page
    webhooks = client.get(reverse("analysis:webhooks")).content.decode()
    assert "Delete…" in webhooks and "send-test-alert" in webhooks


def test_only_admins_may_create_manage_keys_in_the_ui() -> None:
    client = login_as(roles.EXPERIMENTER)
    user = User.objects.get(username="experimenter-user")
    # Even with the permission to create keys, the manage scope needs the admin role.
    user.user_permissions.add(Permission.objects.get(codename="add_apikey"))
    page = client.get(reverse("experiments:settings")).content.decode()
    assert 'value="manage"' not in page and "only admins create them" in page
    refused = client.post(
        reverse("experiments:api-key-create"), {"name": "m", "scopes": ["manage"]}
    )
    assert refused.status_code == 400
    assert "Only admins can create keys with the manage scope." in refused.content.decode()
    assert not ApiKey.objects.filter(name="m").exists()
    allowed = client.post(
        reverse("experiments:api-key-create"), {"name": "d", "scopes": ["decide"]}
    )
    assert allowed.status_code == 200 and ApiKey.objects.filter(name="d").exists()


def test_the_audit_list_shows_the_role_of_each_actor(metrics: Any) -> None:
    create_experiment("ranker-v2")
    client = login_as(roles.EXPERIMENTER, "erin")
    client.post(reverse("experiments:action", args=["ranker-v2", "start"]))
    entry = AuditEntry.objects.get(action="start")
    assert (entry.actor, entry.actor_role) == ("erin", roles.EXPERIMENTER)
    services.experiment_rollback(actor="rampart:analysis", key="ranker-v2", reason="p95")
    assert AuditEntry.objects.get(action="rollback").actor_role == roles.SYSTEM
    html = client.get(reverse("experiments:audit", args=["ranker-v2"])).content.decode()
    assert "by erin (experimenter)" in html and "by rampart:analysis (system)" in html


# --- the Django admin ---------------------------------------------------------------------------


def test_the_django_admin_follows_roles(metrics: Any) -> None:
    create_experiment("ranker-v2")
    experimenter = login_as(roles.EXPERIMENTER)
    assert experimenter.get("/admin/experiments/experiment/").status_code == 302  # not staff
    admin = login_as(roles.ADMIN, "ada")
    assert not User.objects.get(username="ada").is_superuser
    assert admin.get("/admin/experiments/experiment/").status_code == 200
    assert admin.get("/admin/experiments/auditentry/add/").status_code == 403
    assert admin.get("/admin/experiments/apikey/add/").status_code == 403
    assert admin.get("/admin/analysis/webhookendpoint/").status_code == 200
    users = admin.get("/admin/auth/user/").content.decode()
    assert "make_experimenter" in users
    target = User.objects.create_user("zoe")
    response = admin.post(
        "/admin/auth/user/",
        {"action": "make_experimenter", "_selected_action": [target.pk]},
    )
    assert response.status_code == 302
    assert roles.role_of(User.objects.get(pk=target.pk)) == roles.EXPERIMENTER
    entry = AuditEntry.objects.filter(action="user.role").first()  # the newest
    assert entry is not None and entry.after == {"user": "zoe", "role": "experimenter"}
    assert (entry.actor, entry.actor_role) == ("ada", roles.ADMIN)
