"""Exposure recorder: first exposures stored once, bounded buffer and cache, counted drops."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import OperationalError, connection

from experiments import services
from routing.models import Exposure
from routing.observe.recorder import ExposureRecorder
from routing.selectors import exposure_counts, multiple_exposure_counts
from routing.services import EXPOSURE_INSERT_BATCH, ExposureRow, _sqlite_utc_text
from tests.factories import create_experiment


def _experiment_id(key: str = "ranker-v2") -> int:
    experiment = create_experiment(key, "ab")
    services.experiment_start(actor="test", key=key)
    return int(experiment.pk)


@pytest.mark.django_db
def test_first_exposure_is_stored_once(metrics: Any) -> None:
    experiment_id = _experiment_id()
    recorder = ExposureRecorder(flush_s=60, batch_rows=100, max_buffer=100, cache_size=100)
    for _ in range(3):
        recorder.record(experiment_id=experiment_id, unit_id="u1", variant_key="v1")
    recorder.record(experiment_id=experiment_id, unit_id="u2", variant_key="v2")
    assert recorder.stats.buffered == 2
    assert recorder.stats.skipped_cached == 2
    assert recorder.flush_now() == 2
    # A second process (a fresh recorder with an empty cache) writes the same rows again;
    # the unique constraint keeps the first.
    other = ExposureRecorder(flush_s=60, batch_rows=100, max_buffer=100, cache_size=100)
    other.record(experiment_id=experiment_id, unit_id="u1", variant_key="v1")
    other.flush_now()
    rows = list(Exposure.objects.order_by("unit_id").values_list("unit_id", "variant_key"))
    assert rows == [("u1", "v1"), ("u2", "v2")]
    assert recorder.stats.written == 2
    assert recorder.stats.buffered == 0
    # The duplicate reached the database but inserted nothing.
    assert other.stats.written == 0


def test_a_failure_part_way_keeps_only_the_unwritten_chunks() -> None:
    calls: list[int] = []

    def insert(rows: Sequence[ExposureRow]) -> int:
        calls.append(len(rows))
        if len(calls) == 2:
            raise OperationalError("connection lost")
        return len(rows)

    recorder = ExposureRecorder(flush_s=60, batch_rows=10**6, max_buffer=10**6, insert=insert)
    for unit in range(2500):
        recorder.record(experiment_id=1, unit_id=str(unit), variant_key="v1")
    assert recorder.flush_now() == EXPOSURE_INSERT_BATCH
    assert calls == [EXPOSURE_INSERT_BATCH, EXPOSURE_INSERT_BATCH]
    assert recorder.stats.buffered == 2500 - EXPOSURE_INSERT_BATCH
    assert recorder.flush_now() == 2500 - EXPOSURE_INSERT_BATCH
    assert recorder.stats.written == 2500 and recorder.stats.dropped == 0


@pytest.mark.django_db
def test_first_seen_at_is_the_time_of_the_request(metrics: Any) -> None:
    experiment_id = _experiment_id()
    recorder = ExposureRecorder(flush_s=60)
    before = time.time()
    recorder.record(experiment_id=experiment_id, unit_id="u1", variant_key="v1")
    after = time.time()
    recorder.flush_now()
    seen = Exposure.objects.get().first_seen_at
    assert before - 1e-3 <= seen.timestamp() <= after + 1e-3
    assert seen.tzinfo is not None


@pytest.mark.parametrize("seconds", [0.0, 1.5, 1_764_410_000.000001, 1_764_410_000.9999996])
def test_sqlite_time_text_is_the_naive_utc_datetime(seconds: float) -> None:
    # Reference: what Django's SQLite backend stores for an aware UTC datetime, the naive
    # UTC time as text (DatabaseOperations.adapt_datetimefield_value).
    expected = datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
    written = datetime.fromisoformat(_sqlite_utc_text(seconds))
    assert abs(written - expected) <= timedelta(microseconds=1)


@pytest.mark.django_db
def test_units_seen_in_two_variants_are_counted(metrics: Any) -> None:
    experiment_id = _experiment_id()
    recorder = ExposureRecorder(flush_s=60)
    for unit in ("a", "b", "c"):
        recorder.record(experiment_id=experiment_id, unit_id=unit, variant_key="v1")
    recorder.record(experiment_id=experiment_id, unit_id="d", variant_key="v2")
    # After a weight change unit "a" is served v2 as well.
    recorder.record(experiment_id=experiment_id, unit_id="a", variant_key="v2")
    recorder.flush_now()
    assert multiple_exposure_counts(experiment_id) == (4, 1)
    assert exposure_counts(experiment_id) == {"v1": 3, "v2": 2}
    assert exposure_counts(experiment_id, exclude_multiple_variants=True) == {"v1": 2, "v2": 1}
    assert multiple_exposure_counts(experiment_id + 1000) == (0, 0)
    assert exposure_counts(experiment_id + 1000) == {}


def test_full_buffer_drops_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    written: list[Sequence[ExposureRow]] = []

    def insert(rows: Sequence[ExposureRow]) -> int:
        written.append(rows)
        return len(rows)

    recorder = ExposureRecorder(
        flush_s=60, batch_rows=10, max_buffer=3, cache_size=10, insert=insert
    )
    with caplog.at_level(logging.ERROR, logger="routing.observe.recorder"):
        for unit in range(5):
            recorder.record(experiment_id=1, unit_id=str(unit), variant_key="v1")
    assert recorder.stats.buffered == 3
    assert recorder.stats.dropped == 2
    assert "dropped 1 exposure row(s) (buffer_full)" in caplog.text
    recorder.flush_now()
    assert [row[1] for row in written[0]] == ["0", "1", "2"]
    # Dropped units were not cached, so a later request for them is buffered again.
    recorder.record(experiment_id=1, unit_id="4", variant_key="v1")
    assert recorder.stats.buffered == 1


def test_cache_is_bounded_and_forgets_the_oldest() -> None:
    recorder = ExposureRecorder(
        flush_s=60, batch_rows=100, max_buffer=100, cache_size=2, insert=len
    )
    for unit in ("a", "b", "c"):
        recorder.record(experiment_id=1, unit_id=unit, variant_key="v1")
    recorder.record(experiment_id=1, unit_id="c", variant_key="v1")
    assert recorder.stats.skipped_cached == 1
    # "a" was evicted, so it is buffered again (and ignored by the unique constraint).
    recorder.record(experiment_id=1, unit_id="a", variant_key="v1")
    assert recorder.stats.buffered == 4


def test_failed_write_keeps_rows_for_the_next_flush() -> None:
    attempts: list[int] = []

    def insert(rows: Sequence[ExposureRow]) -> int:
        attempts.append(len(rows))
        if len(attempts) == 1:
            raise OperationalError("database is locked")
        return len(rows)

    recorder = ExposureRecorder(flush_s=60, batch_rows=100, max_buffer=100, insert=insert)
    recorder.record(experiment_id=1, unit_id="a", variant_key="v1")
    assert recorder.flush_now() == 0
    assert recorder.stats.buffered == 1
    recorder.record(experiment_id=1, unit_id="b", variant_key="v1")
    assert recorder.flush_now() == 2
    assert attempts == [1, 2]
    assert recorder.stats == type(recorder.stats)(
        buffered=0, written=2, dropped=0, skipped_cached=0, failed_flushes=1
    )


# Foreign keys are checked at commit, so this needs real commits.
@pytest.mark.django_db(transaction=True)
def test_rows_of_a_deleted_experiment_are_dropped_not_retried(metrics: Any) -> None:
    live = _experiment_id("live")
    draft = create_experiment("gone", "ab")
    recorder = ExposureRecorder(flush_s=60)
    recorder.record(experiment_id=live, unit_id="u", variant_key="v1")
    recorder.record(experiment_id=draft.pk, unit_id="u", variant_key="v1")
    services.experiment_delete(actor="test", key="gone")
    recorder.flush_now()
    assert recorder.stats.dropped == 1
    assert recorder.stats.written == 1
    assert recorder.stats.buffered == 0
    assert list(Exposure.objects.values_list("experiment_id", flat=True)) == [live]


@pytest.mark.django_db
def test_rows_the_database_refuses_are_dropped_not_retried_forever(metrics: Any) -> None:
    live = _experiment_id("live")
    recorder = ExposureRecorder(flush_s=60)
    recorder.record(experiment_id=live, unit_id="fine", variant_key="v1")
    recorder.record(experiment_id=live, unit_id="nul\x00inside", variant_key="v1")
    recorder.record(experiment_id=live, unit_id="x" * 300, variant_key="v1")
    recorder.flush_now()
    # PostgreSQL refuses NUL in text and values longer than the column; SQLite stores both.
    refused = 2 if connection.vendor == "postgresql" else 0
    assert recorder.stats.buffered == 0
    assert recorder.stats.written == 3 - refused
    assert recorder.stats.dropped == refused
    assert recorder.flush_now() == 0  # nothing went back to the buffer
    assert Exposure.objects.filter(unit_id="fine").count() == 1


@pytest.mark.django_db(transaction=True)
def test_background_flush_by_time_size_and_on_stop(metrics: Any) -> None:
    experiment_id = _experiment_id()
    recorder = ExposureRecorder(flush_s=0.2, batch_rows=5, max_buffer=1000)

    async def run() -> tuple[float, int]:
        await recorder.start()
        started = time.monotonic()
        for unit in range(5):
            recorder.record(experiment_id=experiment_id, unit_id=f"size-{unit}", variant_key="v1")
        # Five rows reach batch_rows: the flush starts without waiting for the timer.
        while recorder.stats.written < 5:
            await asyncio.sleep(0.005)
        by_size = time.monotonic() - started
        recorder.record(experiment_id=experiment_id, unit_id="timer", variant_key="v1")
        while recorder.stats.written < 6:
            await asyncio.sleep(0.01)
        recorder.record(experiment_id=experiment_id, unit_id="last", variant_key="v2")
        await recorder.stop()
        return by_size, recorder.stats.written

    by_size, written = asyncio.run(run())
    assert by_size < 0.15
    assert written == 7
    assert Exposure.objects.filter(experiment_id=experiment_id).count() == 7


def test_stop_waits_for_a_flush_in_flight_and_writes_what_it_could_not() -> None:
    # The first write fails after stop() has begun: the rows it held come back to the buffer
    # before stop() takes it, so stop()'s own flush writes them, with the rows recorded since.
    release = threading.Event()
    writes: list[list[str]] = []

    def insert(rows: Sequence[ExposureRow]) -> int:
        writes.append([row[1] for row in rows])
        if len(writes) == 1:
            release.wait(5)
            raise OperationalError("database is locked")
        return len(rows)

    recorder = ExposureRecorder(flush_s=60, batch_rows=2, max_buffer=100, insert=insert)

    async def run() -> None:
        await recorder.start()
        recorder.record(experiment_id=1, unit_id="a", variant_key="v1")
        recorder.record(experiment_id=1, unit_id="b", variant_key="v1")
        while not writes:  # the size-triggered flush holds a and b in its thread
            await asyncio.sleep(0.005)
        recorder.record(experiment_id=1, unit_id="c", variant_key="v1")
        stopping = asyncio.ensure_future(recorder.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping

    asyncio.run(run())
    assert writes == [["a", "b"], ["a", "b", "c"]]
    assert recorder.stats == type(recorder.stats)(
        buffered=0, written=3, dropped=0, skipped_cached=0, failed_flushes=1
    )


def test_a_flush_that_fails_around_the_write_gives_every_row_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Opening or closing the thread's connection can fail before the rows reach the database.
    written: list[int] = []
    recorder = ExposureRecorder(
        flush_s=60,
        batch_rows=100,
        max_buffer=100,
        insert=lambda rows: written.append(len(rows)) or len(rows),
    )
    failures = iter([OperationalError("server closed the connection")])

    def close_old_connections() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure

    monkeypatch.setattr("routing.db.close_old_connections", close_old_connections)

    async def run() -> tuple[Exception | None, int]:
        await recorder.start()
        recorder.record(experiment_id=1, unit_id="a", variant_key="v1")
        recorder.record(experiment_id=1, unit_id="b", variant_key="v1")
        assert recorder._executor is not None
        error = await recorder._flush_in_thread(recorder._executor)
        buffered = recorder.stats.buffered
        await recorder.stop()
        return error, buffered

    error, buffered = asyncio.run(run())
    assert isinstance(error, OperationalError) and buffered == 2
    assert written == [2] and recorder.stats.written == 2


def test_a_flush_now_that_raises_keeps_its_rows() -> None:
    def insert(rows: Sequence[ExposureRow]) -> int:
        raise RuntimeError("a bug in the writer")

    recorder = ExposureRecorder(flush_s=60, batch_rows=100, max_buffer=100, insert=insert)
    recorder.record(experiment_id=1, unit_id="a", variant_key="v1")
    recorder.record(experiment_id=1, unit_id="b", variant_key="v1")
    with pytest.raises(RuntimeError):
        recorder.flush_now()
    assert recorder.stats.buffered == 2 and recorder.stats.dropped == 0
