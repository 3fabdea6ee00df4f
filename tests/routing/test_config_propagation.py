"""A change made through the management API reaches two real edge processes within ~1 s."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rest_framework.test import APIClient

from experiments.selectors import experiment_view_get
from rampart_sdk.assignment import assign, build_assignment_spec
from tests.factories import experiment_payload
from tests.processes import free_port, start_process, stop_process, wait_for_http

# The bound: SNAPSHOT_REFRESH_S (1 s) plus the time to rebuild, with slack for a
# busy CI machine.
PROPAGATION_BOUND_S = 2.0
REFRESH_S = "1.0"


@pytest.fixture
def two_edges(
    transactional_db: None, tmp_path: Path, make_key: Callable[..., str]
) -> Iterator[tuple[list[str], str]]:
    key = make_key("decide")
    processes = []
    urls = []
    try:
        for index in range(2):
            port = free_port()
            processes.append(
                start_process(
                    [
                        "-m",
                        "uvicorn",
                        "config.asgi:application",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--no-access-log",
                        "--lifespan",
                        "on",
                    ],
                    env={"SNAPSHOT_REFRESH_S": REFRESH_S, "EDGE_REQUIRE_KEY": "true"},
                    log=tmp_path / f"edge-{index}.log",
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_for_http(f"{url}/v1/config", timeout=30)
        yield urls, key
    finally:
        for process in processes:
            stop_process(process)


def _wait_until(
    urls: list[str], key: str, query: dict[str, str], done: Callable[[dict[str, Any]], bool]
) -> float:
    """Seconds until every edge answers ``query`` with a decision for which ``done`` holds."""
    started = time.monotonic()
    pending = set(urls)
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=2.0) as client:
        while pending and time.monotonic() - started < 3 * PROPAGATION_BOUND_S:
            for url in sorted(pending):
                response = client.get(f"{url}/v1/decide", params=query)
                if response.status_code == 200 and done(response.json()):
                    pending.discard(url)
            time.sleep(0.01)
    assert not pending, f"edges {sorted(pending)} never answered the new decision"
    return time.monotonic() - started


def test_weight_change_and_rollback_reach_both_edges(
    two_edges: tuple[list[str], str], api: APIClient, metrics: Any
) -> None:
    urls, key = two_edges
    created = api.post("/api/v1/experiments/", experiment_payload(kind="ab"), format="json")
    assert created.status_code == 201, created.json()
    assert api.post("/api/v1/experiments/ranker-v2/start/").status_code == 200
    view = experiment_view_get(key="ranker-v2")
    spec = build_assignment_spec(
        experiment_key=view.key, variant_keys=["v1", "v2"], weights=[0.5, 0.5]
    )
    # A unit in v2 at 50/50 moves to v1 when v2's weight drops to 0.
    unit = next(u for u in (f"user-{i}" for i in range(100)) if assign(spec, u).variant_key == "v2")
    query = {"experiment": "ranker-v2", "unit": unit}
    _wait_until(urls, key, query, lambda d: d["variant"] == "v2" and d["reason"] == "assigned")

    changed = api.patch(
        "/api/v1/experiments/ranker-v2/", {"weights": {"v1": 1.0, "v2": 0.0}}, format="json"
    )
    assert changed.status_code == 200, changed.json()
    weight_s = _wait_until(urls, key, query, lambda d: d["variant"] == "v1")

    rolled = api.post("/api/v1/experiments/ranker-v2/rollback/", {"reason": "test"}, format="json")
    assert rolled.status_code == 200, rolled.json()
    rollback_s = _wait_until(urls, key, query, lambda d: d["reason"] == "rolled_back_to_control")

    print(
        f"\nconfig propagation to 2 edges (SNAPSHOT_REFRESH_S={REFRESH_S}): "
        f"weight change {weight_s:.3f} s, rollback {rollback_s:.3f} s"
    )
    assert weight_s < PROPAGATION_BOUND_S
    assert rollback_s < PROPAGATION_BOUND_S
