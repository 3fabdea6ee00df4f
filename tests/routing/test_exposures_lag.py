"""/v1/exposures when the edge's snapshot lags the SDK's config: confirm, then check again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from experiments import services
from routing.edge.app import build_edge
from routing.edge.context import EdgeContext
from routing.edge.exposures_api import ExposuresApp
from routing.observe.recorder import ExposureRecorder
from routing.snapshot import SnapshotHolder, load_snapshot
from tests.factories import create_experiment
from tests.routing.edge_factories import serve_edge
from tests.routing.problems import assert_problem

pytestmark = pytest.mark.django_db(transaction=True)


def _start(key: str) -> None:
    create_experiment(key, "ab")
    services.experiment_start(actor="test", key=key)


def _exposure_of(key: str) -> dict[str, Any]:
    route = load_snapshot().route(key)
    assert route is not None
    unit = next(f"u-{n}" for n in range(100) if route.decide(f"u-{n}").in_experiment)
    return {"experiment": key, "unit_id": unit, "variant": route.decide(unit).variant}


def test_an_experiment_started_after_the_snapshot_is_accepted(
    tmp_path: Path, make_key: Callable[..., str], metrics: Any
) -> None:
    _start("first")
    key = make_key("decide")
    env = {"EDGE_REQUIRE_KEY": "true", "SNAPSHOT_REFRESH_S": "60"}
    with serve_edge("exposures_edge", log=tmp_path / "edge.log", env=env) as served:
        _start("later")  # after the edge loaded its snapshot; no refresh for a minute

        def post(body: Any) -> httpx.Response:
            return httpx.post(
                f"{served.url}/v1/exposures",
                content=orjson.dumps(body),
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )

        accepted = post({"exposures": [_exposure_of("later")]})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json() == {"accepted": 1, "ignored": 0}
        unknown = post({"exposures": [{**_exposure_of("first"), "experiment": "never"}]})
        assert_problem(unknown, 409, "assignment_conflict", "experiment", index=0)


def test_a_conflict_the_edge_cannot_confirm_is_not_on_edge(metrics: Any) -> None:
    _start("first")

    def unreachable() -> int:
        raise ConnectionError("database unreachable")

    holder = SnapshotHolder(refresh_s=5, version_reader=unreachable)
    holder.refresh_now()
    context = EdgeContext(
        snapshots=holder, exposures=ExposureRecorder(flush_s=60), require_key=False
    )
    edge = build_edge(mounts={"/v1/exposures": ExposuresApp}, context=context)
    exposures = edge.mounts["/v1/exposures"]
    assert isinstance(exposures, ExposuresApp)
    body = {"exposures": [{**_exposure_of("first"), "experiment": "later"}]}

    async def call() -> httpx.Response:
        await exposures.startup()
        try:
            transport = httpx.ASGITransport(app=edge)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
                return await client.post("/v1/exposures", content=orjson.dumps(body))
        finally:
            await exposures.shutdown()

    response = asyncio.run(call())
    problem = assert_problem(response, 503, "experiment_not_on_edge", "experiment")
    assert response.headers["retry-after"] == "5" and problem["retry_after_s"] == 5
