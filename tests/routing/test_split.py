"""The planned split (routing.split) is what the edge's assignment actually realises."""

from __future__ import annotations

from typing import Any

import pytest

from experiments import selectors, services
from routing.route import ExperimentRoute
from routing.split import planned_split

UNITS = 40_000


def _canary(weights: list[float], share_step: int) -> Any:
    variants = [
        services.VariantInput(
            key="control", upstream_url="http://127.0.0.1:1", weight=weights[0], is_control=True
        ),
        *(
            services.VariantInput(key=f"c{i}", upstream_url="http://127.0.0.1:1", weight=w)
            for i, w in enumerate(weights[1:], start=1)
        ),
    ]
    services.experiment_create(
        actor="t",
        key="split",
        name="split",
        kind="canary",
        variants=variants,
        ramp_steps=[services.RampStepInput(0.1), services.RampStepInput(0.4)],
    )
    services.experiment_start(actor="t", key="split")
    for _ in range(share_step):
        services.experiment_advance_ramp(actor="t", key="split")
    return selectors.experiment_view_get(key="split")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("weights", "step"), [([0.5, 0.5], 0), ([0.4, 0.2, 0.4], 1), ([0.7, 0.1, 0.2], 0)]
)
def test_realised_canary_shares_match_the_planned_split(weights: list[float], step: int) -> None:
    view = _canary(weights, step)
    planned = planned_split(view)
    assert sum(planned.values()) == pytest.approx(1.0)
    route = ExperimentRoute(view)
    counts: dict[str, int] = dict.fromkeys(planned, 0)
    for i in range(UNITS):
        counts[route.decide(f"user-{i}").variant] += 1
    for key, share in planned.items():
        # Binomial standard error at 40k units is at most 0.0025; allow 4 of them.
        assert counts[key] / UNITS == pytest.approx(share, abs=0.01), (key, counts)


@pytest.mark.django_db
def test_ab_split_is_the_configured_weights(metrics: Any) -> None:
    services.experiment_create(
        actor="t",
        key="ab",
        name="ab",
        kind="ab",
        variants=[
            services.VariantInput(
                key="a", upstream_url="http://x.test", weight=0.3, is_control=True
            ),
            services.VariantInput(key="b", upstream_url="http://x.test", weight=0.7),
        ],
    )
    view = selectors.experiment_view_get(key="ab")
    assert planned_split(view) == {"a": pytest.approx(0.3), "b": pytest.approx(0.7)}
