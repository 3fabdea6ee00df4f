"""Authentication and scopes: 401 without a key, 403 with the wrong scope, revoked keys refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from experiments import services
from experiments.models import ApiKey
from tests.factories import experiment_payload
from tests.problems import assert_problem

pytestmark = pytest.mark.django_db


def _client(key: str | None) -> APIClient:
    client = APIClient()
    if key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_no_key_is_401_with_bearer_challenge() -> None:
    response = _client(None).get("/api/v1/experiments/")
    assert_problem(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("raw", ["rk_nope_nope", "garbage", "rk__x"])
def test_unknown_or_malformed_key_is_401(raw: str) -> None:
    assert_problem(_client(raw).get("/api/v1/experiments/"), 401, "not_authenticated")


def test_read_scope_can_read_but_not_write(make_key: Callable[..., str], metrics: Any) -> None:
    client = _client(make_key("read"))
    assert client.get("/api/v1/experiments/").status_code == 200
    response = client.post("/api/v1/experiments/", experiment_payload(), format="json")
    assert_problem(response, 403, "permission_denied")


@pytest.mark.parametrize("scope", ["decide", "ingest"])
def test_edge_scopes_cannot_use_the_management_api(
    make_key: Callable[..., str], scope: str
) -> None:
    assert _client(make_key(scope)).get("/api/v1/experiments/").status_code == 403


def test_manage_scope_implies_read(make_key: Callable[..., str]) -> None:
    assert _client(make_key("manage")).get("/api/v1/metrics/").status_code == 200


def test_revoked_key_is_refused(make_key: Callable[..., str]) -> None:
    raw = make_key("manage")
    client = _client(raw)
    assert client.get("/api/v1/experiments/").status_code == 200
    prefix = services.split_api_key(raw)[0]  # type: ignore[index]
    services.api_key_revoke(actor="test", prefix=prefix, confirmed=True)
    response = client.get("/api/v1/experiments/")
    assert "revoked" in assert_problem(response, 401, "not_authenticated")["detail"]


def test_wrong_secret_with_a_real_prefix_is_refused(make_key: Callable[..., str]) -> None:
    raw = make_key("manage")
    forged = raw[:-4] + ("AAAA" if not raw.endswith("AAAA") else "BBBB")
    assert _client(forged).get("/api/v1/experiments/").status_code == 401


def test_last_use_is_recorded_and_only_the_hash_is_stored(make_key: Callable[..., str]) -> None:
    raw = make_key("read")
    key = ApiKey.objects.get()
    assert key.last_used_at is None
    assert raw not in (key.key_hash, key.prefix)
    _client(raw).get("/api/v1/metrics/")
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_logged_in_people_use_the_api_with_session_and_csrf() -> None:
    user = get_user_model().objects.create_user("ana", password="pw-for-tests", is_staff=True)
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get("/api/v1/experiments/").status_code == 200
    # Session-authenticated writes without a CSRF token are refused.
    response = client.post("/api/v1/metrics/", {"key": "m"}, format="json")
    assert "CSRF" in assert_problem(response, 403, "permission_denied")["detail"]
