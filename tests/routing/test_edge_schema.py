"""The edge's OpenAPI description (routing/edge/openapi.py) tells the truth about a live edge.

schemathesis (every default check: no server error, status codes, content types, headers and
bodies as documented, valid data accepted, invalid data refused, unsupported methods, auth)
runs against ``uvicorn config.asgi:application`` on the edge's operations of
``/api/schema/``, with a bounded number of examples.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from experiments import services
from routing.edge import openapi_schemas
from routing.edge.batch import MAX_EPOCH_SECONDS
from routing.edge.exposures_api import MAX_EXPOSURES_PER_BATCH, MAX_KEY_LENGTH
from routing.edge.ingest import MAX_EVENT_ID_LENGTH, MAX_EVENTS_PER_BATCH, MAX_NAME_LENGTH
from routing.edge.inputs import MAX_BATCH_UNITS
from routing.edge.labels import MAX_LABEL_LENGTH, MAX_LABELS_PER_BATCH, MAX_REQUEST_ID_LENGTH
from routing.edge.problems import TITLES
from tests.model_server import ModelServer
from tests.processes import free_port, start_process, stop_process, wait_for_http

pytestmark = pytest.mark.django_db(transaction=True)

EDGE_PREFIXES = ("/v1/", "/proxy/", "/api/features/")
MAX_EXAMPLES = 15
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = """
[dictionaries.experiments]
values = ["ranker"]

[dictionaries.client_keys]
values = [{client_keys}]

[parameters]
"path.experiment" = {{ dictionary = "experiments", probability = 0.5 }}
"query.experiment" = {{ dictionary = "experiments", probability = 0.5 }}
"path.client_key" = {{ dictionary = "client_keys", probability = 0.5 }}
"""


def test_the_description_keeps_the_edges_limits() -> None:
    assert openapi_schemas.MAX_BATCH_UNITS == MAX_BATCH_UNITS
    assert openapi_schemas.MAX_EVENTS_PER_BATCH == MAX_EVENTS_PER_BATCH
    assert openapi_schemas.MAX_EXPOSURES_PER_BATCH == MAX_EXPOSURES_PER_BATCH
    assert openapi_schemas.MAX_KEY_LENGTH == MAX_KEY_LENGTH
    assert openapi_schemas.MAX_EVENT_ID_LENGTH == MAX_EVENT_ID_LENGTH
    assert openapi_schemas.MAX_NAME_LENGTH == MAX_NAME_LENGTH
    assert openapi_schemas.MAX_EPOCH_SECONDS == MAX_EPOCH_SECONDS
    assert openapi_schemas.MAX_LABELS_PER_BATCH == MAX_LABELS_PER_BATCH
    assert openapi_schemas.MAX_LABEL_REQUEST_ID_LENGTH == MAX_REQUEST_ID_LENGTH
    assert openapi_schemas.MAX_LABEL_LENGTH == MAX_LABEL_LENGTH


def test_every_problem_code_is_documented() -> None:
    documented = (Path(__file__).parents[2] / "docs" / "errors.md").read_text()
    missing = [code for code in TITLES if f"`{code}`" not in documented]
    assert not missing, f"docs/errors.md lacks {missing}"


def test_the_iso_timestamp_pattern_ends_before_this_year() -> None:
    import re

    pattern = re.compile(
        openapi_schemas.timestamp_schema(1_780_000_000.0, 300)["oneOf"][1]["pattern"]
    )
    # 1_780_000_000 is in 2026: years up to 2025 match, 2026 does not.
    assert pattern.match("2025-12-28T23:59:59Z") and pattern.match("1999-01-01T00:00:00+05:30")
    assert not pattern.match("2026-01-01T00:00:00Z")
    assert not pattern.match("9999-12-28T00:00:00Z")


@pytest.fixture
def live_edge(make_key: Callable[..., str], tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """The whole ASGI application (edge and Django) with one running experiment.

    Yields its URL, a key with the decide, ingest and read scopes, and a client key (scope
    sdk) for the GrowthBook payload.
    """
    model = ModelServer(name="control", score=0.5, keep_requests=False).start()
    services.experiment_create(
        actor="test",
        key="ranker",
        name="ranker",
        kind="ab",
        variants=[
            services.VariantInput(key="v1", upstream_url=model.url, weight=0.5, is_control=True),
            services.VariantInput(key="v2", upstream_url=model.url, weight=0.5),
        ],
    )
    services.experiment_start(actor="test", key="ranker")
    key = make_key("decide", "ingest", "read")
    sdk_key = make_key("sdk")
    port = free_port()
    process = start_process(
        [
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http",
            "routing.edge.server:EdgeHttpProtocol",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={
            "EDGE_REQUIRE_KEY": "true",
            "SNAPSHOT_REFRESH_S": "0.5",
            # The clock-skew limit moves with the clock, which a schema generated once cannot
            # follow to the second: a boundary value just past its maximum would be accepted a
            # second later. Set beyond the calendar, the limit is the fixed year-9999 one and the
            # schema's maximum is exact; test_ingest and test_exposures_api check the skew.
            "EDGE_MAX_CLOCK_SKEW_S": "1000000000000",
        },
        log=tmp_path / "edge.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", timeout=30)
        yield url, key, sdk_key
    finally:
        stop_process(process)
        model.stop()


def test_schemathesis_finds_no_failure_on_the_edge_operations(
    live_edge: tuple[str, str, str], tmp_path: Path
) -> None:
    url, key, sdk_key = live_edge
    auth = {"Authorization": f"Bearer {key}"}
    schema = httpx.get(f"{url}/api/schema/", params={"format": "json"}, headers=auth).json()
    edge_paths = {path for path in schema["paths"] if path.startswith(EDGE_PREFIXES)}
    assert edge_paths == {
        "/v1/decide",
        "/v1/decide/batch",
        "/v1/config",
        "/v1/events",
        "/v1/labels",
        "/v1/exposures",
        "/api/features/{client_key}",
        "/proxy/{experiment}/{path}",
    }
    assert {"RampartEdgeBearer", "RampartEdgeKey"} <= set(schema["components"]["securitySchemes"])
    schema["paths"] = {path: schema["paths"][path] for path in sorted(edge_paths)}
    schema_file = tmp_path / "edge-schema.json"
    schema_file.write_text(json.dumps(schema))
    config_file = tmp_path / "schemathesis.toml"
    # Half the client keys drawn are real: the sdk key (200 and 304) and a key without the
    # scope (403); the others are unknown (401).
    config_file.write_text(CONFIG.format(client_keys=json.dumps(sdk_key) + ", " + json.dumps(key)))
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(config_file),
            "run",
            str(schema_file),
            "--url",
            url,
            "--header",
            f"Authorization: Bearer {key}",
            "--header",
            f"X-Rampart-Key: {key}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "13",
            "--generation-database",
            "none",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        timeout=600,
        check=False,
    )
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "failures" not in report.split("SUMMARY")[-1].lower(), report


def test_the_growthbook_payload_endpoint_is_described_as_it_answers(
    live_edge: tuple[str, str, str],
) -> None:
    url, key, sdk_key = live_edge
    schema = httpx.get(
        f"{url}/api/schema/", params={"format": "json"}, headers={"Authorization": f"Bearer {key}"}
    ).json()
    operation = schema["paths"]["/api/features/{client_key}"]["get"]
    answers = operation["responses"]
    assert set(answers) == {"200", "304", "401", "403", "404", "503"}
    assert operation["security"] == []  # the client key is in the path
    assert answers["200"]["headers"]["ETag"]["required"] is True
    assert answers["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GrowthBookPayload"
    }
    for status in ("401", "403", "404", "503"):
        assert "application/problem+json" in answers[status]["content"], status

    # Each documented answer is one the edge gives, and the 200 body fits its schema.
    features = f"{url}/api/features"
    payload = httpx.get(f"{features}/{sdk_key}")
    assert payload.status_code == 200 and payload.headers["etag"]
    assert payload.headers["access-control-allow-origin"] == "*"
    jsonschema.validate(
        payload.json(),
        {"$ref": "#/components/schemas/GrowthBookPayload", "components": schema["components"]},
    )
    assert payload.json()["features"]["ranker"]["rules"][0]["key"] == "ranker"
    unchanged = httpx.get(
        f"{features}/{sdk_key}", headers={"If-None-Match": payload.headers["etag"]}
    )
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == payload.headers["etag"]
    refused = {
        401: httpx.get(f"{features}/rk_unknown_key"),
        403: httpx.get(f"{features}/{key}"),
        404: httpx.get(f"{features}/a%2Fb"),
    }
    for status, answer in refused.items():
        assert answer.status_code == status, (status, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] in answers[str(status)]["description"]
