"""Helpers for tests that run parts of Rampart in child processes against the test database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_url() -> str:
    """A DATABASE_URL naming the database this test runs against (the test database)."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    return (
        f"postgres://{settings['USER']}:{settings['PASSWORD']}@{settings['HOST']}:"
        f"{settings['PORT']}/{settings['NAME']}"
    )


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that shares this test's database and broker."""
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "config.settings.test"
    env["DATABASE_URL"] = test_database_url()
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_process(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *args] if args[0].startswith("-") else list(args),
        cwd=ROOT,
        env=child_env(env),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


def start_app_server(
    *, log: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`uvicorn config.asgi:application` as production runs it (the edge's HTTP protocol, the
    edge in front of Django) on a free loopback port; returns the process and its base URL."""
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
            "--no-access-log",
            "--http",
            "routing.edge.server:EdgeHttpProtocol",
        ],
        env=env,
        log=log,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


@contextmanager
def running_servers(
    commands: Mapping[str, Callable[[int], Sequence[str]]],
    logs: Path,
    *,
    ready_path: str = "/",
) -> Iterator[dict[str, str]]:
    """Stand-in servers (model versions, LLMs), one process each: ``commands[name](port)``
    gives a server's arguments; yields each name's base URL once all answer ``ready_path``."""
    ports = {name: free_port() for name in commands}
    processes = [
        start_process(list(command(ports[name])), log=logs / f"model-{name}.log")
        for name, command in commands.items()
    ]
    try:
        for port in ports.values():
            wait_for_http(f"http://127.0.0.1:{port}{ready_path}")
        yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        for process in processes:
            stop_process(process)


@dataclass(frozen=True)
class Platform:
    """A running edge, worker and beat: the edge's base URL and where their logs go."""

    url: str
    logs: Path

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of one process's log ("edge", "worker" or "beat")."""
        return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]


@contextmanager
def running_platform(logs: Path, env: Mapping[str, str]) -> Iterator[Platform]:
    """The edge (uvicorn, as in production), a Celery worker and Celery beat as children on
    the test database and broker, with ``env`` added; stopped when the block ends."""
    port = free_port()
    processes = [
        start_process(
            [
                *("-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1"),
                *("--port", str(port), "--no-access-log", "--log-level", "warning"),
                *("--http", "routing.edge.server:EdgeHttpProtocol"),
            ],
            env=env,
            log=logs / "edge.log",
        ),
        start_process(
            [
                *("-m", "celery", "-A", "config", "worker", "--pool=solo", "-l", "warning"),
                *("--without-heartbeat", "--without-gossip", "--without-mingle"),
            ],
            env=env,
            log=logs / "worker.log",
        ),
        start_process(
            [
                *("-m", "celery", "-A", "config", "beat", "-l", "warning"),
                *("-s", str(logs / "beat-schedule")),
            ],
            env=env,
            log=logs / "beat.log",
        ),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        # Generous: on a loaded two-core machine the edge's imports alone can take 20 s.
        wait_for_http(url + "/proxy/", timeout=90.0)
        yield Platform(url=url, logs=logs)
    finally:
        for process in reversed(processes):
            stop_process(process)


class TrafficSource(Protocol):
    stop: threading.Event

    def run(self) -> None: ...


@contextmanager
def sending(traffic: TrafficSource) -> Iterator[None]:
    """Run ``traffic.run()`` in a thread for the block; then set ``traffic.stop`` and join."""
    sender = threading.Thread(target=traffic.run, daemon=True)
    sender.start()
    try:
        yield
    finally:
        traffic.stop.set()
        sender.join(15)
