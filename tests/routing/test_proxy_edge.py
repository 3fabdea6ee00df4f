"""The routing proxy behind a real uvicorn edge process: load with client disconnects, the
connection pool's bounds, and observations written by the running flusher and on shutdown."""

from __future__ import annotations

import asyncio
import os
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


def tcp_listing() -> list[list[str]]:
    """The rows of /proc/net/tcp, split into fields, read in one large read."""
    fd = os.open("/proc/net/tcp", os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 22):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return [line.split() for line in b"".join(chunks).decode().splitlines()[1:]]


def sockets_to(port: int) -> dict[str, int]:
    """Loopback TCP sockets whose remote end is ``port``, by state."""
    states: dict[str, int] = {}
    for fields in tcp_listing():
        if int(fields[2].split(":")[1], 16) == port:
            states[fields[3]] = states.get(fields[3], 0) + 1
    return states


def established_to(port: int) -> set[tuple[str, str]]:
    """ESTABLISHED sockets whose remote end is ``port``, as (local address, inode)."""
    return {
        (fields[1], fields[9])
        for fields in tcp_listing()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == TCP_ESTABLISHED
    }


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
            "routing.edge.server:EdgeHttpProtocol",
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


def raw_request(port: int, key: str, unit: str, *, delay_s: float = 0.0) -> bytes:
    """One keep-alive HTTP/1.1 POST to the proxy, as bytes.

    The load is written on raw asyncio streams rather than httpx: a load generator that costs
    a millisecond of CPU per request would measure itself, not the edge."""
    extra = f"X-Model-Delay: {delay_s}\r\n" if delay_s else ""
    return (
        f"POST /proxy/load/p HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Rampart-Key: {key}\r\n"
        f"X-Rampart-Unit: {unit}\r\n{extra}Content-Length: 2\r\n\r\n{{}}"
    ).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers


async def load(
    port: int, key: str, *, requests: int, concurrency: int, abandon_every: int
) -> tuple[dict[str, int], int]:
    """Send ``requests`` proxied requests over ``concurrency`` keep-alive connections; every
    ``abandon_every``-th one is slow (3 s) and its client hangs up after 250 ms, on a connection
    of its own. Returns answers by variant and the number of abandoned requests."""
    answered: dict[str, int] = {}
    abandoned = 0
    indices = iter(range(requests))

    async def abandon(index: int) -> None:
        nonlocal abandoned
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw_request(port, key, f"unit-{index % 300}", delay_s=3))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.25)
        writer.close()
        await writer.wait_closed()
        abandoned += 1

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index in indices:
            if index % abandon_every == 0:
                await abandon(index)
                continue
            writer.write(raw_request(port, key, f"unit-{index % 300}"))
            status, headers = await read_response(reader)
            assert status == 200
            variant = headers["x-rampart-variant"]
            answered[variant] = answered.get(variant, 0) + 1
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered, abandoned


def test_no_connection_leaks_under_load_with_client_disconnects(
    edge: tuple[str, str, int, subprocess.Popen[bytes]], models: tuple[ModelServer, ModelServer]
) -> None:
    url, key, experiment_id, process = edge
    edge_port = int(url.rsplit(":", 1)[1])
    control, canary = models
    peaks = {control.port: 0, canary.port: 0}
    previous: dict[int, set[tuple[str, str]]] = {port: set() for port in peaks}

    sampling = threading.Event()

    def sample() -> None:
        # In a thread: reading /proc/net/tcp takes milliseconds and must not stall the load.
        # The kernel lists sockets bucket by bucket, not as one snapshot, so a socket closed
        # during a read and one opened during it can both be listed, which counted more
        # sockets than were ever open at once (more on a loaded machine, where a read takes
        # longer). A socket listed by two consecutive reads was open during the whole time
        # between them: those are counted, all open at one moment.
        while not sampling.wait(0.02):
            for port in peaks:
                current = established_to(port)
                peaks[port] = max(peaks[port], len(current & previous[port]))
                previous[port] = current

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answered, abandoned = asyncio.run(
            load(edge_port, key, requests=2000, concurrency=50, abandon_every=40)
        )
    finally:
        sampling.set()
        sampler.join()
    assert abandoned == 50
    assert sum(answered.values()) == 1950
    # Every abandoned request that reached a model had its upstream call cancelled: the model
    # saw the proxy hang up during its 3 s delay, and none of them completed. (Under heavy
    # load a client can give up before the proxy forwarded at all; then the model never saw
    # it.)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        model.count != model.completed + model.disconnects for model in models
    ):
        time.sleep(0.02)
    for model, variant in ((control, "v1"), (canary, "v2")):
        assert model.count == model.completed + model.disconnects
        assert model.completed == answered[variant]
    reached = control.disconnects + canary.disconnects
    assert abandoned / 2 <= reached <= abandoned
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
    asyncio.run(load(edge_port, key, requests=300, concurrency=50, abandon_every=1000))
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
        < 1950 + reached + 300
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
    # Every request a model received was observed for its arm; so was every abandoned request
    # whose upstream call had started, even if the model never got to see it.
    assert counts["v1"] >= control.count
    assert counts["v2"] >= canary.count
    assert 1950 + reached + 300 <= counts["v1"] + counts["v2"] <= 1950 + abandoned + 300
    assert Exposure.objects.filter(experiment_id=experiment_id).count() == 300


@pytest.mark.parametrize("edge", [{"RECORDER_FLUSH_S": "60"}], indirect=True)
def test_shutdown_flushes_what_is_buffered(
    edge: tuple[str, str, int, subprocess.Popen[bytes]], models: tuple[ModelServer, ModelServer]
) -> None:
    url, key, experiment_id, process = edge
    control, canary = models
    with httpx.Client(base_url=url, headers={"X-Rampart-Key": key}) as client:
        first = client.get("/proxy/load/p", headers={"X-Rampart-Unit": "s0"})
        # uvicorn sets Date and Server; the model's are not passed on as second copies.
        assert len(first.headers.get_list("date")) == len(first.headers.get_list("server")) == 1
        assert first.headers["x-model"] in ("control", "canary")
        variants = [
            client.get("/proxy/load/p", headers={"X-Rampart-Unit": f"s{i}"}).headers[
                "x-rampart-variant"
            ]
            for i in range(1, 20)
        ]
        variants.append(first.headers["x-rampart-variant"])
    # Nothing is written before shutdown: the flush interval is a minute.
    assert not ObservationBucket.objects.filter(experiment_id=experiment_id).exists()
    stop_process(process)  # SIGTERM: uvicorn runs the lifespan shutdown
    # uvicorn re-raises the signal it handled once shut down, hence -SIGTERM, not a crash.
    assert process.returncode in (0, -signal.SIGTERM)
    rows = ObservationBucket.objects.filter(experiment_id=experiment_id)
    assert sum(row.count for row in rows) == 20 == control.count + canary.count
    assert sum(row.count for row in rows if row.variant_key == "v2") == variants.count("v2")
