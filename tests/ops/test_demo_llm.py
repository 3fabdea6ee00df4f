"""`make demo ARGS="--scenario llm --exit"` end to end: the large, slow, expensive LLM is rolled
back on its TTFT or cost guardrail, and the story says why in plain words."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from experiments.models import AuditEntry, Experiment
from tests.ops.test_demo import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_large_llm_is_rolled_back_on_ttft_or_cost(tmp_path: Path) -> None:
    result, summary = run_demo(tmp_path, "--scenario", "llm")
    assert summary["status"] == "rolled_back"
    evidence = summary["evidence"]
    assert evidence["metric"] in ("ttft-p95", "cost-per-request"), evidence
    assert evidence["arm"] == "v2" and evidence["control_arm"] == "v1"
    kinds = Counter(message["kind"] for message in summary["slack_messages"])
    assert kinds["rollback"] == 1, kinds
    assert "GUARDRAIL BREACHED, rolled back" in result.stdout
    story = " ".join(result.stdout.split())  # the console wraps long lines
    assert "the guardrails on TTFT (at most +20%) and cost (at most +50%) decide" in story
    # The figures behind the story, from the platform's own analysis.
    llm = summary["llm"]
    assert llm["v2"]["ttft_p95"] > llm["v1"]["ttft_p95"]
    assert llm["v2"]["cost_mean"] > 10 * llm["v1"]["cost_mean"]
    assert llm["v1"]["approx_requests"] == 0 and llm["v1"]["token_requests"] > 0
    served = summary["served_after_decision"]
    assert served and set(served) == {"v1"}
    assert summary["failed_predictions"] == 0
    experiment = Experiment.objects.get(key="ranker-canary")
    assert experiment.status == "rolled_back"
    assert [v.price_output_per_m for v in experiment.variants.order_by("position")] == [0.6, 10.0]
    rollback = AuditEntry.objects.get(experiment=experiment, action="rollback")
    assert rollback.actor == "rampart:analysis"
