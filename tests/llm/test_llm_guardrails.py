"""TTFT, tokens and cost as guarded metrics, on the database: the catalogue rules, rollbacks of a
slow or expensive canary, a canary within its margins, and the per-arm LLM figures.

The guardrails take the user as the unit: the rows below are what the edge writes, per
10-second bucket (``ObservationBucket.llm``: control's TTFT history and the page's figures) and
per user (``UnitLLMOutcome``: one user per answer here, first seen within the bucket)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pytest

from analysis import services as analysis_services
from experiments import services
from experiments.errors import InvalidInput
from experiments.models import Experiment
from routing.models import ObservationBucket, UnitLLMOutcome
from routing.observe.llm_stats import LLMCell, LLMRecord
from routing.observe.unit_llm import ttft_bucket
from tests.analysis.conftest import add_bucket, add_events, add_exposures, later, start_experiment

pytestmark = pytest.mark.django_db


def add_llm_bucket(
    experiment_id: int,
    variant: str,
    *,
    ttft_ms: list[float],
    output_tokens: int,
    prices: tuple[float, float],
    at: datetime,
) -> ObservationBucket:
    """A bucket of streamed answers: each TTFT, 10 input tokens, a fixed output, its cost."""
    cell = LLMCell()
    durations = [t + output_tokens * 10.0 for t in ttft_ms]
    for ttft, duration in zip(ttft_ms, durations, strict=True):
        cell.add(
            LLMRecord(
                duration_ms=duration,
                ttfb_ms=ttft / 2,
                ttft_ms=ttft,
                chunks=output_tokens + 2,
                input_tokens=10,
                output_tokens=output_tokens,
                cost=(10 * prices[0] + output_tokens * prices[1]) / 1e6,
                streamed=True,
            )
        )
    bucket = add_bucket(experiment_id, variant, durations, at=at)
    bucket.llm = cell.to_json()
    bucket.save(update_fields=["llm"])
    start, cost = at.timestamp(), (10 * prices[0] + output_tokens * prices[1]) / 1e6
    UnitLLMOutcome.objects.bulk_create(
        UnitLLMOutcome(
            experiment_id=experiment_id,
            unit_id=f"{variant}-{start}-{i}",
            variant_key=variant,
            first_seen=start + 9.0 * i / len(ttft_ms),
            share=0.5,
            control_share=0.5,
            answers_fast=1,
            answers_slow=1,
            ttft_sum=ttft,
            ttft_count=1,
            output_tokens_sum=output_tokens,
            output_tokens_count=1,
            rate_sum=output_tokens * 1000.0 / duration,
            rate_count=1,
            cost_sum=cost,
            cost_count=1,
            ttft_buckets_fast=f"{ttft_bucket(ttft)}:1",
            ttft_buckets_slow=f"{ttft_bucket(ttft)}:1",
        )
        for i, (ttft, duration) in enumerate(zip(ttft_ms, durations, strict=True))
    )
    return bucket


def _traffic(
    experiment: Any, at: datetime, canary_ttft: float, canary_tokens: int, seed: int
) -> None:
    add_exposures(experiment.pk, "v1", (f"c{i}" for i in range(600)), at)
    add_exposures(experiment.pk, "v2", (f"t{i}" for i in range(600)), at)
    rng = np.random.default_rng(seed)
    for offset in (0, 10, 20):
        for variant, median, tokens in (("v1", 100.0, 20), ("v2", canary_ttft, canary_tokens)):
            values = (median * np.exp(0.3 * rng.standard_normal(300))).tolist()
            add_llm_bucket(
                experiment.pk,
                variant,
                ttft_ms=values,
                output_tokens=tokens,
                prices=(1.0, 2.0),
                at=later(at, offset),
            )


def _row(result: Any, key: str) -> dict[str, Any]:
    return next(m for m in result.snapshot.metrics if m["metric"] == key)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "quantile", "source": "cost", "quantile": 0.9}, "source"),
        ({"kind": "binomial", "source": "output_tokens"}, "source"),
        ({"kind": "ratio", "source": "ttft_ms", "numerator_event": "a"}, "denominator_event"),
    ],
)
def test_catalogue_rules_for_llm_sources(change: dict[str, Any], field: str) -> None:
    values = {"name": "x", "direction": "lower", **change}
    with pytest.raises(InvalidInput) as error:
        services.metric_create(actor="test", key="bad", **values)
    assert field in error.value.errors


def test_slow_ttft_canary_is_rolled_back_on_the_p95_ttft_guardrail(
    metrics: Any, llm_metrics: list[str]
) -> None:
    experiment = start_experiment(
        "slow-ttft",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[{"metric": "ttft-p95", "role": "guardrail", "margin": 0.2}],
    )
    at = later(experiment.step_started_at, 30)
    _traffic(experiment, at, canary_ttft=200.0, canary_tokens=20, seed=1)

    result = analysis_services.analysis_run(experiment_id=experiment.pk, now=later(at, 100))

    assert result is not None and result.snapshot.decision == "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "rolled_back"
    row = _row(result, "ttft-p95")
    assert row["status"] == "breach"
    assert row["method"].startswith("betting e-process on users")
    assert "generative answers' TTFTs" in row["method"]
    assert row["rel_effect"] == pytest.approx(1.0, abs=0.15)  # 200 ms against 100 ms


def test_expensive_canary_is_rolled_back_on_cost_per_request(
    metrics: Any, llm_metrics: list[str]
) -> None:
    experiment = start_experiment(
        "pricey",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[
            {"metric": "cost-per-request", "role": "guardrail", "margin": 0.5},
            {"metric": "tokens-per-s", "role": "secondary"},
        ],
    )
    at = later(experiment.step_started_at, 30)
    # Same TTFT, but 80 output tokens instead of 20: cost (10 + 2·80) vs (10 + 2·20), +240%.
    _traffic(experiment, at, canary_ttft=100.0, canary_tokens=80, seed=2)

    result = analysis_services.analysis_run(experiment_id=experiment.pk, now=later(at, 100))

    assert result is not None and result.snapshot.decision == "rollback"
    row = _row(result, "cost-per-request")
    assert row["status"] == "breach"
    assert row["rel_effect"] == pytest.approx(170 / 50 - 1, rel=1e-6)
    assert row["method"].startswith("users as the unit (cost / priced answers per user")
    figures = result.snapshot.latency
    assert figures["v1"]["llm"]["cost_mean"] == pytest.approx(50 / 1e6)
    assert figures["v2"]["llm"]["output_tokens_mean"] == 80
    # 80 tokens over ~100 + 800 ms (about 88/s) against 20 over ~100 + 200 ms (about 66/s).
    assert figures["v2"]["llm"]["tokens_per_s_mean"] == pytest.approx(88, rel=0.05)
    assert figures["v1"]["llm"]["tokens_per_s_mean"] == pytest.approx(66, rel=0.05)


def test_a_canary_within_its_margins_is_not_rolled_back(
    metrics: Any, llm_metrics: list[str]
) -> None:
    experiment = start_experiment(
        "fine",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[
            {"metric": "ttft-p95", "role": "guardrail", "margin": 0.2},
            {"metric": "cost-per-request", "role": "guardrail", "margin": 0.5},
            {"metric": "output-tokens", "role": "guardrail", "margin": 0.1},
        ],
    )
    at = later(experiment.step_started_at, 30)
    _traffic(experiment, at, canary_ttft=100.0, canary_tokens=20, seed=3)

    result = analysis_services.analysis_run(experiment_id=experiment.pk, now=later(at, 100))

    assert result is not None and result.snapshot.decision != "rollback"
    assert Experiment.objects.get(pk=experiment.pk).status == "running"
    assert {_row(result, k)["status"] for k in ("ttft-p95", "cost-per-request")} <= {"ok"}
    llm = result.snapshot.latency["v2"]["llm"]
    assert llm["ttft_n"] == 900 and 80 < llm["ttft_p50"] < 120
    assert llm["approx_requests"] == 0 and llm["streams"] == 900


def test_the_experiment_page_shows_ttft_tokens_and_cost_per_version(
    metrics: Any, llm_metrics: list[str]
) -> None:
    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    experiment = start_experiment(
        "page",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[{"metric": "cost-per-request", "role": "guardrail", "margin": 0.5}],
    )
    at = later(experiment.step_started_at, 30)
    _traffic(experiment, at, canary_ttft=100.0, canary_tokens=80, seed=4)
    analysis_services.analysis_run(experiment_id=experiment.pk, now=later(at, 100))
    web = Client()
    web.force_login(User.objects.create_user("viewer", password="pw-for-tests-only"))

    page = web.get(reverse("analysis:results", args=["page"]))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="llm-table"' in html and "Generative answers per version" in html
    # v1: 10 input tokens at $1 and 20 output tokens at $2 per million: $0.000050 an answer.
    assert "$0.000050" in html and "$0.000170" in html
    assert "from usage" in html

    data = web.get(reverse("analysis:chart-data", args=["page"])).json()
    v2 = data["llm"]["v2"]
    assert len(v2["cost_mean"]) == len(data["times"]) == 1
    assert v2["cost_mean"][0] == pytest.approx(170 / 1e6)
    assert v2["ttft_p95"][0] > v2["ttft_p50"][0] > 0
    assert v2["tokens_per_s_mean"][0] == pytest.approx(88, rel=0.05)


def test_cost_per_conversion_is_a_ratio_of_the_proxys_cost_events_to_purchases(
    metrics: Any, llm_metrics: list[str]
) -> None:
    services.metric_create(
        actor="test",
        key="cost-per-conversion",
        name="Cost per conversion",
        kind="ratio",
        numerator_event="llm_cost",
        denominator_event="purchase",
        direction="lower",
    )
    experiment = start_experiment(
        "per-conversion",
        ramp=[(0.5, 3600, 10), (1.0, 0, 0)],
        metrics=[{"metric": "cost-per-conversion", "role": "guardrail", "margin": 0.5}],
    )
    at = later(experiment.step_started_at, 30)
    control = add_exposures(experiment.pk, "v1", (f"c{i}" for i in range(300)), at)
    canary = add_exposures(experiment.pk, "v2", (f"t{i}" for i in range(300)), at)
    rng = np.random.default_rng(5)
    rows = []
    for units, cost, buy in ((control, 1e-4, 0.2), (canary, 8e-4, 0.25)):
        for unit in units:
            rows.append((unit, "llm_cost", float(cost * rng.uniform(0.5, 1.5)), later(at, 5)))
            if rng.random() < buy:
                rows.append((unit, "purchase", 1.0, later(at, 20)))
    add_events(rows)

    # After the 10-minute exposure window of the users has closed.
    result = analysis_services.analysis_run(experiment_id=experiment.pk, now=later(at, 700))

    assert result is not None and result.snapshot.decision == "rollback"
    row = _row(result, "cost-per-conversion")
    assert row["status"] == "breach"
    # Eight times the cost for a quarter more conversions: about 6.4 times the cost per sale.
    assert 4.5 < row["rel_effect"] + 1 < 9
