"""`make demo ARGS="--scenario shadow --exit"`: two shadows get their paired verdicts.

Run as tests/ops/test_demo.py runs the other scenarios (``python -m scripts.demo --exit`` on
this test's database): the edge with the proxy mirroring every request to two shadows, a Celery
worker and beat, three model stand-ins (``scripts.demo_shadow``). The shadow answering like
control, 10% faster, is "ready to canary"; the one giving another label on about 20% of
requests is "worse than control"; each is alerted once in Slack, and the canary started from
the ready one is created once however often it is asked for.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from analysis.models import ShadowAnalysis
from experiments.models import AuditEntry, Experiment
from tests.ops.test_demo import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_shadow_scenario_shows_both_paired_verdicts_and_starts_one_canary(
    tmp_path: Path,
) -> None:
    result, summary = run_demo(tmp_path, "--scenario", "shadow")
    assert summary["verdicts"] == {"v2-fast": "ready", "v3-retrained": "worse"}
    worse = summary["latest"]["v3-retrained"]
    assert 0.05 < worse["disagreement"]["lower"] < 0.2 < worse["disagreement"]["upper"]
    assert "disagrees with control on at least" in summary["reasons"]["v3-retrained"]
    ready = summary["latest"]["v2-fast"]
    assert ready["disagreement"]["estimate"] == 0.0
    # 10% faster on the same requests. The verdict comes as soon as every interval is within
    # its tolerance (the paired p95 settles after about 250 users), which can be before the
    # mean's interval excludes 1, so: within the tolerance, estimated faster.
    assert ready["latency_ratio"]["estimate"] < 1.0
    assert ready["latency_ratio"]["upper"] < 1.1
    assert ready["p95_pair_ratio"]["estimate"] < 1.0
    assert ready["p95_pair_ratio"]["upper"] < 1.2
    assert "ready to canary" in result.stdout and "worse than control" in result.stdout
    kinds = Counter(message["kind"] for message in summary["slack_messages"])
    assert kinds["shadow_verdict"] == 2, summary["slack_messages"]
    canary = summary["canary"]
    assert canary["key"] == "ranker-shadow-v2-fast-canary"
    assert (canary["first_status"], canary["second_status"]) == (201, 200)
    assert canary["second_created"] is False
    stored = Experiment.objects.get(key=canary["key"])
    assert stored.status == "draft" and stored.kind == "canary"
    assert {v.key for v in stored.variants.all()} == {"v1", "v2-fast"}
    assert AuditEntry.objects.filter(action="canary_from_shadow").count() == 1
    rows = {row.variant_key: row.verdict for row in ShadowAnalysis.objects.all()}
    assert rows == summary["verdicts"]
