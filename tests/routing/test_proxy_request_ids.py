"""Every proxied answer of a quality experiment carries X-Rampart-Request-Id, errors included.

The real edge and ProxyApp in process (as in test_proxy.py), forwarding to real model servers
on loopback: ``tests.model_server`` in a thread, ``tests.e2e.flaky_model`` (always failing) in
its own process, and a port nothing listens on. Failures covered: the passed-on 5xx, 502
unreachable, 504 timeout, 502 circuit open, the fallback to control and control failing after
it, and 504 when the arm left no time to ask control.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.model_server import ModelServer, closed_url, free_port
from tests.routing.test_proxy import make_experiment, run, running_edge

QUALITY = {"quality_enabled": True, "quality_prediction_path": "score"}
ROOT = Path(__file__).resolve().parents[2]
ID = "x-rampart-request-id"


@pytest.fixture(scope="module")
def control() -> Iterator[ModelServer]:
    server = ModelServer(name="control", score=0.5).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def flaky() -> Iterator[str]:
    """``tests.e2e.flaky_model`` in its own process, failing every request with HTTP 500."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.flaky_model", "--port", str(port), "--error-rate", "1"],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the flaky model server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def proxy_settings(settings: Any) -> Any:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0
    settings.PROXY_BREAKER_FAILURES = 1000
    settings.PROXY_BREAKER_COOLDOWN_S = 60.0
    settings.PROXY_READ_TIMEOUT_S = 0.5
    settings.PROXY_CONNECT_TIMEOUT_S = 1.0
    return settings


def _ids(answers: list[httpx.Response]) -> list[str]:
    ids = [answer.headers[ID] for answer in answers]
    assert len(set(ids)) == len(ids)
    return ids


@pytest.mark.django_db(transaction=True)
def test_failed_answers_without_fallback_carry_the_request_id(
    proxy_settings: Any, make_key: Callable[..., str], control: ModelServer, flaky: str
) -> None:
    proxy_settings.PROXY_BREAKER_FAILURES = 2
    key = make_key("decide")
    make_experiment(
        "failing",
        [("v1", control.url, 0.4), ("v2", flaky, 0.3), ("v3", closed_url(), 0.3)],
        fallback_to_control=False,
        **QUALITY,
    )
    make_experiment(
        "plain", [("v1", control.url, 0.5), ("v2", flaky, 0.5)], fallback_to_control=False
    )

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            post = running.client.post
            v1 = running.units_for("failing", "v1", 1)[0]
            v2 = running.units_for("failing", "v2", 1)[0]
            v3 = running.units_for("failing", "v3", 1)[0]
            plain = running.units_for("plain", "v2", 1)[0]
            return [
                await post("/proxy/failing/p", headers={"X-Rampart-Unit": v1}),
                # The flaky model's 500, passed on.
                await post("/proxy/failing/p", headers={"X-Rampart-Unit": v2}),
                # Control too slow: 504.
                await post(
                    "/proxy/failing/p", headers={"X-Rampart-Unit": v1, "X-Model-Delay": "2"}
                ),
                # Nothing listens: 502, twice, then the breaker is open: 502 without a call.
                await post("/proxy/failing/p", headers={"X-Rampart-Unit": v3}),
                await post("/proxy/failing/p", headers={"X-Rampart-Unit": v3}),
                await post("/proxy/failing/p", headers={"X-Rampart-Unit": v3}),
                # Without quality tracking, no id, errors or not.
                await post("/proxy/plain/p", headers={"X-Rampart-Unit": plain}),
            ]

    answers = run(scenario)
    assert [answer.status_code for answer in answers] == [200, 500, 504, 502, 502, 502, 500]
    _ids(answers[:6])
    assert answers[2].json()["code"] == "upstream_timeout"
    assert answers[3].json()["code"] == "upstream_unavailable"
    assert "circuit breaker is open" in answers[5].json()["detail"]
    assert ID not in answers[6].headers


@pytest.mark.django_db(transaction=True)
def test_fallback_answers_carry_the_request_id(
    proxy_settings: Any, make_key: Callable[..., str], control: ModelServer, flaky: str
) -> None:
    proxy_settings.PROXY_DEADLINE_S = 0.4
    proxy_settings.PROXY_READ_TIMEOUT_S = 5.0
    key = make_key("decide")
    make_experiment("fallback", [("v1", control.url, 0.5), ("v2", flaky, 0.5)], **QUALITY)

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            post = running.client.post
            v2 = running.units_for("fallback", "v2", 1)[0]
            return [
                # The canary fails, control answers.
                await post("/proxy/fallback/p", headers={"X-Rampart-Unit": v2}),
                # The canary fails, and so does control: its 500 is passed on.
                await post(
                    "/proxy/fallback/p", headers={"X-Rampart-Unit": v2, "X-Model-Status": "503"}
                ),
                # The canary took the whole deadline: 504 without asking control.
                await post(
                    "/proxy/fallback/p", headers={"X-Rampart-Unit": v2, "X-Model-Delay": "1"}
                ),
            ]

    answers = run(scenario)
    assert [answer.status_code for answer in answers] == [200, 503, 504]
    _ids(answers)
    assert answers[0].headers["x-rampart-served-by"] == "v1"
    assert answers[1].headers["x-rampart-served-by"] == "v1"
    assert "no time was left" in answers[2].json()["detail"]
