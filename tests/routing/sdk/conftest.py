"""A real edge (uvicorn, events and labels APIs mounted) on the test database, for the SDK tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from experiments.selectors import config_version_current
from tests.processes import free_port, start_process, stop_process, wait_for_http

# Short, so that a change made by a test reaches the edge quickly.
EDGE_REFRESH_S = "0.1"


@dataclass(frozen=True)
class EdgeServer:
    url: str
    key: str

    def sync(self, timeout_s: float = 10.0) -> int:
        """Wait until the edge serves the current config version; returns that version."""
        wanted = config_version_current()
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.key}"}
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/v1/config", headers=headers, timeout=5.0)
            if response.status_code == 200 and response.json()["version"] >= wanted:
                return wanted
            time.sleep(0.02)
        raise TimeoutError(f"the edge did not reach config version {wanted}")


@pytest.fixture
def edge(
    transactional_db: None, tmp_path: Path, make_key: Callable[..., str]
) -> Iterator[EdgeServer]:
    """The edge of tests.routing.edge_factories.labels_edge and a decide+ingest key."""
    key = make_key("decide", "ingest")
    port = free_port()
    process = start_process(
        [
            "-m",
            "uvicorn",
            "--factory",
            "tests.routing.edge_factories:labels_edge",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--lifespan",
            "on",
        ],
        env={"EDGE_REQUIRE_KEY": "true", "SNAPSHOT_REFRESH_S": EDGE_REFRESH_S},
        log=tmp_path / "edge.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/v1/config", timeout=30)
        yield EdgeServer(url=url, key=key)
    finally:
        stop_process(process)
