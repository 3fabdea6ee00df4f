"""Input drift across edge processes: a user counts once per (experiment, window) in total."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import pytest
from django.db import connection

from experiments.input_windows import InputWindows
from routing.models import InputDriftBucket, InputDriftClaim
from routing.observe import inputs
from routing.observe.inputs import CLAIM_KEEP_S, Claim, InputRecorder, write
from routing.proxy.inputs import InputField, InputPlan
from tests.routing.test_proxy import make_experiment

# Windows of an hour from the epoch, every sampled user monitored (a training reference).
HOURLY = InputWindows(reference=None, started=0.0, window_s=3600.0)
ARMS = [("v1", "http://127.0.0.1:9/", 0.5), ("v2", "http://127.0.0.1:9/", 0.5)]
FIELDS = (InputField("c", "category", None), InputField("n", "number", (10.0,)))


def _process(experiment_id: int) -> tuple[InputPlan, InputRecorder]:
    """One edge process: its own plan and recorder (its own set of the window's users)."""
    return InputPlan(experiment_id, FIELDS, 1.0, 60.0, HOURLY, 1000), InputRecorder(flush_s=60)


def _send(plan: InputPlan, recorder: InputRecorder, units: range, value: str) -> None:
    for index in units:
        plan.capture(orjson.dumps({"c": value, "n": index}), f"user-{index}", recorder)


def _counted(experiment_id: int) -> dict[str, dict[str, int]]:
    merged: dict[str, dict[str, int]] = {}
    for row in InputDriftBucket.objects.filter(experiment_id=experiment_id):
        found = merged.setdefault(row.field_path, {})
        for cell, n in orjson.loads(row.counts).items():
            found[cell] = found.get(cell, 0) + n
    return merged


@pytest.mark.django_db(transaction=True)
def test_two_processes_count_a_user_once_per_window() -> None:
    experiment_id = make_experiment("claimed", ARMS)
    (plan_a, first), (plan_b, second) = _process(experiment_id), _process(experiment_id)
    _send(plan_a, first, range(0, 10), "a")
    _send(plan_b, second, range(5, 15), "b")  # users 5..9 reached both processes
    _send(plan_b, second, range(5, 15), "b again")  # this process has counted them already
    assert first.buffered == 10 and second.buffered == 10
    assert first.flush_now() == 2  # one row per field
    assert second.flush_now() == 2
    counted = _counted(experiment_id)
    # Users 5..9 count with the first process's cells only; 15 users, once each.
    assert counted["c"] == {"a": 10, "b": 5}
    assert counted["n"] == {"0": 10, "1": 5}
    assert InputDriftClaim.objects.filter(experiment_id=experiment_id).count() == 15
    # Flushing in the other order: the second process's claims win.
    other_id = make_experiment("claimed2", ARMS)
    (plan_a, first), (plan_b, second) = _process(other_id), _process(other_id)
    _send(plan_a, first, range(0, 10), "a")
    _send(plan_b, second, range(5, 15), "b")
    second.flush_now()
    first.flush_now()
    assert _counted(other_id)["c"] == {"b": 10, "a": 5}


@pytest.mark.django_db(transaction=True)
def test_a_claim_is_per_window_and_old_windows_claims_are_deleted() -> None:
    experiment_id = make_experiment("windows", ARMS)
    now = time.time()
    recorder = InputRecorder(flush_s=60)
    paths, cells = ("c",), ("x",)
    old = (0.0, 3600.0)
    current = (now - 10.0, now + 3590.0)
    for start, end in (old, current, current, old):  # the same user twice in each window
        recorder.claim((experiment_id, start, end, 42, start, paths, cells))
    recorder.claim((10**9, *current, 42, now, paths, cells))  # an experiment deleted since
    assert recorder.buffered == 5
    assert write(recorder.take(), now=now) == 2  # one bucket row per window
    assert (
        sum(sum(orjson.loads(row.counts).values()) for row in InputDriftBucket.objects.all()) == 2
    )
    assert InputDriftClaim.objects.count() == 2
    # The next flush first deletes the claims of windows that ended over CLAIM_KEEP_S ago (the
    # old one), then finds the user claimed in the current window: not counted again.
    recorder.claim((experiment_id, *current, 42, now, paths, cells))
    assert write(recorder.take(), now=now) == 0
    assert list(InputDriftClaim.objects.values_list("window_start", flat=True)) == [current[0]]
    # Once the current window has ended over CLAIM_KEEP_S ago, its claims go too.
    late = current[1] + CLAIM_KEEP_S + 1
    assert write([(experiment_id, *current, 7, now, paths, cells)], now=late) == 1
    assert list(InputDriftClaim.objects.values_list("user_hash", flat=True)) == [7]


@pytest.mark.django_db(transaction=True)
def test_two_processes_flushing_at_once_count_a_user_once() -> None:
    """Two flushes in concurrent transactions (PostgreSQL: the second insert of a key waits for
    the first transaction, then does nothing); on SQLite writes are serialized anyway."""
    if connection.vendor != "postgresql":
        pytest.skip("concurrent writers need PostgreSQL")
    experiment_id = make_experiment("concurrent", ARMS)
    now = time.time()
    window = (now - 10.0, now + 3590.0)
    barrier = threading.Barrier(2)
    written: list[int] = []

    def flush(users: range, value: str) -> None:
        try:
            claims = [(experiment_id, *window, user, now, ("c",), (value,)) for user in users]
            barrier.wait()
            written.append(write(claims, now=now))
        finally:
            connection.close()

    threads = [
        threading.Thread(target=flush, args=(range(0, 600), "a")),
        threading.Thread(target=flush, args=(range(300, 900), "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(written) == 2
    counted = _counted(experiment_id)["c"]
    assert sum(counted.values()) == 900 and set(counted) <= {"a", "b"}
    assert counted.get("a", 0) >= 300 and counted.get("b", 0) >= 300
    assert InputDriftClaim.objects.filter(experiment_id=experiment_id).count() == 900


def test_stop_during_a_flush_whose_write_has_not_started_keeps_the_claims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The periodic flush has taken the claims and queued their write behind a busy writer
    # thread when stop() comes: it must not cancel that write (the claims would be gone).
    written: list[list[Claim]] = []
    monkeypatch.setattr(inputs, "write", lambda pending: written.append(pending) or 0)
    recorder = InputRecorder(flush_s=0.01)
    busy = threading.Event()
    claim: Claim = (1, 0.0, 3600.0, 7, 0.0, ("amount",), ("1",))

    async def scenario() -> None:
        await recorder.start()
        assert recorder._executor is not None
        recorder._executor.submit(busy.wait, 5)  # the writer thread is busy
        recorder.claim(claim)
        while recorder.buffered:  # taken by the periodic flush, its write queued
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(recorder.stop())
        await asyncio.sleep(0.05)
        busy.set()
        await stopping

    asyncio.run(scenario())
    assert [pending for pending in written if pending] == [[claim]]
