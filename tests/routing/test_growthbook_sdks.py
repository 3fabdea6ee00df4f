"""GrowthBook's own SDKs, fed by ``GET /api/features/{client_key}``, agree with /v1/decide.

A real server (``uvicorn config.asgi:application``, as production runs it) serves every
experiment shape; GrowthBook's JavaScript SDK (``@growthbook/growthbook`` from npm, under
node) and its Python SDK (``growthbook`` from PyPI) fetch the payload over HTTP and evaluate
10,000 unit ids per experiment. Each value must equal the edge's ``variant``, and each SDK's
tracking callback must fire exactly for the units the edge counts (``in_experiment``), with
the same variant. Ids stay inside the Basic Multilingual Plane: GrowthBook's Python SDK
hashes code points where the JavaScript SDK (which Rampart follows) hashes UTF-16 code units
(tests/routing/sdk/test_parity.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from growthbook import GrowthBook

from experiments import services
from experiments.selectors import config_version_current
from tests.processes import ROOT, start_app_server, stop_process, wait_for_http
from tests.routing.test_growthbook_parity import PARITY_IDS

# The JavaScript SDK under test, installed from npm into NODE_CACHE on first use.
GROWTHBOOK_JS: str = "@growthbook/growthbook@1.8.0"
NODE_CACHE = ROOT / "var" / "node"
NODE_SCRIPT = Path(__file__).with_name("growthbook_sdk.cjs")
DECIDE_BATCH = 1000


def growthbook_js() -> Path:
    """The node_modules folder holding GROWTHBOOK_JS, installed with npm if missing."""
    name, _, version = GROWTHBOOK_JS.rpartition("@")
    modules = NODE_CACHE / "node_modules"
    manifest = modules / name / "package.json"
    if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
        npm = shutil.which("npm")
        assert npm, "npm is required (.ci/run installs nodejs and npm)"
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund", GROWTHBOOK_JS],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return modules


@dataclass(frozen=True)
class Server:
    url: str
    decide_key: str
    sdk_key: str

    def sync(self, timeout_s: float = 15.0) -> None:
        """Wait until the edge's snapshot holds the current config version."""
        wanted = config_version_current()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = httpx.get(
                f"{self.url}/api/features/{self.sdk_key}", timeout=5.0, follow_redirects=False
            )
            if response.status_code == 200 and response.json()["rampart"]["version"] >= wanted:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the edge did not reach config version {wanted}")

    def decide(self, key: str, units: list[str]) -> list[dict[str, Any]]:
        decisions: list[dict[str, Any]] = []
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            for start in range(0, len(units), DECIDE_BATCH):
                response = client.post(
                    "/v1/decide/batch",
                    json={"experiment": key, "units": units[start : start + DECIDE_BATCH]},
                    headers={"Authorization": f"Bearer {self.decide_key}"},
                )
                assert response.status_code == 200, response.text
                decisions.extend(response.json()["decisions"])
        return decisions


@pytest.fixture
def server(
    transactional_db: None, tmp_path: Path, make_key: Callable[..., str]
) -> Iterator[Server]:
    decide_key = make_key("decide")
    sdk_key = make_key("sdk", name="front end")
    process, url = start_app_server(
        log=tmp_path / "uvicorn.log",
        env={"EDGE_REQUIRE_KEY": "true", "SNAPSHOT_REFRESH_S": "0.1"},
    )
    try:
        wait_for_http(f"{url}/healthz", timeout=30)
        yield Server(url=url, decide_key=decide_key, sdk_key=sdk_key)
    finally:
        stop_process(process)


def _variants(weights: tuple[float, ...]) -> list[services.VariantInput]:
    keys = ["control", *(f"arm-{n}" for n in range(1, len(weights)))]
    return [
        services.VariantInput(
            key=key,
            name=f"Version {key}",
            upstream_url=f"http://127.0.0.1:{9001 + n}",
            weight=weight,
            is_control=n == 0,
        )
        for n, (key, weight) in enumerate(zip(keys, weights, strict=True))
    ]


def _ab(key: str, weights: tuple[float, ...], **extra: Any) -> None:
    services.experiment_create(
        actor="test", key=key, name=key, kind="ab", variants=_variants(weights), **extra
    )
    services.experiment_start(actor="test", key=key)


def _canary(key: str, weights: tuple[float, ...], shares: list[float], **extra: Any) -> None:
    services.experiment_create(
        actor="test",
        key=key,
        name=key,
        kind="canary",
        variants=_variants(weights),
        ramp_steps=[services.RampStepInput(canary_share=share) for share in shares],
        **extra,
    )
    services.experiment_start(actor="test", key=key)


OVERRIDDEN = {unit: ("arm-1" if n % 2 else "control") for n, unit in enumerate(PARITY_IDS[:40])}


def create_every_shape() -> dict[str, str]:
    """One experiment per shape; returns key -> shape."""
    _ab("ab-even", (0.5, 0.5), seed="s1")
    _ab("ab-weighted", (0.2, 0.3, 0.5), seed="90850943850283058242805")
    _ab("ab-old-hash", (0.25, 0.25, 0.25, 0.25), hash_version=1)
    _ab("ab-coverage", (0.37, 0.63), coverage=0.4, seed="old")
    _ab("ab-namespace", (0.25, 0.25, 0.5), coverage=0.9, namespace=("ranker", 0.3, 0.8))
    _ab("ab-overrides", (0.5, 0.5), overrides=OVERRIDDEN)
    _canary("canary-first-step", (0.5, 0.5), [0.05, 0.25, 1.0])
    _canary("canary-second-step", (0.5, 0.5), [0.05, 0.25, 1.0], overrides={"qa-anna": "arm-1"})
    services.experiment_advance_ramp(actor="test", key="canary-second-step")
    _canary("canary-two-lanes", (0.5, 0.15, 0.35), [0.1, 1.0])
    _canary("canary-three-lanes", (0.25, 0.25, 0.25, 0.25), [0.3, 1.0])
    _canary("canary-three-namespaced", (0.4, 0.2, 0.2, 0.2), [0.6, 1.0], namespace=("ns", 0, 0.5))
    _canary("rolled-back", (0.5, 0.5), [0.5, 1.0], overrides={PARITY_IDS[0]: "arm-1"})
    services.experiment_rollback(actor="test", key="rolled-back", reason="latency guardrail")
    _ab("completed", (0.5, 0.5))
    services.experiment_complete(actor="test", key="completed", winner_key="arm-1")
    _ab("paused", (0.5, 0.5))
    services.experiment_pause(actor="test", key="paused")
    services.experiment_create(
        actor="test", key="draft", name="draft", kind="ab", variants=_variants((0.5, 0.5))
    )
    return {
        "ab-even": "A/B",
        "ab-weighted": "weighted",
        "ab-old-hash": "hash version 1",
        "ab-coverage": "coverage",
        "ab-namespace": "namespace",
        "ab-overrides": "overrides",
        "canary-first-step": "canary ramp step 1",
        "canary-second-step": "canary ramp step 2",
        "canary-two-lanes": "two canaries",
        "canary-three-lanes": "three canaries (several control intervals)",
        "canary-three-namespaced": "three canaries in a namespace",
        "rolled-back": "rolled back",
        "completed": "completed",
        "paused": "paused",
        "draft": "draft",
    }


def _expected(decisions: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(value, tracked variant) an SDK must give: tracked only when the edge counts it."""
    return [(d["variant"], d["variant"] if d["in_experiment"] else None) for d in decisions]


def _python_sdk(server: Server, keys: list[str], units: list[str]) -> dict[str, list[Any]]:
    tracked: list[str | None] = [None]

    def on_viewed(experiment: Any, result: Any, **_: Any) -> None:
        tracked[0] = result.key

    growthbook = GrowthBook(
        api_host=server.url, client_key=server.sdk_key, on_experiment_viewed=on_viewed
    )
    growthbook.load_features()
    results: dict[str, list[Any]] = {}
    try:
        for key in keys:
            values = []
            for unit in units:
                tracked[0] = None
                growthbook.set_attributes({"id": unit})
                values.append((growthbook.eval_feature(key).value, tracked[0]))
            results[key] = values
    finally:
        growthbook.destroy()
    return results


def _javascript_sdk(
    server: Server, keys: list[str], units: list[str], *, exposures_for: str | None
) -> dict[str, Any]:
    job = {
        "apiHost": server.url,
        "clientKey": server.sdk_key,
        "features": keys,
        "units": units,
        "exposuresFor": exposures_for,
    }
    completed = subprocess.run(
        ["node", str(NODE_SCRIPT)],
        input=json.dumps(job).encode(),
        capture_output=True,
        env={**os.environ, "NODE_PATH": str(growthbook_js())},
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    output: dict[str, Any] = json.loads(completed.stdout)
    output["results"] = {
        key: [(value, tracked) for value, tracked in values]
        for key, values in output["results"].items()
    }
    return output


def test_javascript_and_python_sdks_agree_with_decide_on_every_shape(server: Server) -> None:
    shapes = create_every_shape()
    server.sync()
    keys = list(shapes)
    expected = {key: _expected(server.decide(key, PARITY_IDS)) for key in keys}

    javascript = _javascript_sdk(server, keys, PARITY_IDS, exposures_for="ab-even")
    python = _python_sdk(server, keys, PARITY_IDS)
    for sdk, results in (("javascript", javascript["results"]), ("python", python)):
        mismatches = {
            f"{key} ({shapes[key]})": sum(
                ours != theirs for ours, theirs in zip(expected[key], results[key], strict=True)
            )
            for key in keys
        }
        assert mismatches == dict.fromkeys(mismatches, 0), sdk

    # Every shape exercises what it is named for.
    reasons = {
        key: {d["reason"] for d in server.decide(key, PARITY_IDS[:2000])}
        for key in ("ab-coverage", "ab-namespace", "ab-overrides", "canary-three-namespaced")
    }
    assert "not_in_coverage" in reasons["ab-coverage"]
    assert "not_in_namespace" in reasons["ab-namespace"]
    assert "override" in reasons["ab-overrides"]
    assert "not_in_namespace" in reasons["canary-three-namespaced"]
    for key in ("rolled-back", "paused", "draft"):
        assert {value for value, _ in expected[key]} == {"control"}, key
    assert {value for value, _ in expected["completed"]} == {"arm-1"}
    arms = {"canary-first-step": 2, "canary-two-lanes": 3, "canary-three-lanes": 4}
    for key, count in arms.items():
        served = {value for value, _ in expected[key]}
        assert served == {"control", *(f"arm-{n}" for n in range(1, count))}, key

    # The payload says where GrowthBook needed a workaround.
    payload = httpx.get(f"{server.url}/api/features/{server.sdk_key}").json()
    assert set(payload["rampart"]["notes"]) == {"canary-three-lanes", "canary-three-namespaced"}
    # Lanes: canary 1 | control | canary 2 | control | canary 3; the two middle control
    # intervals touch and merge, so control holds two intervals: two experiment rules.
    rules = payload["features"]["canary-three-lanes"]["rules"]
    assert [rule["id"] for rule in rules] == [
        "canary-three-lanes/experiment/1",
        "canary-three-lanes/experiment/2",
    ]

    # The JavaScript tracking callback posted its exposures with the client key.
    exposures = javascript["exposures"]
    tracked = sum(variant is not None for _, variant in expected["ab-even"])
    assert exposures["status"] == 202, exposures
    assert exposures["sent"] == tracked
    assert exposures["body"] == {"accepted": tracked, "ignored": 0}


def test_the_payload_endpoint_speaks_http_as_the_sdks_and_browsers_expect(server: Server) -> None:
    _canary("ranker", (0.5, 0.5), [0.05, 1.0], overrides={"qa-anna": "arm-1"})
    server.sync()
    url = f"{server.url}/api/features/{server.sdk_key}"
    first = httpx.get(url)
    assert first.status_code == 200
    assert first.headers["access-control-allow-origin"] == "*"
    assert first.headers["cache-control"] == "no-cache"
    etag = first.headers["etag"]
    # Nothing in the payload is secret: no upstream URL, no key.
    assert "127.0.0.1" not in first.text and server.sdk_key not in first.text
    assert first.json()["features"]["ranker"]["rules"][0] == {
        "id": "ranker/override/arm-1",
        "condition": {"id": {"$in": ["qa-anna"]}},
        "force": "arm-1",
    }

    # The Python SDK revalidates with If-None-Match; an unchanged payload is a bodiless 304.
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert httpx.get(url, headers={"If-None-Match": f'W/{etag}, "other"'}).status_code == 304
    growthbook = GrowthBook(api_host=server.url, client_key=server.sdk_key)
    growthbook.load_features()
    growthbook.set_attributes({"id": "qa-anna"})
    assert growthbook.get_feature_value("ranker", None) == "arm-1"
    growthbook.destroy()

    # A rollback changes the payload, its ETag, and every unit's value.
    services.experiment_rollback(actor="test", key="ranker", reason="errors")
    server.sync()
    after = httpx.get(url, headers={"If-None-Match": etag})
    assert after.status_code == 200 and after.headers["etag"] != etag
    assert after.json()["features"]["ranker"] == {"defaultValue": "control", "rules": []}

    # Keys: an unknown key is 401, a key without the sdk scope 403; both stay CORS-readable.
    unknown = httpx.get(f"{server.url}/api/features/rk_nope_nope")
    assert unknown.status_code == 401 and unknown.json()["code"] == "not_authenticated"
    assert unknown.headers["access-control-allow-origin"] == "*"
    wrong_scope = httpx.get(f"{server.url}/api/features/{server.decide_key}")
    assert wrong_scope.status_code == 403 and "'sdk'" in wrong_scope.json()["detail"]
    assert httpx.get(f"{server.url}/api/features/").status_code == 404
    assert httpx.get(f"{url}/more").status_code == 404
    refused = httpx.post(url)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD, OPTIONS"
    # Django still answers the rest of /api/.
    assert httpx.get(f"{server.url}/api/v1/experiments/").status_code in (401, 403)

    # CORS preflight, for the payload and for the exposures a browser's callback posts.
    for path, method in ((url, "GET"), (f"{server.url}/v1/exposures", "POST")):
        preflight = httpx.options(
            path,
            headers={
                "Origin": "https://shop.example",
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204, path
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert method in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
