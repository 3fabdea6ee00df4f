"""Roles on the management API: session users by role, keys by scope, key revocation warnings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from rest_framework.test import APIClient

from experiments import roles, services
from experiments.errors import LockoutRisk
from experiments.models import ApiKey, AuditEntry, Experiment, ExperimentStatus
from experiments.services import keys as keys_service
from tests.experiments.test_roles import user_with_role
from tests.factories import create_experiment, experiment_payload

pytestmark = pytest.mark.django_db


def session(role: str, username: str | None = None) -> APIClient:
    client = APIClient()
    client.force_login(user_with_role(role, username or f"api-{role}"))
    return client


def keyed(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


# (request, minimum role); None: nobody with a session role below it may call it.
REQUESTS: list[tuple[str, str, str, dict[str, Any] | None, str]] = [
    ("read experiments", "get", "/api/v1/experiments/", None, roles.VIEWER),
    ("read audit", "get", "/api/v1/experiments/ranker-v2/audit/", None, roles.VIEWER),
    ("read metrics", "get", "/api/v1/metrics/", None, roles.VIEWER),
    ("read keys", "get", "/api/v1/api-keys/", None, roles.VIEWER),
    ("read webhooks", "get", "/api/v1/webhooks", None, roles.VIEWER),
    (
        "create experiment",
        "post",
        "/api/v1/experiments/",
        experiment_payload("ranker-v3"),
        roles.EXPERIMENTER,
    ),
    (
        "edit experiment",
        "patch",
        "/api/v1/experiments/ranker-v2/",
        {"name": "Renamed"},
        roles.EXPERIMENTER,
    ),
    ("start", "post", "/api/v1/experiments/ranker-v2/start/", {}, roles.EXPERIMENTER),
    ("delete draft", "delete", "/api/v1/experiments/ranker-v2/", None, roles.EXPERIMENTER),
    (
        "create metric",
        "post",
        "/api/v1/metrics/",
        {
            "key": "clicks",
            "name": "Clicks",
            "kind": "binomial",
            "source": "click",
            "direction": "higher",
        },
        roles.EXPERIMENTER,
    ),
    (
        "create key",
        "post",
        "/api/v1/api-keys/",
        {"name": "svc", "scopes": ["decide"]},
        roles.ADMIN,
    ),
    (
        "create webhook",
        "post",
        "/api/v1/webhooks",
        {"name": "ops", "url": "https://ops.example.com/h", "secret": "x" * 24},
        roles.ADMIN,
    ),
    ("test alert", "post", "/api/v1/webhooks/test", {}, roles.ADMIN),
]


@pytest.mark.parametrize("role", roles.ROLES)
@pytest.mark.parametrize("call", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_session_users_call_the_api_by_role(
    role: str, call: tuple[str, str, str, Any, str], metrics: Any
) -> None:
    name, method, url, body, minimum = call
    create_experiment("ranker-v2")
    response = getattr(session(role), method)(url, body, format="json")
    allowed = roles.ROLES.index(role) >= roles.ROLES.index(minimum)
    if allowed:
        assert response.status_code in (200, 201, 202, 204), (name, role, response.content)
    else:
        assert response.status_code == 403, (name, role, response.status_code)
        assert f"Your role ({role}) does not allow this action" in response.content.decode()
    if name == "start":
        status = Experiment.objects.get(key="ranker-v2").status
        assert status == (ExperimentStatus.RUNNING if allowed else ExperimentStatus.DRAFT)


def test_a_session_user_without_a_role_cannot_even_read() -> None:
    user = User.objects.create_user("no-role")
    user.groups.clear()
    client = APIClient()
    client.force_login(user)
    assert client.get("/api/v1/experiments/").status_code == 403


@pytest.mark.parametrize(
    ("scopes", "read", "write"),
    [(["read"], 200, 403), (["manage"], 200, 201), (["decide", "ingest"], 403, 403)],
)
def test_keys_keep_their_scopes(
    scopes: list[str], read: int, write: int, make_key: Callable[..., str], metrics: Any
) -> None:
    client = keyed(make_key(*scopes))
    assert client.get("/api/v1/experiments/").status_code == read
    assert client.get("/api/v1/webhooks").status_code == (200 if "manage" in scopes else 403)
    created = client.post("/api/v1/experiments/", experiment_payload(), format="json")
    assert created.status_code == write


def test_a_manage_key_acts_as_admin_in_the_audit_log(
    make_key: Callable[..., str], metrics: Any
) -> None:
    client = keyed(make_key("manage", name="ci"))
    assert (
        client.post("/api/v1/experiments/", experiment_payload(), format="json").status_code == 201
    )
    entry = AuditEntry.objects.get(action="create")
    assert entry.actor.startswith("apikey:") and entry.actor.endswith(":ci")
    assert entry.actor_role == roles.ADMIN
    audit = client.get("/api/v1/experiments/ranker-v2/audit/").json()["results"]
    assert audit[0]["actor_role"] == "admin"


def test_the_api_audit_names_the_session_role(metrics: Any) -> None:
    create_experiment("ranker-v2")
    client = session(roles.EXPERIMENTER, "eve")
    assert client.post("/api/v1/experiments/ranker-v2/start/").status_code == 200
    rows = client.get("/api/v1/experiments/ranker-v2/audit/").json()["results"]
    start = next(row for row in rows if row["action"] == "start")
    assert (start["actor"], start["actor_role"]) == ("user:eve", "experimenter")


def test_only_admins_create_manage_keys(make_key: Callable[..., str]) -> None:
    experimenter = session(roles.EXPERIMENTER)
    User.objects.get(username="api-experimenter").user_permissions.add(
        Permission.objects.get(codename="add_apikey")
    )
    refused = experimenter.post(
        "/api/v1/api-keys/", {"name": "m", "scopes": ["manage"]}, format="json"
    )
    assert refused.status_code == 403 and not ApiKey.objects.filter(name="m").exists()
    assert (
        experimenter.post("/api/v1/api-keys/", {"name": "d", "scopes": ["decide"]}, format="json")
    ).status_code == 201
    admin = session(roles.ADMIN)
    made = admin.post("/api/v1/api-keys/", {"name": "m", "scopes": ["manage"]}, format="json")
    assert made.status_code == 201
    # A manage key acts as an admin, so it may mint another manage key.
    minted = keyed(made.json()["key"]).post(
        "/api/v1/api-keys/", {"name": "m2", "scopes": ["manage"]}, format="json"
    )
    assert minted.status_code == 201


# --- revoking keys without locking oneself out ---------------------------------------------------


def _prefix(raw: str) -> str:
    parsed = services.split_api_key(raw)
    assert parsed is not None
    return parsed[0]


def test_a_key_revoking_itself_must_confirm(make_key: Callable[..., str]) -> None:
    own = make_key("manage", name="own")
    make_key("manage", name="spare")  # not the last manage key: the self-revoke warns alone
    client = keyed(own)
    url = f"/api/v1/api-keys/{_prefix(own)}/revoke/"
    refused = client.post(url, {}, format="json")
    assert refused.status_code == 409
    assert "key making this request" in refused.content.decode()
    assert "confirm" in refused.content.decode()
    assert ApiKey.objects.get(name="own").revoked_at is None
    done = client.post(url, {"confirm": True}, format="json")
    assert done.status_code == 200
    assert done.json()["revoked"] is True
    assert "key making this request" in done.json()["warning"]
    assert client.get("/api/v1/metrics/").status_code == 401
    assert AuditEntry.objects.get(action="apikey.revoke").actor_role == roles.ADMIN


def test_revoking_the_last_manage_key_must_confirm_even_for_an_admin(
    make_key: Callable[..., str],
) -> None:
    last = make_key("manage", name="last")
    admin = session(roles.ADMIN)
    url = f"/api/v1/api-keys/{_prefix(last)}/revoke/"
    refused = admin.post(url, {}, format="json")
    assert refused.status_code == 409
    assert "last active key with the manage scope" in refused.content.decode()
    assert ApiKey.objects.get(name="last").revoked_at is None
    done = admin.post(url, {"confirm": True}, format="json")
    assert done.status_code == 200 and "last active key" in done.json()["warning"]


def test_revoking_another_key_needs_no_confirmation(make_key: Callable[..., str]) -> None:
    caller = make_key("manage", name="caller")
    other = make_key("manage", name="other")
    reader = make_key("read", name="reader")
    client = keyed(caller)
    for raw in (other, reader):
        response = client.post(f"/api/v1/api-keys/{_prefix(raw)}/revoke/", {}, format="json")
        assert response.status_code == 200 and "warning" not in response.json()
    # Revoking again is a no-op, without a warning: the key is no longer active.
    again = client.post(f"/api/v1/api-keys/{_prefix(other)}/revoke/", {}, format="json")
    assert again.status_code == 200 and "warning" not in again.json()


def test_experimenters_and_viewers_cannot_revoke_keys(make_key: Callable[..., str]) -> None:
    raw = make_key("read", name="r")
    for role in (roles.VIEWER, roles.EXPERIMENTER):
        response = session(role).post(f"/api/v1/api-keys/{_prefix(raw)}/revoke/", {}, format="json")
        assert response.status_code == 403
    assert ApiKey.objects.get(name="r").revoked_at is None


@pytest.mark.django_db(transaction=True)
def test_two_manage_keys_revoking_each_other_at_once_leave_one_active(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = keys_service.api_key_lockout_warnings

    def slow_check(*args: Any, **kwargs: Any) -> list[str]:
        # Widen the window between the check and the revocation: without the lock on every
        # active key, both callers would see two manage keys and revoke each other.
        warnings = check(*args, **kwargs)
        time.sleep(0.5)
        return warnings

    monkeypatch.setattr(keys_service, "api_key_lockout_warnings", slow_check)
    first, _ = services.api_key_create(actor="test", name="a", scopes=["manage"])
    second, _ = services.api_key_create(actor="test", name="b", scopes=["manage"])
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def revoke(caller: ApiKey, target: ApiKey) -> None:
        barrier.wait()
        try:
            services.api_key_revoke(
                actor=f"apikey:{caller.prefix}:{caller.name}",
                prefix=target.prefix,
                requested_by=caller.prefix,
            )
            outcomes[caller.name] = "revoked"
        except LockoutRisk:
            outcomes[caller.name] = "warned"
        finally:
            connection.close()

    threads = [
        threading.Thread(target=revoke, args=(first, second)),
        threading.Thread(target=revoke, args=(second, first)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes.values()) == ["revoked", "warned"]
    assert ApiKey.objects.filter(revoked_at__isnull=True).count() == 1
