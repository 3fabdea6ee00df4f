"""Prometheus exposition: every declared family, both formats, Django view, multiprocess mode."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

import analysis.metrics
import routing.edge.ingest_metrics
import routing.observe.metrics
import routing.proxy.metrics
from experiments import services
from routing.edge.health import mark_dead_processes, metrics_exposition
from tests.factories import create_experiment
from tests.processes import ROOT, free_port, start_process, stop_process, wait_for_http

OWNERS: tuple[ModuleType, ...] = (
    routing.observe.metrics,
    routing.proxy.metrics,
    routing.edge.ingest_metrics,
    analysis.metrics,
)


def declared_families(module: ModuleType) -> dict[str, str]:
    """Family name (as the text format names it) -> type, of every metric a module declares."""
    families: dict[str, str] = {}
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            # Counter keeps its name without "_total"; the text format 0.0.4 adds it back.
            suffix = "_total" if value._type == "counter" else ""
            families[value._name + suffix] = str(value._type)
    return families


def test_every_owner_declares_metrics() -> None:
    for module in OWNERS:
        assert declared_families(module), module.__name__


def test_the_exposition_lists_every_declared_family() -> None:
    text = metrics_exposition(None)[0].decode()
    for module in OWNERS:
        for name, kind in declared_families(module).items():
            assert f"# TYPE {name} {kind}\n" in text, f"{module.__name__}: {name}"
    assert "# TYPE process_cpu_seconds_total counter" in text


def test_openmetrics_is_served_when_the_scraper_asks() -> None:
    body, content_type = metrics_exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, content_type = metrics_exposition("text/plain")
    assert content_type.startswith("text/plain") and b"# EOF" not in body


@pytest.mark.django_db
def test_the_django_view_serves_metrics_for_a_wsgi_deployment(client: Any) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"# TYPE rampart_decisions_total counter" in response.content


def _sum_samples(text: str, pattern: str) -> float:
    return sum(float(match) for match in re.findall(pattern + r" ([0-9.e+]+)\n", text))


@pytest.fixture
def two_worker_edge(
    transactional_db: None, metrics: dict[str, Any], tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    create_experiment("ranker-v2", "ab")
    services.experiment_start(actor="test", key="ranker-v2")
    directory = tmp_path / "prometheus"
    directory.mkdir()
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
            "--workers",
            "2",
        ],
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "EDGE_REQUIRE_KEY": "false"},
        log=tmp_path / "edge.log",
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        yield f"http://127.0.0.1:{port}", directory
    finally:
        stop_process(process)


def test_multiprocess_mode_sums_every_worker(two_worker_edge: tuple[str, Path]) -> None:
    base, directory = two_worker_edge
    deadline = time.monotonic() + 20
    # Both workers must be up before the count starts (the kernel spreads new connections).
    while len(list(directory.glob("counter_*.db"))) < 2 and time.monotonic() < deadline:
        httpx.get(f"{base}/readyz")
        time.sleep(0.05)
    assert len(list(directory.glob("counter_*.db"))) >= 2
    decisions = 60
    # A new connection per request ("Connection: close"), so that both workers answer some.
    with httpx.Client(base_url=base, headers={"Connection": "close"}) as client:
        for unit in range(decisions):
            response = client.get("/v1/decide", params={"experiment": "ranker-v2", "unit": unit})
            assert response.status_code == 200, response.text
    pattern = r'rampart_decisions_total\{experiment="ranker-v2",reason="assigned",variant="\w+"\}'
    for _ in range(4):
        text = httpx.get(f"{base}/metrics").text
        assert _sum_samples(text, pattern) == decisions
        # Families of other processes sharing the directory (the worker) are merged in too.
        assert "# TYPE rampart_analysis_run_seconds histogram" in text
    # Per-process gauges come out aggregated over the live workers: one series, no pid label.
    for family in ("rampart_snapshot_version", "rampart_snapshot_age_seconds"):
        series = [line for line in text.splitlines() if line.startswith(family + " ")]
        assert len(series) == 1, (family, series)
    buffered = [line for line in text.splitlines() if line.startswith("rampart_exposures_buffered")]
    assert len(buffered) == 1 and "pid=" not in buffered[0], buffered


def test_dead_processes_are_marked_so_live_gauges_forget_them(tmp_path: Path) -> None:
    script = (
        "from prometheus_client import Gauge; import os; "
        "Gauge('rampart_test_inflight', 'x', multiprocess_mode='livesum').set(3); "
        "print(os.getpid())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(result.stdout)
    assert (tmp_path / f"gauge_livesum_{pid}.db").exists()
    assert mark_dead_processes(str(tmp_path)) == [pid]
    assert not (tmp_path / f"gauge_livesum_{pid}.db").exists()
    assert mark_dead_processes(str(tmp_path)) == []
