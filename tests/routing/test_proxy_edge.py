"""The routing proxy behind a real uvicorn edge process: load with client disconnects, the
connection pool's bounds, and observations written by the running flusher and on shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from experiments import services
from routing.models import Exposure, ObservationBucket
from tests.model_server import ModelServer
from tests.processes import free_port, start_process, stop_process, wait_for_http

pytestmark = pytest.mark.django_db(transaction=True)

POOL_LIMIT_PER_HOST = 16
TCP_ESTABLISHED = "01"
TCP_CLOSE_WAIT = "08"


def sockets_to(port: int) -> dict[str, int]:
    """Loopback TCP sockets whose remote end is ``port``, by state (from /proc/net/tcp)."""
    states: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port:
            states[fields[3]] = states.get(fields[3], 0) + 1
    return states


@pytest.fixture
def models() -> Iterator[tuple[ModelServer, ModelServer]]:
    control = ModelServer(name="control", score=0.5, keep_requests=False).start()
    canary = ModelServer(name="canary", score=0.75, keep_requests=False).start()
    yield control, canary
    control.stop()
    canary.stop()


@pytest.fixture
def edge(
    request: pytest.FixtureRequest,
    make_key: Callable[..., str],
    models: tuple[ModelServer, ModelServer],
    tmp_path: Path,
) -> Iterator[tuple[str, str, int, subprocess.Popen[bytes]]]:
    """A uvicorn edge serving the proxy, for a running 50/50 A/B test on the two models.

    Indirect parametrisation can override its environment (a dict of settings)."""
    control, canary = models
    key = make_key("decide")
    experiment = services.experiment_create(
        actor="test",
        key="load",
        name="load",
        kind="ab",
        variants=[
            services.VariantInput(key="v1", upstream_url=control.url, weight=0.5, is_control=True),
            services.VariantInput(key="v2", upstream_url=canary.url, weight=0.5),
        ],
    )
    services.experiment_start(actor="test", key="load")
    port = free_port()
    process = start_process(
        [
            "-m",
            "uvicorn",
            "tests.model_server:proxy_edge",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={
            "EDGE_REQUIRE_KEY": "true",
            "RECORDER_FLUSH_S": "0.2",
            "PROXY_POOL_LIMIT_PER_HOST": str(POOL_LIMIT_PER_HOST),
            "PROXY_READ_TIMEOUT_S": "5",
            **getattr(request, "param", {}),
        },
        log=tmp_path / "edge.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/proxy/")
        yield url, key, int(experiment.id), process
    finally:
        stop_process(process)


async def load(
    url: str, key: str, *, requests: int, concurrency: int, abandon_every: int
) -> tuple[dict[str, int], int]:
    """Send ``requests`` proxied requests; every ``abandon_every``-th one is slow and its client
    gives up after 150 ms. Returns answers by variant and the number of abandoned requests."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    answered: dict[str, int] = {}
    abandoned = 0
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-Rampart-Key": key}, limits=limits, timeout=10
    ) as client:

        async def one(index: int) -> None:
            nonlocal abandoned
            headers = {"X-Rampart-Unit": f"unit-{index % 300}"}
            async with semaphore:
                if index % abandon_every == 0:
                    headers["X-Model-Delay"] = "3"
                    with pytest.raises(httpx.ReadTimeout):
                        await client.post(
                            "/proxy/load/p", headers=headers, timeout=httpx.Timeout(10, read=0.15)
                        )
                    abandoned += 1
                    return
                response = await client.post("/proxy/load/p", headers=headers, content=b"{}")
                assert response.status_code == 200
                variant = response.headers["x-rampart-variant"]
                answered[variant] = answered.get(variant, 0) + 1

        await asyncio.gather(*(one(index) for index in range(requests)))
    return answered, abandoned


def test_no_connection_leaks_under_load_with_client_disconnects(
    edge: tuple[str, str, int, subprocess.Popen[bytes]], models: tuple[ModelServer, ModelServer]
) -> None:
    url, key, experiment_id, process = edge
    control, canary = models
    peaks = {control.port: 0, canary.port: 0}

    sampling = threading.Event()

    def sample() -> None:
        # In a thread: reading /proc/net/tcp takes milliseconds and must not stall the load.
        while not sampling.wait(0.02):
            for port in peaks:
                peaks[port] = max(peaks[port], sockets_to(port).get(TCP_ESTABLISHED, 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answered, abandoned = asyncio.run(
            load(url, key, requests=2000, concurrency=50, abandon_every=40)
        )
    finally:
        sampling.set()
        sampler.join()
    assert abandoned == 50
    assert sum(answered.values()) == 1950
    # Every abandoned request's upstream call was cancelled: the model saw its client leave.
    deadline = time.monotonic() + 5
    while control.disconnects + canary.disconnects < abandoned and time.monotonic() < deadline:
        time.sleep(0.02)
    assert control.disconnects + canary.disconnects == abandoned
    assert control.completed == answered["v1"]
    assert canary.completed == answered["v2"]
    for port, peak in peaks.items():
        assert 0 < peak <= POOL_LIMIT_PER_HOST, f"{peak} sockets to :{port}"
    # Once idle, what remains is the keep-alive pool: within the limit, nothing half-closed.
    time.sleep(0.3)
    for model in (control, canary):
        states = sockets_to(model.port)
        assert states.get(TCP_ESTABLISHED, 0) <= POOL_LIMIT_PER_HOST
        assert states.get(TCP_CLOSE_WAIT, 0) == 0
    idle_after_first = {port: sockets_to(port).get(TCP_ESTABLISHED, 0) for port in peaks}

    # A second round reuses the pool instead of growing it.
    asyncio.run(load(url, key, requests=300, concurrency=50, abandon_every=1000))
    time.sleep(0.3)
    for port in peaks:
        assert sockets_to(port).get(TCP_ESTABLISHED, 0) <= max(
            idle_after_first[port], POOL_LIMIT_PER_HOST
        )

    # The running flusher wrote observations while the edge was up...
    deadline = time.monotonic() + 5
    while (
        sum(
            ObservationBucket.objects.filter(experiment_id=experiment_id).values_list(
                "count", flat=True
            )
        )
        < 1950 + abandoned + 300
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert process.poll() is None
    counts = {
        variant: sum(
            ObservationBucket.objects.filter(
                experiment_id=experiment_id, variant_key=variant
            ).values_list("count", flat=True)
        )
        for variant in ("v1", "v2")
    }
    assert counts["v1"] == control.count
    assert counts["v2"] == canary.count
    assert counts["v1"] + counts["v2"] == 1950 + abandoned + 300
    assert Exposure.objects.filter(experiment_id=experiment_id).count() == 300


@pytest.mark.parametrize("edge", [{"RECORDER_FLUSH_S": "60"}], indirect=True)
def test_shutdown_flushes_what_is_buffered(
    edge: tuple[str, str, int, subprocess.Popen[bytes]], models: tuple[ModelServer, ModelServer]
) -> None:
    url, key, experiment_id, process = edge
    control, canary = models
    with httpx.Client(base_url=url, headers={"X-Rampart-Key": key}) as client:
        variants = [
            client.get("/proxy/load/p", headers={"X-Rampart-Unit": f"s{i}"}).headers[
                "x-rampart-variant"
            ]
            for i in range(20)
        ]
    # Nothing is written before shutdown: the flush interval is a minute.
    assert not ObservationBucket.objects.filter(experiment_id=experiment_id).exists()
    stop_process(process)  # SIGTERM: uvicorn runs the lifespan shutdown
    # uvicorn re-raises the signal it handled once shut down, hence -SIGTERM, not a crash.
    assert process.returncode in (0, -signal.SIGTERM)
    rows = ObservationBucket.objects.filter(experiment_id=experiment_id)
    assert sum(row.count for row in rows) == 20 == control.count + canary.count
    assert sum(row.count for row in rows if row.variant_key == "v2") == variants.count("v2")
