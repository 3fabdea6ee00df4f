"""`make demo --exit` end to end: a slow canary is rolled back, a healthy one is promoted.

Each test runs ``python -m scripts.demo --exit`` as a user would (it is what ``make demo
ARGS=--exit`` runs), on this test's database (SQLite file, or PostgreSQL and Redis when the
suite runs on them) with its own data directory, and checks the outcome three ways: the
demo's exit code and printed story, its JSON summary, and the database itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from experiments.models import AuditEntry, Experiment
from tests.processes import ROOT, child_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# The demo gives up by itself after --timeout seconds; this only guards against a hang.
PROCESS_TIMEOUT_S = 360


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.demo",
            "--exit",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "demo"),
            "--summary",
            str(summary),
            "--timeout",
            "240",
            *args,
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        check=False,
    )
    logs = tmp_path / "demo" / "logs"
    worker_log = (logs / "worker.log").read_text()[-3000:] if logs.exists() else ""
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}\n{worker_log}"
    return result, json.loads(summary.read_text())


def test_the_slow_canary_is_rolled_back_with_evidence_and_one_slack_message(
    tmp_path: Path,
) -> None:
    result, summary = run_demo(tmp_path)
    assert summary["status"] == "rolled_back"
    assert summary["audit_actions"][:2] == ["create", "start"]
    assert summary["audit_actions"][-1] == "rollback"
    evidence = summary["evidence"]
    assert evidence["metric"] == "latency-p95"
    assert evidence["arm"] == "v2" and evidence["control_arm"] == "v1"
    # The p95 guardrail stops at the first look where its bet at the margin wins, so the
    # always-valid bound is at least the margin (higher once the nested bets win too).
    assert evidence["harm_bound"] >= evidence["margin"] == 0.1
    assert evidence["p_value"] < 0.05 and evidence["rel_effect"] > 0.1
    # The Slack stand-in printed exactly one rollback message. The platform also announces
    # each ramp step before it (and, depending on its policy, changes made by hand).
    kinds = Counter(message["kind"] for message in summary["slack_messages"])
    assert kinds["rollback"] == 1, kinds
    assert set(kinds) <= {"manual", "advance", "rollback"}, kinds
    assert result.stdout.count("Slack stand-in received: 🚨 Rolled back") == 1
    assert "GUARDRAIL BREACHED, rolled back: p95 latency" in result.stdout
    assert "always-valid interval" in result.stdout
    # Traffic after the rollback went to control only; returning users stayed sticky.
    served = summary["served_after_decision"]
    assert served and set(served) == {"v1"}
    assert summary["switches_to_control_before_decision"] == 0
    assert summary["other_switches"] == 0
    assert summary["failed_predictions"] == 0
    assert summary["events_sent"] > 0 and summary["event_batches_failed"] == 0
    assert summary["metrics"]["rampart_rollbacks_total"] == 1
    assert summary["seconds_to_decision"] < 180
    # The database agrees with what the demo printed.
    experiment = Experiment.objects.get(key="ranker-canary")
    assert experiment.status == "rolled_back"
    rollback = AuditEntry.objects.get(experiment=experiment, action="rollback")
    assert rollback.actor == "rampart:analysis"
    assert rollback.after["evidence"]["metric"] == "latency-p95"


def test_the_healthy_canary_is_promoted(tmp_path: Path) -> None:
    result, summary = run_demo(tmp_path, "--scenario", "healthy")
    assert summary["status"] == "completed" and summary["winner"] == "v2"
    actions = summary["audit_actions"]
    assert actions.count("advance") == 5 and actions[-1] == "complete"
    kinds = Counter(message["kind"] for message in summary["slack_messages"])
    assert kinds["advance"] == 5 and kinds["complete"] == 1, kinds
    assert set(kinds) <= {"manual", "advance", "complete"}, kinds
    assert "canary completed, v2 is the winner" in result.stdout
    served = summary["served_after_decision"]
    assert served and set(served) == {"v2"}
    assert summary["other_switches"] == 0
    assert summary["metrics"]["rampart_rollbacks_total"] == 0
    experiment = Experiment.objects.get(key="ranker-canary")
    assert experiment.status == "completed" and experiment.winner is not None
    assert experiment.winner.key == "v2"
