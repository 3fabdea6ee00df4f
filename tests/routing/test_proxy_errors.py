"""The proxy's own errors: unit ids that are not UTF-8, and experiments the snapshot lacks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from django.db import connections

from routing.models import Exposure
from tests.model_server import ModelServer
from tests.routing.problems import assert_problem
from tests.routing.test_proxy import make_experiment, run, running_edge

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    server = ModelServer(name="control", score=0.5).start()
    yield server
    server.stop()


@pytest.fixture
def proxy_settings(settings: Any) -> Any:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0
    settings.SNAPSHOT_REFRESH_S = 60.0  # no background refresh: only a miss checks
    return settings


@pytest.mark.parametrize(
    ("source", "attribute", "request_kwargs", "field"),
    [
        ("header", "X-Rampart-Unit", {"headers": {"X-Rampart-Unit": b"bad\xff"}}, "x-rampart-unit"),
        ("header", "Cookie", {"headers": {"Cookie": b"sid=\xfe"}}, "cookie"),
        ("query", "user", {"url": "/proxy/enc/p?user=bad%FF"}, "user"),
        ("query", "user", {"url": "/proxy/enc/p?user=bad%C3&x=1"}, "user"),
        ("cookie", "uid", {"headers": {"Cookie": b"a=1; uid=bad\xff"}}, "uid"),
        ("json_field", "user", {"content": b'{"user": "bad\xff", "x": 1}'}, "user"),
        ("json_field", "user", {"content": b'{"user": "bad\\udcff"}'}, "user"),
    ],
)
def test_a_unit_id_that_is_not_utf8_is_refused_by_the_proxy(
    proxy_settings: Any,
    make_key: Callable[..., str],
    model: ModelServer,
    source: str,
    attribute: str,
    request_kwargs: dict[str, Any],
    field: str,
) -> None:
    model.reset_counts()
    key = make_key("decide")
    experiment_id = make_experiment(
        "enc",
        [("v1", model.url, 0.5), ("v2", model.url, 0.5)],
        unit_source=source,
        unit_attribute=attribute,
    )

    async def scenario() -> httpx.Response:
        async with running_edge(key) as running:
            url = request_kwargs.get("url", "/proxy/enc/p")
            rest = {name: value for name, value in request_kwargs.items() if name != "url"}
            return await running.client.post(url, **rest)

    response = run(scenario)
    assert_problem(response, 400, "invalid_encoding", field)
    assert model.count == 0
    assert not Exposure.objects.filter(experiment_id=experiment_id).exists()


def test_invalid_bytes_outside_the_unit_are_the_models_business(
    proxy_settings: Any, make_key: Callable[..., str], model: ModelServer
) -> None:
    model.reset_counts()
    key = make_key("decide")
    make_experiment(
        "other-bytes",
        [("v1", model.url, 0.5), ("v2", model.url, 0.5)],
        unit_source="json_field",
        unit_attribute="user",
    )

    async def scenario() -> httpx.Response:
        async with running_edge(key) as running:
            return await running.client.post(
                "/proxy/other-bytes/p?q=%FF", content=b'{"user": "u-1", "text": "caf\xe9"}'
            )

    response = run(scenario)
    assert response.status_code == 200, response.text
    assert model.count == 1
    assert Exposure.objects.filter(unit_id="u-1").count() == 1


def test_an_experiment_started_after_the_snapshot_is_proxied(
    proxy_settings: Any, make_key: Callable[..., str], model: ModelServer
) -> None:
    key = make_key("decide")
    make_experiment("first", [("v1", model.url, 1.0), ("v2", model.url, 0.0)])

    def create_in_a_thread() -> None:
        try:
            make_experiment("later", [("v1", model.url, 1.0), ("v2", model.url, 0.0)])
        finally:
            connections.close_all()  # the thread's own connection

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            version = running.edge.context.snapshots.current.version
            # Created and started after the edge loaded its snapshot (refreshed every 60 s).
            await asyncio.to_thread(create_in_a_thread)
            later = await running.client.get("/proxy/later/p", headers={"X-Rampart-Unit": "u"})
            assert running.edge.context.snapshots.current.version > version
            missing = await running.client.get("/proxy/never/p")
            return [later, missing]

    later, missing = run(scenario)
    assert later.status_code == 200, later.text
    assert later.headers["x-rampart-experiment"] == "later"
    assert_problem(missing, 404, "experiment_not_found", "experiment")


def test_an_unknown_experiment_is_not_on_edge_while_the_database_is_unreachable(
    proxy_settings: Any, make_key: Callable[..., str], model: ModelServer
) -> None:
    key = make_key("decide")
    make_experiment("known", [("v1", model.url, 1.0), ("v2", model.url, 0.0)])

    def unreachable() -> int:
        raise ConnectionError("database unreachable")

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            running.edge.context.snapshots._version_reader = unreachable
            unknown = await running.client.get("/proxy/later/p")
            known = await running.client.get("/proxy/known/p")
            return [unknown, known]

    unknown, known = run(scenario)
    problem = assert_problem(unknown, 503, "experiment_not_on_edge", "experiment")
    assert unknown.headers["retry-after"] == "60" and problem["retry_after_s"] == 60
    assert known.status_code == 200
