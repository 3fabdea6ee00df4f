"""A Celery worker serves /metrics on WORKER_METRICS_PORT, with the pipeline's families."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port, start_process, stop_process


@pytest.mark.django_db(transaction=True)
def test_a_worker_serves_the_pipeline_metrics(tmp_path: Path) -> None:
    port = free_port()
    worker = start_process(
        ["-m", "celery", "-A", "config", "worker", "--pool=solo", "-l", "warning"],
        env={"WORKER_METRICS_PORT": str(port), "RAMPART_DATA_DIR": str(tmp_path)},
        log=tmp_path / "worker.log",
    )
    try:
        deadline = time.monotonic() + 60
        response = None
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert response is not None, (tmp_path / "worker.log").read_text()[-2000:]
        assert response.status_code == 200
        for family in ("rampart_analysis_runs", "rampart_rollbacks", "rampart_alert_deliveries"):
            assert f"# TYPE {family}" in response.text, family
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=2).status_code == 404
    finally:
        stop_process(worker)
