"""Slow clients against the production server (uvicorn, EdgeHttpProtocol, edge and Django)
over real sockets: stalled headers and stalled bodies are answered 408 and closed within
their timeout, and a process holds at most EDGE_MAX_CONNECTIONS connections.

Before the guard, each of these connections stayed open indefinitely (75 s and more).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from experiments import services
from tests.model_server import ModelServer
from tests.processes import start_app_server, stop_process, wait_for_http

pytestmark = pytest.mark.django_db(transaction=True)

HEADER_TIMEOUT_S = 0.6
BODY_TIMEOUT_S = 0.8
MAX_CONNECTIONS = 6
# The sweep runs every tenth of the shorter timeout; the rest is a loaded machine's slack
# (before the guard these connections stayed open for good, so any bound tells).
SLACK_S = 1.5


@pytest.fixture
def server(
    make_key: Callable[..., str], tmp_path: Path
) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    model = ModelServer(name="control", score=0.5, keep_requests=False).start()
    key = make_key("decide", "ingest")
    services.experiment_create(
        actor="test",
        key="slow",
        name="slow",
        kind="ab",
        variants=[
            services.VariantInput(key="v1", upstream_url=model.url, weight=1.0, is_control=True),
            services.VariantInput(key="v2", upstream_url=model.url, weight=0.0),
        ],
    )
    services.experiment_start(actor="test", key="slow")
    process, url = start_app_server(
        log=tmp_path / "edge.log",
        env={
            "EDGE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "EDGE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "EDGE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
    )
    try:
        wait_for_http(url + "/healthz")
        yield int(url.rsplit(":", 1)[1]), key, process
    finally:
        stop_process(process)
        model.stop()


def wait_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that was."""
    started = time.monotonic()
    data = b""
    while True:
        sock.settimeout(max(limit_s - (time.monotonic() - started), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"still open after {limit_s} s; received {data!r}") from None
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def assert_timed_out(answer: bytes, phase: str) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert b"content-type: application/problem+json" in head
    problem = orjson.loads(body)
    assert problem["code"] == "request_timeout"
    assert phase in problem["detail"]


def post_head(path: str, key: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nX-Rampart-Key: {key}\r\n"
        f"X-Rampart-Unit: u1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("path", ["/v1/decide/batch", "/proxy/slow/predict"])
def test_slowloris_headers_are_cut_off_at_the_header_timeout(
    server: tuple[int, str, subprocess.Popen[bytes]], path: str
) -> None:
    port, _, _ = server
    answer = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: edge\r\n".encode())
        started = time.monotonic()
        # One more header line every 0.1 s, never the blank line that ends them.
        for number in range(int((HEADER_TIMEOUT_S + SLACK_S) / 0.1)):
            try:
                sock.sendall(f"X-Slow-{number}: a\r\n".encode())
                sock.settimeout(0.1)
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError("the connection is still open")
        elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT_S - 0.05 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S, elapsed
    assert_timed_out(answer, "headers")


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    server: tuple[int, str, subprocess.Popen[bytes]],
) -> None:
    port, _, _ = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        answer, elapsed = wait_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
    assert elapsed >= HEADER_TIMEOUT_S - 0.05, elapsed
    assert_timed_out(answer, "headers")


@pytest.mark.parametrize("path", ["/v1/decide/batch", "/proxy/slow/predict", "/api/v1/metrics/"])
def test_a_body_that_stops_halfway_is_answered_408_at_the_body_timeout(
    server: tuple[int, str, subprocess.Popen[bytes]], path: str
) -> None:
    port, key, process = server
    body = orjson.dumps({"experiments": ["slow"], "units": ["u1", "u2"], "pad": "x" * 200})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(post_head(path, key, len(body)) + body[: len(body) // 2])
        answer, elapsed = wait_closed(sock, BODY_TIMEOUT_S + SLACK_S)
    assert elapsed >= BODY_TIMEOUT_S - 0.05, elapsed
    assert_timed_out(answer, "body")
    assert process.poll() is None


def test_healthy_keep_alive_connections_are_left_alone(
    server: tuple[int, str, subprocess.Popen[bytes]],
) -> None:
    port, key, _ = server
    body = b"{}"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        # Requests spread over three header timeouts on one connection, each sent whole.
        for _ in range(8):
            sock.sendall(post_head("/proxy/slow/predict", key, len(body)) + body)
            sock.settimeout(5)
            answer = b""
            while b'"score"' not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            time.sleep(HEADER_TIMEOUT_S * 3 / 8)


def test_one_connection_past_the_bound_is_answered_503_and_closed(
    server: tuple[int, str, subprocess.Popen[bytes]],
) -> None:
    port, _, _ = server
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            answer, elapsed = wait_closed(extra, 1.0)
        assert elapsed < HEADER_TIMEOUT_S  # refused at once, not timed out
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"retry-after: 1" in head
        assert orjson.loads(body)["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    # Once the held ones are gone, connections are admitted again.
    time.sleep(0.1)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
