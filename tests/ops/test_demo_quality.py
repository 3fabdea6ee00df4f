"""`make demo ARGS="--scenario quantized|degraded --exit"`: real ONNX models, labels, accuracy.

Run as tests/ops/test_demo.py runs the other scenarios (``python -m scripts.demo --exit`` on
this test's database): real onnxruntime model servers, the edge with the proxy and the labels
API, a Celery worker and beat. The int8 canary is faster at p95 (as the proxy measured it, and
per prediction in one process) and keeps its accuracy, so it is promoted; the one trained on
corrupted labels is rolled back on the accuracy guardrail while its latency passes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from experiments.models import AuditEntry, Experiment
from routing.models import Label, Prediction
from tests.ops.test_demo import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_int8_canary_keeps_its_accuracy_and_is_promoted(tmp_path: Path) -> None:
    result, summary = run_demo(tmp_path, "--scenario", "quantized")
    assert summary["status"] == "completed" and summary["winner"] == "v2"
    assert summary["audit_actions"][-1] == "complete"
    assert "int8 98" in result.stdout or "int8 99" in result.stdout
    # The int8 canary is faster at p95, as the proxy measured it over the whole experiment.
    latency = summary["latency_p95_ms"]
    print(f"p95 at the proxy: {latency}; in-process: {summary['model_latency_us']}")
    assert latency["v2"] < latency["v1"]
    # Per prediction in one process, the versions taking turns: int8 at least 1.3x faster.
    in_process = summary["model_latency_us"]
    assert in_process["int8"]["p95_us"] * 1.3 < in_process["fp32"]["p95_us"]
    assert summary["labels_sent"] > 0 and summary["label_batches_failed"] == 0
    assert summary["metrics"]["rampart_rollbacks_total"] == 0
    experiment = Experiment.objects.get(key="ranker-canary")
    assert experiment.status == "completed" and experiment.winner is not None
    predictions = Prediction.objects.filter(experiment=experiment)
    assert predictions.filter(status="ok").count() > 0
    assert not predictions.exclude(status="ok").exists()
    assert Label.objects.count() == summary["labels_sent"]


def test_the_degraded_canary_is_rolled_back_on_accuracy(tmp_path: Path) -> None:
    result, summary = run_demo(tmp_path, "--scenario", "degraded")
    assert summary["status"] == "rolled_back"
    evidence = summary["evidence"]
    assert evidence["metric"] == "accuracy" and evidence["arm"] == "v2"
    assert evidence["harm_bound"] > evidence["margin"] == 0.01
    assert "GUARDRAIL BREACHED, rolled back: Accuracy is" in result.stdout
    kinds = Counter(message["kind"] for message in summary["slack_messages"])
    assert kinds["rollback"] == 1, kinds
    served = summary["served_after_decision"]
    assert served and set(served) == {"v1"}
    rollback = AuditEntry.objects.get(experiment__key="ranker-canary", action="rollback")
    assert rollback.after["evidence"]["metric"] == "accuracy"
