"""One deadline for a whole proxied request: the retry on control gets only what is left.

Real slow model servers on 127.0.0.1 (tests/model_server.py) and small settings. Before the
deadline, a canary slower than PROXY_READ_TIMEOUT_S made the caller wait two full read
timeouts (the canary's, then control's) before a 504.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.model_server import ModelServer
from tests.routing.problems import assert_problem
from tests.routing.test_proxy import make_experiment, run, running_edge

pytestmark = pytest.mark.django_db(transaction=True)

# Timer slack on a loaded machine; below what a second timeout would add.
SLACK_S = 1.0


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[ModelServer, ModelServer]]:
    control = ModelServer(name="control", score=0.5).start()
    canary = ModelServer(name="canary", score=0.75).start()
    yield control, canary
    control.stop()
    canary.stop()


@pytest.fixture
def control_and_canary(
    models: tuple[ModelServer, ModelServer], settings: Any
) -> tuple[ModelServer, ModelServer]:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0
    settings.PROXY_BREAKER_FAILURES = 1000
    settings.PROXY_CONNECT_TIMEOUT_S = 1.0
    for model in models:
        model.reset_counts()
        model.delay_s = 0.0
    return models


def timed_get(key: str, experiment: str) -> tuple[httpx.Response, float]:
    async def scenario() -> tuple[httpx.Response, float]:
        async with running_edge(key) as running:
            started = time.monotonic()
            response = await running.client.get(
                f"/proxy/{experiment}/p", headers={"X-Rampart-Unit": "u1"}
            )
            return response, time.monotonic() - started

    result: tuple[httpx.Response, float] = run(scenario)
    return result


def test_a_slow_canary_and_a_slow_control_answer_504_at_the_deadline(
    control_and_canary: tuple[ModelServer, ModelServer],
    settings: Any,
    make_key: Callable[..., str],
) -> None:
    settings.PROXY_READ_TIMEOUT_S = 2.0
    settings.PROXY_DEADLINE_S = 2.3
    control, canary = control_and_canary
    control.delay_s = canary.delay_s = 8.0
    make_experiment("slow", [("v1", control.url, 0.0), ("v2", canary.url, 1.0)])

    response, elapsed = timed_get(make_key("decide"), "slow")

    assert_problem(response, 504, "upstream_timeout")
    # Without the deadline: 2 s for the canary, then 2 s more for control.
    assert 2.3 - 0.05 <= elapsed <= 2.3 + SLACK_S, elapsed
    # Control was asked with the 0.3 s the canary left.
    assert (canary.count, control.count) == (1, 1)


def test_the_retry_on_control_answers_within_what_is_left(
    control_and_canary: tuple[ModelServer, ModelServer],
    settings: Any,
    make_key: Callable[..., str],
) -> None:
    settings.PROXY_READ_TIMEOUT_S = 1.0
    settings.PROXY_DEADLINE_S = 2.0
    control, canary = control_and_canary
    canary.delay_s = 5.0
    control.delay_s = 0.2
    make_experiment("fallback", [("v1", control.url, 0.0), ("v2", canary.url, 1.0)])

    response, elapsed = timed_get(make_key("decide"), "fallback")

    assert response.status_code == 200
    assert response.headers["x-rampart-variant"] == "v2"
    assert response.headers["x-model"] == "control"
    assert 1.2 - 0.05 <= elapsed <= 2.0 + SLACK_S, elapsed


def test_a_deadline_shorter_than_the_read_timeout_bounds_the_first_attempt(
    control_and_canary: tuple[ModelServer, ModelServer],
    settings: Any,
    make_key: Callable[..., str],
) -> None:
    settings.PROXY_READ_TIMEOUT_S = 5.0
    settings.PROXY_DEADLINE_S = 1.0
    control, canary = control_and_canary
    control.delay_s = 5.0
    make_experiment("control-only", [("v1", control.url, 1.0), ("v2", canary.url, 0.0)])

    response, elapsed = timed_get(make_key("decide"), "control-only")

    assert_problem(response, 504, "upstream_timeout")
    assert 1.0 - 0.05 <= elapsed <= 1.0 + SLACK_S, elapsed


def test_when_the_canary_used_up_the_time_control_is_not_asked(
    control_and_canary: tuple[ModelServer, ModelServer],
    settings: Any,
    make_key: Callable[..., str],
) -> None:
    settings.PROXY_READ_TIMEOUT_S = 3.0
    settings.PROXY_DEADLINE_S = 1.0
    control, canary = control_and_canary
    canary.delay_s = 5.0
    make_experiment("used-up", [("v1", control.url, 0.0), ("v2", canary.url, 1.0)])

    response, elapsed = timed_get(make_key("decide"), "used-up")

    problem = assert_problem(response, 504, "upstream_timeout")
    assert "no time was left" in problem["detail"]
    assert elapsed <= 1.0 + SLACK_S, elapsed
    assert (canary.count, control.count) == (1, 0)
