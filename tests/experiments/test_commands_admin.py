"""Management commands and the Django admin: keys printed once, demo login, every model listed."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from experiments import services
from experiments.models import ApiKey

pytestmark = pytest.mark.django_db


def test_createapikey_prints_the_key_alone_on_the_last_line() -> None:
    out = io.StringIO()
    call_command("createapikey", "--name", "ci", "--scopes", "manage,read", stdout=out)
    raw = out.getvalue().strip().splitlines()[-1]
    assert raw.startswith("rk_") and " " not in raw
    key = ApiKey.objects.get()
    assert key.scopes == ["manage", "read"]
    assert services.api_key_matches(raw, key.key_hash)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/api/v1/experiments/").status_code == 200


def test_createapikey_refuses_an_unknown_scope() -> None:
    with pytest.raises(CommandError, match="scopes"):
        call_command("createapikey", "--name", "ci", "--scopes", "root", stdout=io.StringIO())
    assert not ApiKey.objects.exists()


def test_createdemoadmin_gives_a_working_login() -> None:
    call_command("createdemoadmin", "--password", "pw-for-the-test", stdout=io.StringIO())
    call_command("createdemoadmin", "--password", "pw-for-the-test", stdout=io.StringIO())
    user = get_user_model().objects.get(username="admin")
    assert user.is_superuser and user.is_staff
    assert list(user.groups.values_list("name", flat=True)) == ["admin"]
    assert Client().login(username="admin", password="pw-for-the-test")


ADMIN_PAGES = [
    "experiment",
    "variant",
    "metric",
    "experimentmetric",
    "rampstep",
    "auditentry",
    "apikey",
    "configversion",
]


@pytest.mark.parametrize("model", ADMIN_PAGES)
def test_every_model_is_in_the_admin(admin_client: Client, model: str, metrics: object) -> None:
    response = admin_client.get(f"/admin/experiments/{model}/")
    assert response.status_code == 200


def test_the_admin_never_shows_the_slack_webhook(admin_client: Client, metrics: object) -> None:
    from tests.factories import create_experiment

    experiment = create_experiment("exp")
    experiment.slack_webhook_url = "https://hooks.example.com/services/T/B/very-secret"
    experiment.save()
    page = admin_client.get(f"/admin/experiments/experiment/{experiment.pk}/change/")
    assert page.status_code == 200
    assert "very-secret" not in page.content.decode()
