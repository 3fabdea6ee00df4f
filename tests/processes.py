"""Helpers for tests that run parts of Rampart in child processes against the test database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

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
