"""schemathesis against the live server: every operation of /api/schema/, every default check.

A real uvicorn (`config.asgi:application`, the same app production runs) serves the test
database; schemathesis runs its CLI against it with a fixed seed and a bounded number of
examples per operation, so the run takes a few minutes on 2 cores and is reproducible.

To extend it when operations are added to the schema (the edge's, for example): they are
picked up from the schema by themselves. Add identifiers that make them reach real objects
to what `_seed_objects()` returns, and any operation-specific expectation to `OPERATION_CONFIG`.
A failure prints schemathesis' own report (each failure with a curl line to reproduce it)
and the tail of the server log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from analysis import services as analysis_services
from experiments import services
from experiments.models import ApiKey
from tests.factories import create_experiment
from tests.model_server import ModelServer
from tests.processes import start_app_server, stop_process, wait_for_http

SEED = int(os.environ.get("RAMPART_FUZZ_SEED", "20261204"))
MAX_EXAMPLES = int(os.environ.get("RAMPART_FUZZ_EXAMPLES", "80"))
# Share of generated path parameters replaced by the identifier of a real object.
KNOWN_ID_PROBABILITY = 0.7

# Cross-field rules that JSON Schema cannot state (variant weights summing to 1, exactly one
# control, ramp shares increasing, references to existing metrics and variants, the fields a
# metric kind needs, a blank reason after trimming) make a schema-valid body a 400. The
# other default expectations of positive_data_acceptance stay as schemathesis has them.
OPERATION_CONFIG = """
[[operations]]
include-method-regex = "^(POST|PATCH)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]
"""

# The proxy passes its model's answers through unchanged, whatever their status or type. An
# experiment the fuzzer created itself points at whatever upstream URL it drew, so what came
# back through it would be that URL's answer, not Rampart's. The proxy is therefore fuzzed
# through the seeded experiments, whose variants are live model servers, and through a name
# that exists nowhere (Rampart's own 404 problem).
PROXIED_EXPERIMENTS = [
    "fuzz-draft",
    "fuzz-running",
    "fuzz-paused",
    "fuzz-completed",
    "fuzz-rolled-back",
    "no-such-experiment",
]
PROXY_CONFIG = """
[[operations]]
include-path-regex = "^/proxy/"
parameters = { "path.experiment" = { dictionary = "proxied", probability = 1.0 } }
"""

pytestmark = pytest.mark.timeout(900)


def _toml_list(values: list[Any]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _seed_objects(metrics: dict[str, Any], model_urls: list[str]) -> dict[str, list[Any]]:
    """Experiments in every state, a webhook and spare keys, named for the fuzzer to find.

    The variants point at live model servers, so the proxy's operations answer as they do in
    production; a 502 from an address where nothing listens would be a true server error.
    """
    control_url, canary_url = model_urls
    variants = [
        {"key": "v1", "upstream_url": control_url, "weight": 0.5, "is_control": True},
        {"key": "v2", "upstream_url": canary_url, "weight": 0.5},
    ]
    states: dict[str, list[str]] = {
        "fuzz-draft": [],
        "fuzz-running": ["start"],
        "fuzz-paused": ["start", "pause"],
        "fuzz-completed": ["start", "complete"],
        "fuzz-rolled-back": ["start", "rollback"],
    }
    for key, steps in states.items():
        create_experiment(key, variants=variants)
        for step in steps:
            if step == "start":
                services.experiment_start(actor="fuzz-setup", key=key)
            elif step == "pause":
                services.experiment_pause(actor="fuzz-setup", key=key, reason="setup")
            elif step == "complete":
                services.experiment_complete(
                    actor="fuzz-setup", key=key, winner_key="v2", reason="setup"
                )
            else:
                services.experiment_rollback(actor="fuzz-setup", key=key, reason="setup")
    running = services.experiment_start(actor="fuzz-setup", key="fuzz-running").experiment
    analysis_services.analysis_run(experiment_id=running.pk)
    webhook = analysis_services.webhook_create(
        actor="fuzz-setup",
        name="fuzz",
        url="http://127.0.0.1:9/never-delivered",
        secret="fuzz-secret-0123456789",
        enabled=False,
    )
    spare = [
        services.api_key_create(actor="fuzz-setup", name=f"spare-{i}", scopes=["read"])[0]
        for i in range(3)
    ]
    # Parameter -> identifiers of real objects (`key` names experiments and metrics); a bare
    # name is a path parameter, "query.<name>" a query parameter.
    return {
        "key": [*states, *(m.key for m in metrics.values())],
        "webhook_id": [webhook.pk],
        "prefix": [key.prefix for key in spare],
    }


def _config(known_ids: dict[str, list[Any]]) -> str:
    """schemathesis.toml: each path parameter draws real identifiers from a dictionary."""
    # Nothing is remembered between runs: each run is the seed's, and writes nothing outside.
    lines = ["[cache]", "enabled = false", "", "[generation]", 'database = "none"', ""]
    lines.append("[parameters]")
    for index, parameter in enumerate(known_ids):
        # A bare name is a path parameter; "query.experiment" or "body.unit" name others.
        binding = parameter if "." in parameter else f"path.{parameter}"
        lines.append(
            f'"{binding}" = {{ dictionary = "ids{index}", probability = {KNOWN_ID_PROBABILITY} }}'
        )
    for index, values in enumerate(known_ids.values()):
        lines += ["", f"[dictionaries.ids{index}]", f"values = {_toml_list(values)}"]
    lines += ["", "[dictionaries.proxied]", f"values = {_toml_list(PROXIED_EXPERIMENTS)}"]
    return "\n".join(lines) + "\n" + OPERATION_CONFIG + PROXY_CONFIG


@pytest.fixture
def model_urls() -> Iterator[list[str]]:
    servers = [ModelServer(name=name, keep_requests=False).start() for name in ("v1", "v2")]
    try:
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def served_app(transactional_db: None, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    log = tmp_path / "server.log"
    server, url = start_app_server(log=log)
    try:
        wait_for_http(f"{url}/healthz")
        yield url, log
    finally:
        stop_process(server)


@pytest.mark.skipif(
    connection.vendor != "sqlite", reason="the SQLite leg runs schemathesis (issue 13)"
)
def test_schemathesis_finds_no_failures_on_any_operation(
    served_app: tuple[str, Path],
    metrics: dict[str, Any],
    model_urls: list[str],
    make_key: Callable[..., str],
    tmp_path: Path,
) -> None:
    url, server_log = served_app
    known_ids = _seed_objects(metrics, model_urls)
    own_key = make_key("manage", "read", "decide", "ingest", name="schemathesis")
    own_prefix = services.split_api_key(own_key)[0]  # type: ignore[index]
    assert own_prefix not in known_ids["prefix"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(known_ids))

    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"{url}/api/schema/",
            "--header",
            f"Authorization: Bearer {own_key}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            # One worker: with two, schemathesis builds Hypothesis strategies in two threads,
            # and CPython 3.11's ast.parse (used to describe their filters) is not thread-safe
            # there ("SystemError: AST constructor recursion depth mismatch", a CI failure).
            "--workers",
            "1",
            "--request-timeout",
            "30",  # generous: a loaded CI machine must not turn slowness into failures
            "--report",
            "junit",
            "--report-junit-path",
            str(tmp_path / "schemathesis-junit.xml"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=840,
    )
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    server_tail = "\n".join(server_log.read_text(errors="replace").splitlines()[-40:])
    assert run.returncode == 0, (
        f"schemathesis exit code {run.returncode}\n{output[-20000:]}\n"
        f"--- server log (tail) ---\n{server_tail}"
    )
    assert "Tested:" in output, output[-3000:]
    # It never revoked the key it authenticates with (only the spare keys it was given).
    assert ApiKey.objects.get(prefix=own_prefix).revoked_at is None
