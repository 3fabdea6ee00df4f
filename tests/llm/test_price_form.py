"""Token prices in the experiment form: set on create, kept by an edit, refused naming the row."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from experiments import services
from experiments.models import Experiment
from tests.experiments.test_views import experiment_form, field_errors

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(db: None) -> Client:
    User.objects.create_user("alice", password="correct horse battery staple")
    services.user_role_assign(actor="test", username="alice", role="admin")
    client = Client()
    client.force_login(User.objects.get(username="alice"))
    return client


def test_prices_from_the_form_are_stored_and_kept_by_an_edit(web: Client, metrics: Any) -> None:
    prices = {"variants-1-price_input_per_m": "2.5", "variants-1-price_output_per_m": "10"}
    response = web.post(reverse("experiments:create"), experiment_form(**prices))
    assert response.status_code == 302
    variants = Experiment.objects.get(key="ranker-v2").variants.order_by("position")
    assert [(v.price_input_per_m, v.price_output_per_m) for v in variants] == [
        (None, None),
        (2.5, 10.0),
    ]
    page = web.get(reverse("experiments:edit", args=["ranker-v2"])).content.decode()
    assert 'name="variants-1-price_output_per_m" value="10.0"' in page
    # An edit of something else keeps the prices.
    edit = experiment_form(**prices, name="Ranker v2, renamed")
    assert web.post(reverse("experiments:edit", args=["ranker-v2"]), edit).status_code == 302
    variant = Experiment.objects.get(key="ranker-v2").variants.get(key="v2")
    assert (variant.price_input_per_m, variant.price_output_per_m) == (2.5, 10.0)


def test_one_price_without_the_other_is_refused_next_to_the_field(
    web: Client, metrics: Any
) -> None:
    response = web.post(
        reverse("experiments:create"),
        experiment_form(**{"variants-1-price_input_per_m": "2.5"}),
    )
    assert response.status_code == 400
    assert "both" in field_errors(response.content.decode(), "id_variants-1-price_output_per_m")
    assert not Experiment.objects.exists()
