"""Fault injection: the database goes away for 2 s or more under the edge's buffered writers.

The outage is real: the database settings of new connections point at a socket nothing
listens on (PostgreSQL) or a directory that does not exist (SQLite), and the connections the
writer threads hold are cut (``pg_terminate_backend``; on SQLite the writers reconnect at
every flush in these tests, see ``sqlite_writers_reconnect``). The writers must back off
instead of retrying with every request, log a few lines with counts instead of a traceback
per failure, show it on /metrics, and lose nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from django.db import connection, connections

from experiments import services
from routing.edge.app import build_edge
from routing.edge.context import EdgeContext
from routing.edge.health import metrics_exposition
from routing.edge.ingest import EventsApp
from routing.models import Event, Exposure, ObservationBucket
from routing.observe.observations import ObservationAggregator
from routing.observe.recorder import ExposureRecorder
from routing.services import ExposureRow, exposures_insert
from routing.snapshot import SnapshotHolder
from tests.factories import create_experiment
from tests.processes import free_port

pytestmark = pytest.mark.django_db(transaction=True)

OUTAGE_S = 2.0
MAX_OUTAGE_S = 6.0
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 0.4
FAILURE_LOG_S = 1.0


def max_attempts(seconds: float) -> int:
    """Equal jitter waits at least half the exponential delay: 0.05, 0.1, then 0.2 s per
    attempt, so an outage of 2 s leaves room for 3 + (2 - 0.15) / 0.2 = 12 attempts, plus
    one in flight when it began. Without backoff, every exposure past RECORDER_BATCH_ROWS
    woke a flush: 340 in the same two seconds on this machine."""
    return 1 + 3 + int((seconds - 0.15) / 0.2)


def max_lines(seconds: float) -> int:
    """The first failure, then at most one line per FAILURE_LOG_S."""
    return 1 + int(seconds / FAILURE_LOG_S)


@pytest.fixture(autouse=True)
def sqlite_writers_reconnect() -> Iterator[None]:
    """On SQLite, the writer threads open a connection per flush here, as they did by default
    before DATABASE_CONN_MAX_AGE applied to SQLite too.

    An open SQLite connection keeps its file whatever happens to the path, so the outage
    below (new connections fail) reaches only writers that reconnect.
    """
    settings_dict = connections.settings["default"]
    if settings_dict["ENGINE"] != "django.db.backends.sqlite3":
        yield
        return
    saved = settings_dict.get("CONN_MAX_AGE")
    settings_dict["CONN_MAX_AGE"] = 0
    try:
        yield
    finally:
        settings_dict["CONN_MAX_AGE"] = saved


@asynccontextmanager
async def database_outage(tmp_path: Path, *, keep_pid: int) -> AsyncIterator[None]:
    """New connections fail and the connections the writer threads hold are cut, until exit.

    Django's connections of every thread share one settings dict, so the writer threads see
    the change when they next connect. The test's own connection (``keep_pid``) survives.
    """
    settings_dict = connections.settings["default"]
    saved = dict(settings_dict)
    if connection.vendor == "postgresql":
        await asyncio.to_thread(_terminate_backends_except, keep_pid)
        settings_dict["HOST"] = "127.0.0.1"
        settings_dict["PORT"] = str(free_port())
    else:
        settings_dict["NAME"] = str(tmp_path / "no-such-directory" / "db.sqlite3")
    try:
        yield
    finally:
        settings_dict.update(saved)


def _terminate_backends_except(keep: int) -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), %s)"
                " AND backend_type = 'client backend'",
                [keep],
            )
    finally:
        connections.close_all()


def _own_backend_pid() -> int:
    """The PostgreSQL backend of this thread's connection (0 on SQLite)."""
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _experiment_id(key: str) -> int:
    experiment = create_experiment(key, "ab")
    services.experiment_start(actor="test", key=key)
    return int(experiment.pk)


def _backoff_gauge(writer: str) -> float:
    text = metrics_exposition(None)[0].decode()
    match = re.search(rf'^rampart_flush_backoff_seconds{{writer="{writer}"}} (\S+)$', text, re.M)
    assert match, f"no backoff gauge for {writer} on /metrics"
    return float(match.group(1))


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name and r.levelno >= logging.WARNING]


def test_writers_back_off_during_an_outage_log_a_few_lines_and_lose_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, metrics: dict[str, Any]
) -> None:
    caplog.set_level(logging.WARNING)
    experiment_id = _experiment_id("outage")
    own_pid = _own_backend_pid()
    attempts: list[float] = []

    def insert(rows: Sequence[ExposureRow]) -> int:
        # The real insert, counted: every flush attempt starts with one.
        attempts.append(time.monotonic())
        return exposures_insert(rows=rows)

    recorder = ExposureRecorder(
        flush_s=0.05,
        batch_rows=10,
        max_buffer=100_000,
        cache_size=100_000,
        insert=insert,
        backoff_base_s=BACKOFF_BASE_S,
        backoff_max_s=BACKOFF_MAX_S,
        failure_log_s=FAILURE_LOG_S,
    )
    observations = ObservationAggregator(
        bucket_s=1,
        flush_interval_s=0.02,
        max_cells=100_000,
        backoff_base_s=BACKOFF_BASE_S,
        backoff_max_s=BACKOFF_MAX_S,
        failure_log_s=FAILURE_LOG_S,
    )
    recorded = 0

    async def traffic(seconds: float) -> None:
        """About 4,000 first exposures and observed requests a second."""
        nonlocal recorded
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                assert recorder.record(
                    experiment_id=experiment_id, unit_id=f"u{recorded}", variant_key="v1"
                )
                observations.observe(experiment_id, "v1", 12.0, error=False)
                recorded += 1
            await asyncio.sleep(0.005)

    async def run() -> dict[str, Any]:
        await recorder.start()
        await observations.start()
        await traffic(0.3)
        assert recorder.stats.failed_flushes == 0 and recorder.stats.written > 0
        async with database_outage(tmp_path, keep_pid=own_pid):
            started = time.monotonic()
            during = len(attempts)
            caplog.clear()
            await traffic(OUTAGE_S)
            # On a loaded machine the writer threads get fewer turns: let the outage last
            # until each writer failed a few times (the bounds below use the real length).
            while time.monotonic() - started < MAX_OUTAGE_S and (
                len(attempts) - during < 4 or observations.stats.failed_flushes < 3
            ):
                await traffic(0.1)
            figures = {
                "seconds": time.monotonic() - started,
                "attempts": len(attempts) - during,
                "failed_flushes": recorder.stats.failed_flushes,
                "observation_failures": observations.stats.failed_flushes,
                "recorder_lines": _lines(caplog, "routing.observe.recorder"),
                "observation_lines": _lines(caplog, "routing.observe.observations"),
                "buffered": recorder.stats.buffered,
                "exposure_backoff": _backoff_gauge("exposures"),
                "observation_backoff": _backoff_gauge("observations"),
            }
            assert all(at >= started for at in attempts[during:])
        caplog.clear()
        await traffic(0.2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
            recorder.stats.written < recorded or _backoff_gauge("exposures") != 0.0
        ):
            await asyncio.sleep(0.02)
        figures["recovered_backoff"] = _backoff_gauge("exposures")
        await observations.stop()
        await recorder.stop()
        figures["recovery_lines"] = _lines(caplog, "routing.observe.recorder")
        return figures

    figures = asyncio.run(run())

    # It kept trying, at a bounded pace.
    seconds = figures["seconds"]
    assert 4 <= figures["attempts"] <= max_attempts(seconds), figures
    assert figures["failed_flushes"] == figures["attempts"]
    assert 3 <= figures["observation_failures"] <= max_attempts(seconds), figures
    # A few lines with counts; one traceback, for the first failure.
    for name in ("recorder_lines", "observation_lines"):
        lines = figures[name]
        assert 2 <= len(lines) <= max_lines(seconds), [r.getMessage() for r in lines]
        assert [bool(r.exc_info) for r in lines] == [True] + [False] * (len(lines) - 1)
        assert "still failing" in lines[-1].getMessage()
    assert re.search(r"\d+ failure\(s\) in the last", figures["recorder_lines"][-1].getMessage())
    # /metrics showed the backoff and the rows waiting, and the backoff ended.
    assert BACKOFF_BASE_S / 2 <= figures["exposure_backoff"] <= BACKOFF_MAX_S
    assert BACKOFF_BASE_S / 2 <= figures["observation_backoff"] <= BACKOFF_MAX_S
    assert figures["buffered"] > 100
    assert figures["recovered_backoff"] == 0.0
    assert [r.getMessage().split(" after ")[0] for r in figures["recovery_lines"]] == [
        "writing exposures works again"
    ]
    # Nothing was lost: every exposure and every observed request is in the database.
    assert recorder.stats.dropped == 0
    assert Exposure.objects.filter(experiment_id=experiment_id).count() == recorded
    counts = ObservationBucket.objects.filter(experiment_id=experiment_id)
    assert sum(counts.values_list("count", flat=True)) == recorded


def test_failed_event_batches_are_logged_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make_key: Callable[..., str]
) -> None:
    caplog.set_level(logging.WARNING)
    key = make_key("ingest")
    own_pid = _own_backend_pid()
    context = EdgeContext(
        snapshots=SnapshotHolder(refresh_s=60),
        exposures=ExposureRecorder(flush_s=60),
        require_key=True,
    )
    context.snapshots.refresh_now()
    app = build_edge(
        mounts={"/v1/events": lambda c: EventsApp(c, failure_log_s=FAILURE_LOG_S)},
        context=context,
    )

    def batch(number: int) -> bytes:
        return orjson.dumps([{"event_id": f"e-{number}", "unit_id": "u", "name": "buy"}])

    async def run() -> tuple[list[int], list[logging.LogRecord], float, list[int]]:
        await app.startup()
        try:
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:

                async def post(number: int) -> int:
                    response = await client.post(
                        "/v1/events", content=batch(number), headers={"X-Rampart-Key": key}
                    )
                    return response.status_code

                async with database_outage(tmp_path, keep_pid=own_pid):
                    caplog.clear()
                    statuses = []
                    started = time.monotonic()
                    while time.monotonic() - started < 1.5:
                        statuses.append(await post(len(statuses)))
                        await asyncio.sleep(0.01)
                    lines = _lines(caplog, "routing.edge.ingest")
                    seconds = time.monotonic() - started
                caplog.clear()
                after = [await post(10_000 + number) for number in range(3)]
        finally:
            await app.shutdown()
        return statuses, lines, seconds, after

    statuses, lines, seconds, after = asyncio.run(run())
    assert len(statuses) >= 10 and set(statuses) == {503}
    # The first failure with its traceback, then one line with the counts per second.
    assert 2 <= len(lines) <= max_lines(seconds), [r.getMessage() for r in lines]
    assert [bool(r.exc_info) for r in lines] == [True] + [False] * (len(lines) - 1)
    assert "still failing" in lines[1].getMessage()
    assert after == [200, 200, 200]
    recovery = _lines(caplog, "routing.edge.ingest")
    assert [r.getMessage().split(" after ")[0] for r in recovery] == [
        "writing event batches works again"
    ]
    assert Event.objects.count() == 3
