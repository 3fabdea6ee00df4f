"""Per-variant token prices through the API: stored, returned, and refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from experiments.models import Experiment
from experiments.selectors import experiment_view_get
from tests.factories import experiment_payload
from tests.problems import assert_problem, messages_by_field


def variants(**prices: Any) -> list[dict[str, Any]]:
    return [
        {"key": "v1", "upstream_url": "http://127.0.0.1:9001", "weight": 0.5, "is_control": True},
        {"key": "v2", "upstream_url": "http://127.0.0.1:9002", "weight": 0.5, **prices},
    ]


def test_prices_are_stored_and_returned(api: APIClient, metrics: Any) -> None:
    response = api.post(
        "/api/v1/experiments/",
        experiment_payload(variants=variants(price_input_per_m=3.0, price_output_per_m=15.0)),
        format="json",
    )
    assert response.status_code == 201, response.json()
    v1, v2 = response.json()["variants"]
    assert (v1["price_input_per_m"], v1["price_output_per_m"]) == (None, None)
    assert (v2["price_input_per_m"], v2["price_output_per_m"]) == (3.0, 15.0)
    view = experiment_view_get(key="ranker-v2")
    assert [v.prices for v in view.variants] == [None, (3.0, 15.0)]


@pytest.mark.parametrize(
    ("prices", "field", "fragment"),
    [
        ({"price_input_per_m": 3.0}, "variants[1].price_output_per_m", "both"),
        ({"price_output_per_m": 3.0}, "variants[1].price_input_per_m", "both"),
        ({"price_input_per_m": -1, "price_output_per_m": 1}, "variants[1].price_input_per_m", "0"),
        (
            {"price_input_per_m": "x", "price_output_per_m": 1},
            "variants[1].price_input_per_m",
            "number",
        ),
    ],
)
def test_bad_prices_are_refused_naming_the_field(
    api: APIClient, metrics: Any, prices: dict[str, Any], field: str, fragment: str
) -> None:
    response = api.post(
        "/api/v1/experiments/", experiment_payload(variants=variants(**prices)), format="json"
    )
    errors = messages_by_field(assert_problem(response, 400, "validation_error"))
    assert field in errors, errors
    assert fragment in " ".join(errors[field])
    assert not Experiment.objects.exists()
