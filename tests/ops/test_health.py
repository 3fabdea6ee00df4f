"""Health endpoints, static files and request ids of the edge; JSON logs of a real server."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from django.conf import settings
from django.db import OperationalError

from experiments import services
from routing import logcontext
from routing.edge import health
from routing.edge.app import Edge, build_edge
from routing.edge.asgi import send_json
from routing.edge.context import EdgeContext, SubApp
from routing.edge.health import HealthApp, MetricsApp, ReadyApp, StaticFilesApp
from routing.logcontext import RequestIdMiddleware, current
from routing.observe.recorder import ExposureRecorder
from routing.snapshot import SnapshotHolder
from tests.factories import create_experiment
from tests.processes import free_port, start_process, stop_process, wait_for_http

MOUNTS: dict[str, Callable[[EdgeContext], SubApp]] = {
    "/healthz": HealthApp,
    "/readyz": ReadyApp,
    "/metrics": MetricsApp,
    "/static/": StaticFilesApp,
}


async def fallback(scope: Any, receive: Any, send: Any) -> None:
    await send_json(send, 200, orjson.dumps({"fallback": scope["path"], "context": current()}))


def new_context() -> EdgeContext:
    return EdgeContext(
        snapshots=SnapshotHolder(refresh_s=60),
        exposures=ExposureRecorder(flush_s=60),
        require_key=False,
    )


def serve(
    app: Any, test: Callable[[httpx.AsyncClient], Awaitable[None]], *, lifespan: Edge | None = None
) -> None:
    """Run ``test`` against ``app`` in one event loop, inside the edge's lifespan."""

    async def main() -> None:
        if lifespan is not None:
            await lifespan.startup()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
                await test(client)
        finally:
            if lifespan is not None:
                await lifespan.shutdown()

    asyncio.run(main())


async def raw_status(app: Any, path: str) -> int:
    """Status of GET ``path`` sent to ``app`` exactly as given."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return statuses[0]


@pytest.fixture
def edge(transactional_db: None) -> Iterator[Edge]:
    yield build_edge(mounts=MOUNTS, fallback=fallback, context=new_context())


def test_healthz_answers_while_the_process_runs(edge: Edge) -> None:
    async def test(client: httpx.AsyncClient) -> None:
        response = await client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        assert (await client.post("/healthz")).status_code == 405

    serve(edge, test, lifespan=edge)


def test_readyz_reports_the_database_and_the_snapshot_with_its_age(
    edge: Edge, metrics: dict[str, Any]
) -> None:
    create_experiment("ranker-v2", "canary")
    services.experiment_start(actor="test", key="ranker-v2")

    async def test(client: httpx.AsyncClient) -> None:
        response = await client.get("/readyz")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert body["database"]["ok"] is True and body["database"]["latency_ms"] >= 0
        snapshot = body["snapshot"]
        assert snapshot["loaded"] is True
        assert snapshot["version"] == edge.context.snapshots.current.version > 0
        assert snapshot["experiments"] == 1
        assert 0 <= snapshot["age_s"] < 5
        assert snapshot["max_age_s"] == max(30.0, 10 * float(settings.SNAPSHOT_REFRESH_S))
        assert body["exposures"] == {"buffered": 0, "written": 0, "dropped": 0}

    serve(edge, test, lifespan=edge)


def test_readyz_is_503_before_the_first_snapshot(transactional_db: None) -> None:
    context = new_context()
    ready = ReadyApp(context)

    async def test(client: httpx.AsyncClient) -> None:
        await ready.startup()
        try:
            response = await client.get("/readyz")
        finally:
            await ready.shutdown()
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not_ready"
        assert body["database"]["ok"] is True
        assert body["snapshot"]["loaded"] is False and body["snapshot"]["age_s"] is None

    serve(ready, test)


def test_readyz_is_503_when_the_database_fails(edge: Edge, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OperationalError("connection refused")

    async def test(client: httpx.AsyncClient) -> None:
        assert (await client.get("/readyz")).status_code == 200
        monkeypatch.setattr(health, "_select_one", broken)
        response = await client.get("/readyz")
        assert response.status_code == 503
        database = response.json()["database"]
        assert database == {
            "ok": False,
            "latency_ms": None,
            "error": "OperationalError: connection refused",
        }
        # The snapshot keeps serving: only new traffic should go elsewhere.
        assert (await client.get("/healthz")).status_code == 200

    serve(edge, test, lifespan=edge)


def test_readyz_gives_up_on_a_database_that_hangs(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "READY_DB_TIMEOUT_S", 0.1)

    def hangs() -> None:
        time.sleep(0.5)

    async def test(client: httpx.AsyncClient) -> None:
        monkeypatch.setattr(health, "_select_one", hangs)
        started = time.perf_counter()
        first, second = await asyncio.gather(client.get("/readyz"), client.get("/readyz"))
        assert time.perf_counter() - started < 0.45
        for response in (first, second):
            assert response.status_code == 503
            assert response.json()["database"]["error"] == "no answer within 0.1 s"

    serve(edge, test, lifespan=edge)


def test_readyz_is_503_when_the_snapshot_is_stale(edge: Edge) -> None:
    async def test(client: httpx.AsyncClient) -> None:
        holder = edge.context.snapshots
        holder.last_checked_at = time.time() - 31 - 10 * float(settings.SNAPSHOT_REFRESH_S)
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["snapshot"]["age_s"] > response.json()["snapshot"]["max_age_s"]

    serve(edge, test, lifespan=edge)


def test_static_files_are_served_with_etags_without_django(edge: Edge) -> None:
    async def test(client: httpx.AsyncClient) -> None:
        response = await client.get("/static/admin/css/base.css")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/css; charset=utf-8"
        assert b"DJANGO Admin styles" in response.content
        etag = response.headers["etag"]
        again = await client.get("/static/admin/css/base.css", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        head = await client.head("/static/admin/css/base.css")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(response.content)
        # The project's own static directory (STATICFILES_DIRS) is found too.
        own = sorted(p for p in (Path(settings.BASE_DIR) / "static").rglob("*") if p.is_file())
        relative = own[0].relative_to(Path(settings.BASE_DIR) / "static").as_posix()
        assert (await client.get(f"/static/{relative}")).content == own[0].read_bytes()
        assert (await client.get("/static/nope.css")).status_code == 404
        # httpx would normalise "..", so these paths go to the app as a raw ASGI scope.
        for escape in ("/static/../manage.py", "/static/admin/../../../manage.py"):
            assert await raw_status(edge, escape) == 404, escape
        assert (await client.post("/static/admin/css/base.css")).status_code == 405

    serve(edge, test, lifespan=edge)


def test_static_files_prefer_the_collected_copy(tmp_path: Path, settings: Any) -> None:
    settings.STATIC_ROOT = tmp_path
    (tmp_path / "admin" / "css").mkdir(parents=True)
    (tmp_path / "admin" / "css" / "base.css").write_text("/* collected */")
    found = health.find_static("admin/css/base.css")
    assert found is not None and found.path == tmp_path / "admin" / "css" / "base.css"
    assert health.find_static("../etc/passwd") is None
    assert health.find_static("admin/css/") is None


def test_request_ids_are_kept_echoed_or_made_when_first_logged() -> None:
    app = RequestIdMiddleware(fallback)

    async def test(client: httpx.AsyncClient) -> None:
        given = await client.get("/x", headers={"X-Request-ID": "lb-1234"})
        assert given.headers["x-request-id"] == "lb-1234"
        assert given.json()["context"] == {"request_id": "lb-1234"}
        # No id given: one is made when the request logs (here: reads its context), and the
        # response carries no header, so requests that log nothing pay nothing.
        made = await client.get("/x")
        assert "x-request-id" not in made.headers
        made_id = made.json()["context"]["request_id"]
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", made_id)
        again = (await client.get("/x")).json()["context"]["request_id"]
        assert again != made_id
        for bad in ("has space", "x" * 129):
            response = await client.get("/x", headers={"X-Request-ID": bad})
            assert "x-request-id" not in response.headers
            assert response.json()["context"]["request_id"] != bad

    serve(app, test)


def test_route_and_block_context_reach_the_log_fields() -> None:
    assert logcontext.current() == {}
    with logcontext.log_context(request_id="task-1", experiment="ranker-v2"):
        logcontext.set_route("ranker-v2", "v2")
        assert logcontext.current() == {
            "request_id": "task-1",
            "experiment": "ranker-v2",
            "variant": "v2",
        }
    assert logcontext.current() == {}


@pytest.fixture
def json_server(transactional_db: None, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log = tmp_path / "server.log"
    process = start_process(
        ["-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)],
        env={"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"},
        log=log,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}", log
    finally:
        stop_process(process)


def test_a_real_server_is_ready_and_logs_json_with_request_ids(
    json_server: tuple[str, Path],
) -> None:
    base, log = json_server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200, ready.text
    missing = httpx.get(f"{base}/no-such-page", headers={"X-Request-ID": "trace-42"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "trace-42"
    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
        if any(line.get("logger") == "uvicorn.access" for line in lines if line.get("request_id")):
            break
        time.sleep(0.05)
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    traced = [line for line in lines if line.get("request_id") == "trace-42"]
    assert {line["logger"] for line in traced} >= {"django.request", "uvicorn.access"}
    assert any("/no-such-page" in line["message"] for line in traced)


def test_the_composed_app_sends_every_edge_prefix_to_the_edge(
    json_server: tuple[str, Path],
) -> None:
    base, _ = json_server
    edge_paths = [
        ("GET", "/v1/decide?experiment=x&unit=y"),
        ("GET", "/v1/config"),
        ("POST", "/v1/decide/batch"),
        ("POST", "/v1/events"),
        ("POST", "/v1/exposures"),
        ("POST", "/proxy/x/predict"),
    ]
    for method, path in edge_paths:
        response = httpx.request(method, f"{base}{path}", json={})
        # Without a key the edge answers with its problem+json 401, not Django's HTML 404.
        assert response.status_code == 401, (path, response.status_code, response.text)
        assert response.json()["code"] == "not_authenticated", path
