"""The verdict endpoint, evaluated the way Argo Rollouts and Flagger evaluate it.

A real server (``uvicorn config.asgi:application``) answers; the test plays each tool with
its documented semantics, reading the conditions from the examples in deploy/kubernetes/:

* Argo Rollouts' Web metric provider (argo-rollouts docs/analysis/web.md and
  docs/features/analysis.md): a non-2xx answer is a measurement Error; otherwise the
  ``jsonPath`` result is tested against ``successCondition`` / ``failureCondition``: with
  only a failureCondition, not meeting it is Successful; with both, meeting neither is
  Inconclusive (the rollout pauses).
* Flagger webhooks (flagger docs/usage/webhooks.md): a 2xx answer lets the hook proceed
  (for a ``rollback`` hook: roll back); timeout or non-2xx halts and counts a failed check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from django.utils import timezone

from analysis.models import ResultSnapshot
from analysis.verdict import LatestResult, verdict
from experiments import selectors, services
from tests.factories import create_experiment
from tests.processes import ROOT, start_app_server, stop_process, wait_for_http

KUBERNETES = ROOT / "deploy" / "kubernetes"
CONDITION = re.compile(r'^result == "(pass|fail|running)"$')


def _documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def _template(name: str) -> dict[str, Any]:
    templates = {d["metadata"]["name"]: d for d in _documents("argo-analysis-templates.yaml")}
    template: dict[str, Any] = templates[name]
    return template


def _condition(expression: str | None) -> str | None:
    """The verdict an Argo condition tests, for the one form the examples use."""
    if expression is None:
        return None
    match = CONDITION.match(expression)
    assert match, f"the test's Argo evaluator does not know {expression!r}"
    return match.group(1)


def _json_path(document: Any, path: str) -> Any:
    """Kubernetes JSONPath of the simple form ``{$.a.b}``, as Argo's web provider applies it."""
    assert path.startswith("{$") and path.endswith("}"), path
    value = document
    for part in filter(None, path[2:-1].split(".")):
        value = value[part]
    return value


def argo_measure(server: str, template: str, experiment: str, key: str) -> str:
    """One Argo measurement of the template's metric: Successful, Failed, Inconclusive or Error."""
    metric = _template(template)["spec"]["metrics"][0]
    web = metric["provider"]["web"]
    args = {"rampart-url": server, "experiment": experiment, "rampart-key": key}

    def fill(text: str) -> str:
        return re.sub(r"\{\{ args\.([a-z-]+) \}\}", lambda m: args[m.group(1)], text)

    response = httpx.get(
        fill(web["url"]),
        headers={h["key"]: fill(h["value"]) for h in web["headers"]},
        timeout=web["timeoutSeconds"],
    )
    if not 200 <= response.status_code < 300:
        return "Error"
    result = _json_path(response.json(), web["jsonPath"])
    success = _condition(metric.get("successCondition"))
    failure = _condition(metric.get("failureCondition"))
    if failure is not None and result == failure:
        return "Failed"
    if success is not None:
        if result == success:
            return "Successful"
        return "Inconclusive" if failure is not None else "Failed"
    return "Successful"


def flagger_call(server: str, hook: str, key: str) -> tuple[bool, dict[str, Any]]:
    """Call the example Canary's webhook of this type; (proceeds, body) as Flagger sees it."""
    canary = _documents("flagger-canary.yaml")[0]
    webhook = next(w for w in canary["spec"]["analysis"]["webhooks"] if w["type"] == hook)
    url = webhook["url"].replace("http://rampart.rampart.svc.cluster.local:8000", server)
    payload = {
        "name": canary["metadata"]["name"],
        "namespace": canary["metadata"]["namespace"],
        "phase": "Progressing",
        "checksum": "85d557f47b",
        "metadata": {**webhook["metadata"], "key": key},
    }
    response = httpx.post(url, json=payload, timeout=10)
    return 200 <= response.status_code < 300, response.json()


@pytest.fixture
def server(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    process, url = start_app_server(log=tmp_path / "uvicorn.log")
    try:
        wait_for_http(f"{url}/healthz", timeout=30)
        yield url
    finally:
        stop_process(process)


def _result(key: str, decision: str, reason: str = "") -> None:
    view = selectors.experiment_view_get(key=key)
    ResultSnapshot.objects.create(
        experiment_id=view.id,
        created_at=timezone.now(),
        decision=decision,
        reason=reason or f"analysis says {decision}",
        health={"srm": {"p": 0.4, "flagged": False}},
        exposures={"v1": 900, "v2": 100},
        metrics=[
            {"metric": "error-rate", "role": "guardrail", "arm": "v2", "status": "ok"},
            {"metric": "conversion", "role": "primary", "arm": "v2", "status": "inconclusive"},
        ],
    )


def test_argo_and_flagger_follow_the_verdict_through_a_rollout(
    server: str, metrics: Any, make_key: Callable[..., str]
) -> None:
    read_key = make_key("read")
    create_experiment("ranker-v2", "canary")
    services.experiment_start(actor="test", key="ranker-v2")

    def tools() -> dict[str, Any]:
        return {
            "guard": argo_measure(server, "rampart-guard", "ranker-v2", read_key),
            "gate": argo_measure(server, "rampart-gate", "ranker-v2", read_key),
            **{hook: flagger_call(server, hook, read_key)[0] for hook in FLAGGER_HOOKS},
        }

    # Running, not analysed yet: nothing stops the rollout, nothing promotes it.
    assert tools() == {
        "guard": "Successful",
        "gate": "Inconclusive",
        "rollout": True,
        "confirm-promotion": False,
        "rollback": False,
    }
    _result("ranker-v2", "continue", "not enough evidence yet")
    assert tools()["gate"] == "Inconclusive"

    _result("ranker-v2", "safe_to_promote", "every guardrail is shown non-inferior")
    assert tools() == {
        "guard": "Successful",
        "gate": "Successful",
        "rollout": True,
        "confirm-promotion": True,
        "rollback": False,
    }
    proceeds, body = flagger_call(server, "confirm-promotion", read_key)
    assert body["verdict"] == "pass" and body["evidence"]["decision"] == "safe_to_promote"
    assert [row["metric"] for row in body["evidence"]["guardrails"]] == ["error-rate"]

    # A breached guardrail: Rampart rolls back; Argo aborts, Flagger halts and rolls back.
    _result("ranker-v2", "rollback", "error rate of v2 is above control's")
    services.experiment_rollback(actor="test", key="ranker-v2", reason="error-rate breached")
    assert tools() == {
        "guard": "Failed",
        "gate": "Failed",
        "rollout": False,
        "confirm-promotion": False,
        "rollback": True,
    }
    proceeds, body = flagger_call(server, "rollout", read_key)
    assert not proceeds and body["verdict"] == "fail" and body["status"] == "rolled_back"


FLAGGER_HOOKS = ("rollout", "confirm-promotion", "rollback")


def test_keys_and_errors_as_the_tools_see_them(
    server: str, metrics: Any, make_key: Callable[..., str]
) -> None:
    create_experiment("ranker-v2", "canary")
    url = f"{server}/api/v1/experiments/ranker-v2/verdict"
    # Argo: no key, a key without the read scope, an unknown experiment: measurement errors.
    assert argo_measure(server, "rampart-guard", "ranker-v2", "rk_nope_nope") == "Error"
    assert argo_measure(server, "rampart-guard", "ranker-v2", make_key("decide")) == "Error"
    assert argo_measure(server, "rampart-guard", "no-such", make_key("read")) == "Error"
    assert httpx.get(url).status_code == 401
    forbidden = httpx.get(url, headers={"Authorization": f"Bearer {make_key('sdk')}"})
    assert forbidden.status_code == 403
    missing = httpx.get(
        f"{server}/api/v1/experiments/no-such/verdict",
        headers={"Authorization": f"Bearer {make_key('read')}"},
    )
    assert missing.status_code == 404 and missing.json()["code"] == "experiment_not_found"
    # Flagger: a key in metadata or a header; a bad hook name is a 400 naming the field.
    read_key = make_key("read")
    by_header = httpx.post(url, json={}, headers={"Authorization": f"Bearer {read_key}"})
    assert by_header.status_code == 200 and by_header.json()["verdict"] == "running"
    assert httpx.post(url, json={"metadata": {"key": "rk_bad_key"}}).status_code == 401
    bad_hook = httpx.post(url, json={"metadata": {"key": read_key, "hook": "promote"}})
    assert bad_hook.status_code == 400 and bad_hook.json()["field"].startswith("metadata")


def _view(key: str) -> Any:
    return selectors.experiment_view_get(key=key)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("status", "decision", "expected"),
    [
        ("running", None, "running"),
        ("running", "continue", "running"),
        ("running", "hold", "running"),
        ("running", "advance", "pass"),
        ("running", "safe_to_promote", "pass"),
        ("running", "rollback", "fail"),
        ("paused", "safe_to_promote", "running"),
        ("rolled_back", "safe_to_promote", "fail"),
    ],
)
def test_verdict_rules(metrics: Any, status: str, decision: str | None, expected: str) -> None:
    create_experiment("ranker-v2", "canary")
    services.experiment_start(actor="test", key="ranker-v2")
    if status == "paused":
        services.experiment_pause(actor="test", key="ranker-v2")
    elif status == "rolled_back":
        services.experiment_rollback(actor="test", key="ranker-v2", reason="test")
    latest = None
    if decision is not None:
        latest = LatestResult(
            created_at=timezone.now() - timedelta(seconds=5),
            decision=decision,
            reason="r",
            health={},
            exposures={},
            metrics=[],
        )
    assert verdict(_view("ranker-v2"), latest)[0] == expected


@pytest.mark.django_db
@pytest.mark.parametrize(("winner", "expected"), [("v2", "pass"), ("v1", "fail")])
def test_a_completed_experiment_passes_only_with_a_new_winner(
    metrics: Any, winner: str, expected: str
) -> None:
    create_experiment("ranker-v2", "ab")
    services.experiment_start(actor="test", key="ranker-v2")
    services.experiment_complete(actor="test", key="ranker-v2", winner_key=winner)
    assert verdict(_view("ranker-v2"), None)[0] == expected


def test_the_kubernetes_examples_parse_and_point_at_the_verdict_endpoint() -> None:
    kinds = {
        (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])
        for name in ("argo-analysis-templates.yaml", "argo-rollout.yaml", "flagger-canary.yaml")
        for doc in _documents(name)
    }
    assert kinds == {
        ("argoproj.io/v1alpha1", "AnalysisTemplate", "rampart-guard"),
        ("argoproj.io/v1alpha1", "AnalysisTemplate", "rampart-gate"),
        ("argoproj.io/v1alpha1", "Rollout", "ranker"),
        ("flagger.app/v1beta1", "Canary", "ranker"),
    }
    rollout = _documents("argo-rollout.yaml")[0]["spec"]["strategy"]["canary"]
    assert rollout["analysis"]["templates"] == [{"templateName": "rampart-guard"}]
    gates = [step["analysis"] for step in rollout["steps"] if "analysis" in step]
    assert [g["templates"] for g in gates] == [[{"templateName": "rampart-gate"}]]
    for name in ("rampart-guard", "rampart-gate"):
        spec = _template(name)["spec"]
        secret = next(a for a in spec["args"] if a["name"] == "rampart-key")
        assert secret["valueFrom"]["secretKeyRef"] == {"name": "rampart-verdict", "key": "key"}
        assert spec["metrics"][0]["provider"]["web"]["url"].endswith(
            "/api/v1/experiments/{{ args.experiment }}/verdict"
        )
    canary = _documents("flagger-canary.yaml")[0]
    hooks = {w["type"]: w["metadata"]["hook"] for w in canary["spec"]["analysis"]["webhooks"]}
    assert hooks == {hook: hook for hook in FLAGGER_HOOKS}


def test_flagger_payload_values_must_be_strings(
    server: str, metrics: Any, make_key: Callable[..., str]
) -> None:
    create_experiment("ranker-v2", "canary")
    url = f"{server}/api/v1/experiments/ranker-v2/verdict"
    headers = {"Authorization": f"Bearer {make_key('read')}"}
    for body in ({"metadata": {"key": 7}}, {"phase": 3}, {"metadata": {"hook": None}}):
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == 400, body
    # Fields Flagger may add later are accepted: refusing them would halt every rollout.
    accepted = httpx.post(url, json={"phase": "Progressing", "future": [1]}, headers=headers)
    assert accepted.status_code == 200
