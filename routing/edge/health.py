"""Operational endpoints: /healthz, /readyz, /metrics and /static/ on the edge, /metrics in Django.

The edge mounts these parts (``config.asgi``)::

    GET /healthz   200 {"status": "ok"} while the process can answer at all (liveness).
    GET /readyz    200 when the database answers ``SELECT 1`` within 2 s and the routing
                   snapshot is loaded and was confirmed current within the last
                   max(30 s, 10 x SNAPSHOT_REFRESH_S); otherwise 503. The body says why:
                   {"status": "ready" | "not_ready",
                    "database": {"ok": true, "latency_ms": 0.4, "error": null},
                    "snapshot": {"loaded": true, "version": 17, "age_s": 0.6,
                                 "built_at": 1764409000.1, "experiments": 3},
                    "exposures": {"buffered": 0, "written": 120, "dropped": 0}}
    GET /metrics   Prometheus exposition (OpenMetrics when the scraper asks for it). With
                   METRICS_TOKEN set, only with `Authorization: Bearer <METRICS_TOKEN>`
                   (401 otherwise); the web app's view and the worker's port check the same.
    GET /static/…  Django's static files (admin, API docs, UI), see ``StaticFilesApp``.

Prometheus and several processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set (it must be set
before the process starts, and the directory emptied before the server starts: the demo and
the compose file do both), every process writes its metrics to memory-mapped files in that
directory and ``/metrics`` of any process reports the sum over all of them, so uvicorn
``--workers N`` (or a Celery worker sharing the directory) is scraped as one target.
Processes that stopped are marked dead (``prometheus_client.multiprocess.mark_process_dead``):
each process on shutdown, and any process that vanished without shutting down when the
next scrape finds its files, so ``live*`` gauges stop counting it. Counters of dead
processes stay in the sum, as counters must never go down.

A web app served on its own by WSGI (``config.wsgi``) exposes the same at ``/metrics``
through ``metrics_view``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import mimetypes
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from django.conf import settings
from django.contrib.staticfiles import finders
from django.core.exceptions import SuspiciousFileOperation
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.utils._os import safe_join
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from routing.db import close_thread_connections, run_with_db
from routing.edge.asgi import Receive, Scope, Send, header_value, send_error, send_json
from routing.edge.context import EdgeContext
from routing.observe import metrics

logger = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
READY_DB_TIMEOUT_S: Final = 2.0
# A snapshot not confirmed for this long means the refresh thread is stuck or the database
# has been failing for a while: the process still answers, but should not get new traffic.
READY_MIN_STALE_S: Final = 30.0
READY_STALE_REFRESHES: Final = 10
# How often each process publishes its snapshot age in multiprocess mode (see MetricsApp).
AGE_PUBLISH_S: Final = 1.0

_LIVE_FILE: Final = re.compile(r"^gauge_live\w+_(\d+)\.db$")


# --- Prometheus exposition ------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multiprocess directory when multiprocess mode is on, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_processes(directory: str) -> list[int]:
    """Mark processes whose ``live*`` gauge files remain but which no longer run; their pids.

    Only valid when every writer of the directory shares this process's PID namespace (one
    machine, or one container), which is how the demo and the compose file set it up.
    """
    dead: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            match = _LIVE_FILE.match(name)
            if match is not None:
                pid = int(match.group(1))
                if pid != os.getpid() and pid not in dead and not _pid_alive(pid):
                    dead.add(pid)
    for pid in dead:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return sorted(dead)


def metrics_exposition(accept: str | None) -> tuple[bytes, str]:
    """The exposition of every metric (of all processes in multiprocess mode), content type."""
    directory = multiprocess_dir()
    if directory is None:
        registry = REGISTRY
    else:
        mark_dead_processes(directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def metrics_authorized(authorization: str | None) -> bool:
    """Whether a request may read /metrics: always without METRICS_TOKEN, else only with
    ``Authorization: Bearer <METRICS_TOKEN>`` (compared in constant time)."""
    token = str(settings.METRICS_TOKEN)
    if not token:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


METRICS_AUTH_MESSAGE: Final = "/metrics needs Authorization: Bearer <METRICS_TOKEN>"
# The body of the web app's and the worker's 401, in the edge's error format.
METRICS_UNAUTHORIZED: Final = orjson.dumps(
    {"error": {"code": "unauthorized", "message": METRICS_AUTH_MESSAGE, "field": None}}
)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """/metrics of a Django web app served by WSGI (the edge serves its own)."""
    if not metrics_authorized(request.headers.get("Authorization")):
        response = HttpResponse(METRICS_UNAUTHORIZED, status=401, content_type="application/json")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body, content_type = metrics_exposition(request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type)


async def _method_not_allowed(send: Send) -> None:
    await send_error(send, 405, "method_not_allowed", "use GET or HEAD")


async def _send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    head: bool = False,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


class MetricsApp:
    """``GET /metrics``: Prometheus exposition of this process, or of all of them."""

    def __init__(self, context: EdgeContext) -> None:
        self.context = context
        self._publisher: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        if multiprocess_dir() is not None:
            # The snapshot-age gauge is computed by a callback, which multiprocess mode cannot
            # collect from other processes; each process writes its own value instead.
            self._publisher = asyncio.create_task(self._publish_age(), name="rampart-metrics")

    async def shutdown(self) -> None:
        task, self._publisher = self._publisher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        directory = multiprocess_dir()
        if directory is not None:
            mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]

    async def _publish_age(self) -> None:
        while True:
            age = self.context.snapshots.age_s()
            metrics.SNAPSHOT_AGE.set(age if math.isfinite(age) else -1.0)
            await asyncio.sleep(AGE_PUBLISH_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _method_not_allowed(send)
            return
        authorization = header_value(scope["headers"], b"authorization")
        if not metrics_authorized(
            None if authorization is None else authorization.decode("latin-1")
        ):
            await send_error(send, 401, "unauthorized", METRICS_AUTH_MESSAGE)
            return
        accept = header_value(scope["headers"], b"accept")
        loop = asyncio.get_running_loop()
        # Reading and merging the files of many processes takes milliseconds: not on the loop.
        body, content_type = await loop.run_in_executor(
            None, metrics_exposition, None if accept is None else accept.decode("latin-1")
        )
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
        await _send_bytes(send, 200, body, headers, head=method == "HEAD")


# --- liveness and readiness ------------------------------------------------------------------


class HealthApp:
    """``GET /healthz``: the process is alive and its event loop answers."""

    def __init__(self, context: EdgeContext) -> None:
        self.context = context

    async def startup(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _method_not_allowed(send)
            return
        await send_json(send, 200, b'{"status":"ok"}', [(b"cache-control", b"no-store")])


@dataclass(frozen=True, slots=True)
class DatabaseCheck:
    ok: bool
    latency_ms: float | None
    error: str | None


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


class ReadyApp:
    """``GET /readyz``: 200 when the database answers and the snapshot is loaded and fresh."""

    def __init__(self, context: EdgeContext) -> None:
        self.context = context
        self.max_snapshot_age_s = max(
            READY_MIN_STALE_S, READY_STALE_REFRESHES * float(settings.SNAPSHOT_REFRESH_S)
        )
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: asyncio.Future[DatabaseCheck] | None = None

    async def startup(self) -> None:
        # One thread keeps one database connection for the probes, away from the request
        # path and from the snapshot and recorder threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-ready")

    async def shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=False, cancel_futures=True)

    def _check_database_sync(self) -> DatabaseCheck:
        started = time.perf_counter()
        try:
            run_with_db(_select_one)
        except Exception as exc:
            return DatabaseCheck(False, None, f"{type(exc).__name__}: {exc}")
        return DatabaseCheck(True, round((time.perf_counter() - started) * 1000, 2), None)

    async def check_database(self) -> DatabaseCheck:
        """``SELECT 1`` within READY_DB_TIMEOUT_S; concurrent probes share one query."""
        if self._executor is None:
            return DatabaseCheck(False, None, "not started")
        if self._in_flight is None or self._in_flight.done():
            loop = asyncio.get_running_loop()
            self._in_flight = loop.run_in_executor(self._executor, self._check_database_sync)
        try:
            return await asyncio.wait_for(asyncio.shield(self._in_flight), READY_DB_TIMEOUT_S)
        except TimeoutError:
            return DatabaseCheck(False, None, f"no answer within {READY_DB_TIMEOUT_S:g} s")

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """Whether this process is ready, and the body that says why."""
        database = await self.check_database()
        holder = self.context.snapshots
        snapshot = holder.current
        age = holder.age_s()
        fresh = math.isfinite(age) and age <= self.max_snapshot_age_s
        stats = self.context.exposures.stats
        ready = database.ok and snapshot.loaded and fresh
        body = {
            "status": "ready" if ready else "not_ready",
            "database": {
                "ok": database.ok,
                "latency_ms": database.latency_ms,
                "error": database.error,
            },
            "snapshot": {
                "loaded": snapshot.loaded,
                "version": snapshot.version,
                "age_s": round(age, 3) if math.isfinite(age) else None,
                "max_age_s": self.max_snapshot_age_s,
                "built_at": snapshot.built_at if snapshot.loaded else None,
                "experiments": sum(1 for _ in snapshot.routes()),
            },
            "exposures": {
                "buffered": stats.buffered,
                "written": stats.written,
                "dropped": stats.dropped,
            },
        }
        return ready, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _method_not_allowed(send)
            return
        ready, body = await self.report()
        await send_json(
            send, 200 if ready else 503, orjson.dumps(body), [(b"cache-control", b"no-store")]
        )


# --- static files ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaticFile:
    path: Path
    size: int
    etag: bytes
    content_type: bytes


def _content_type(path: Path) -> bytes:
    guessed, _ = mimetypes.guess_type(path.name)
    content_type = guessed or "application/octet-stream"
    if content_type.startswith("text/") or content_type in (
        "application/javascript",
        "application/json",
        "image/svg+xml",
    ):
        content_type += "; charset=utf-8"
    return content_type.encode()


def find_static(relative: str) -> StaticFile | None:
    """The file for ``relative`` under STATIC_ROOT (collected), else from the finders.

    ``safe_join`` and the finders both refuse paths that leave their directory.
    """
    if not relative or "\x00" in relative or relative.endswith("/"):
        return None
    candidate: str | None = None
    with contextlib.suppress(SuspiciousFileOperation, ValueError, OSError):
        collected = safe_join(str(settings.STATIC_ROOT), relative)
        if os.path.isfile(collected):
            candidate = collected
    if candidate is None:
        try:
            found = finders.find(relative)
        except (SuspiciousFileOperation, ValueError, OSError):
            return None
        if not isinstance(found, str) or not os.path.isfile(found):
            return None
        candidate = found
    path = Path(candidate)
    stat = path.stat()
    digest = hashlib.blake2b(
        f"{candidate}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8
    ).hexdigest()
    return StaticFile(path, stat.st_size, f'"{digest}"'.encode(), _content_type(path))


def _if_none_match(header: bytes | None, etag: bytes) -> bool:
    if header is None:
        return False
    if header.strip() == b"*":
        return True
    return any(tag.strip().removeprefix(b"W/") == etag for tag in header.split(b","))


class StaticFilesApp:
    """``GET /static/<path>``: Django's static files, served by the edge without Django.

    Files come from STATIC_ROOT after ``manage.py collectstatic`` (the Docker image runs it),
    else straight from the static finders (app directories and STATICFILES_DIRS), so tests and
    the demo need no collect step and work with DEBUG off. Names carry no content hash, so
    responses say ``Cache-Control: no-cache`` and browsers revalidate with the ETag (304).
    """

    def __init__(self, context: EdgeContext, *, prefix: str | None = None) -> None:
        self.context = context
        self.prefix = prefix if prefix is not None else str(settings.STATIC_URL)

    async def startup(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _method_not_allowed(send)
            return
        path: str = scope["path"]
        relative = path[len(self.prefix) :] if path.startswith(self.prefix) else ""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, find_static, relative)
        if found is None:
            await send_error(send, 404, "not_found", f"no such static file: {path}")
            return
        headers = [
            (b"content-type", found.content_type),
            (b"etag", found.etag),
            (b"cache-control", b"no-cache"),
            (b"x-content-type-options", b"nosniff"),
        ]
        if _if_none_match(header_value(scope["headers"], b"if-none-match"), found.etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if method == "HEAD":
            headers.append((b"content-length", str(found.size).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = await loop.run_in_executor(None, found.path.read_bytes)
        await _send_bytes(send, 200, body, headers)


# Django side: ``config.urls`` includes this module, for a web app served by WSGI alone.
urlpatterns = [path("metrics", metrics_view, name="metrics")]
