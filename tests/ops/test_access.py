"""METRICS_TOKEN on every /metrics (web view, edge, worker port) and API_DOCS_PUBLIC."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from tests.processes import ROOT, free_port, start_process, stop_process, wait_for_http

TOKEN = "metrics-token-for-tests-0123456789"
FAMILY = "# TYPE rampart_decisions_total counter"


def _check_metrics(get: Callable[[dict[str, str]], Any]) -> None:
    """401 without the token or with a wrong one, 200 with the exposition with it."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = get(headers)
        assert response.status_code == 401, headers
    response = get({"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


@pytest.mark.django_db
def test_the_web_apps_metrics_view_checks_the_token(client: Client, settings: Any) -> None:
    assert client.get("/metrics").status_code == 200  # no token configured: open
    settings.METRICS_TOKEN = TOKEN
    denied = client.get("/metrics")
    assert denied.status_code == 401 and denied["WWW-Authenticate"].startswith("Bearer")
    assert FAMILY.encode() not in denied.content
    _check_metrics(lambda h: client.get("/metrics", headers=h))
    assert FAMILY.encode() in client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content


@pytest.mark.django_db(transaction=True)
def test_the_edge_checks_the_metrics_token_and_hides_private_docs(
    tmp_path: Path, make_key: Callable[..., str]
) -> None:
    read_key, decide_key = make_key("read"), make_key("decide")
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
            "--http",
            "routing.edge.server:EdgeHttpProtocol",
        ],
        env={"METRICS_TOKEN": TOKEN, "API_DOCS_PUBLIC": "false"},
        log=tmp_path / "edge.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", timeout=30)
        with httpx.Client(base_url=base, timeout=10) as http:
            _check_metrics(lambda h: http.get("/metrics", headers=h))
            assert FAMILY in http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
            assert http.get("/healthz").status_code == 200  # probes stay open
            # Private docs: no credentials 401, a decide key 403, a read key 200.
            assert http.get("/api/schema/").status_code == 401
            assert (
                http.get("/api/schema/", headers={"Authorization": f"Bearer {decide_key}"})
            ).status_code == 403
            schema = http.get("/api/schema/", headers={"Authorization": f"Bearer {read_key}"})
            assert schema.status_code == 200 and "openapi" in schema.text
            docs = http.get("/api/docs/")
            assert docs.status_code == 302 and "/accounts/login/" in docs.headers["location"]
    finally:
        stop_process(process)


@pytest.mark.django_db(transaction=True)
def test_the_worker_metrics_port_checks_the_token(tmp_path: Path) -> None:
    port = free_port()
    worker = start_process(
        ["-m", "celery", "-A", "config", "worker", "--pool=solo", "-l", "warning"],
        env={
            "WORKER_METRICS_PORT": str(port),
            "RAMPART_DATA_DIR": str(tmp_path),
            "METRICS_TOKEN": TOKEN,
        },
        log=tmp_path / "worker.log",
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        first = None
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                first = httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert first is not None, (tmp_path / "worker.log").read_text()[-2000:]
        _check_metrics(lambda h: httpx.get(url, headers=h, timeout=5))
        authorized = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert "# TYPE rampart_analysis_runs" in authorized.text
    finally:
        stop_process(worker)


@pytest.mark.django_db
def test_private_docs_need_a_reader(settings: Any, make_key: Callable[..., str]) -> None:
    anonymous = APIClient()
    assert anonymous.get("/api/schema/").status_code == 200  # public by default (dev, test)
    settings.API_DOCS_PUBLIC = False
    assert anonymous.get("/api/schema/").status_code == 401
    docs = Client().get("/api/docs/")
    assert docs.status_code == 302 and docs["Location"].startswith("/accounts/login/")
    viewer = APIClient()
    viewer.force_login(User.objects.create_user("reader"))  # new users are viewers
    assert viewer.get("/api/schema/").status_code == 200
    assert viewer.get("/api/docs/").status_code == 200
    nobody = User.objects.create_user("nobody")
    nobody.groups.clear()
    no_role = APIClient()
    no_role.force_login(nobody)
    assert no_role.get("/api/schema/").status_code == 403
    manage = APIClient()
    manage.credentials(HTTP_AUTHORIZATION=f"Bearer {make_key('manage')}")
    assert manage.get("/api/schema/").status_code == 200


def test_production_defaults_to_private_docs() -> None:
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "PATH": "/usr/bin:/bin",
        "DJANGO_ALLOWED_HOSTS": "example.com",
        "DJANGO_SECRET_KEY": "x" * 50,
        "RAMPART_DATA_DIR": str(ROOT / "var"),
    }
    script = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.API_DOCS_PUBLIC, repr(settings.METRICS_TOKEN))"
    )
    for extra, expected in (({}, "False ''"), ({"API_DOCS_PUBLIC": "true"}, "True ''")):
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
