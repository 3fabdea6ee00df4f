"""Per-user outcome windows at the edge (routing/observe/unit_outcomes.py) and their upsert."""

from __future__ import annotations

import pytest

from routing.models import UnitOutcome
from routing.observe.histogram import LogHistogram
from routing.observe.observations import ObservationAggregator
from routing.observe.unit_outcomes import UnitOutcomeBook, decode_buckets, write_unit_rows
from tests.factories import create_experiment

INDEX = LogHistogram().bucket_index
SHARES = {"v1": 0.9, "v2": 0.1, "": 0.9}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_count_in_the_windows_after_the_first_one() -> None:
    clock = Clock(999.0)
    book = UnitOutcomeBook(fast_s=3.0, slow_s=60.0, clock=clock)
    tally = book.tally(1, "u1", "v2", SHARES)
    assert tally is not None and book.tally(1, "u1", "v2", SHARES) is tally
    tally.add(1000.0, True, 12.0)
    tally.add(1002.0, False, 8.0)
    clock.now = 1002.5
    assert book.drain() == []  # the fast window is still open
    tally.add(1010.0, True, None)  # slow window only
    clock.now = 1010.0
    (fast,) = book.drain()  # written once the fast window has closed: everything so far
    assert fast[:13] == (1, "u1", "v2", 1000.0, 0.1, 0.9, 2, 1, 3, 2, 20.0, 208.0, 2)
    # The fast window's latencies per histogram bucket go with it, once.
    assert decode_buckets(fast[13]) == {INDEX(12.0): 1, INDEX(8.0): 1} and fast[14] == ""
    tally.add(1030.0, False, 5.0)
    clock.now = 1059.0
    assert book.drain() == []
    tally.add(1061.0, True, 5.0)  # after both windows: not counted
    clock.now = 1061.0
    (slow,) = book.drain()  # and once the slow window has closed: what came after
    assert slow[:13] == (1, "u1", "v2", 1000.0, 0.1, 0.9, 0, 0, 1, 0, 5.0, 25.0, 1)
    # The slow window's buckets hold every latency of the window, not only the late ones.
    assert slow[13] == ""
    assert decode_buckets(slow[14]) == {INDEX(12.0): 1, INDEX(8.0): 1, INDEX(5.0): 1}
    clock.now = 2000.0
    assert book.drain() == []


def test_everything_is_written_on_shutdown_and_a_failed_write_is_retried() -> None:
    clock = Clock(5.0)
    book = UnitOutcomeBook(fast_s=3.0, slow_s=60.0, clock=clock)
    tally = book.tally(1, "u1", "v1", SHARES)
    assert tally is not None
    tally.add(5.0, True, 1.0)
    rows = book.drain(everything=True)
    # One write with the counts and both windows' latency buckets.
    assert [row[6:10] for row in rows] == [(1, 1, 1, 1)]
    tally.add(6.0, False, 1.0)
    book.restore(rows)
    (row,) = book.drain()  # the retry, with the counts added since
    assert row[6:10] == (2, 1, 2, 1)
    # The bucket counts written with the failed rows are written again, unchanged.
    assert rows[0][13:] == row[13:] == (f"{INDEX(1.0)}:1", f"{INDEX(1.0)}:1")


def test_closed_windows_are_evicted_at_the_cap_and_new_users_wait_past_it() -> None:
    clock = Clock(0.0)
    book = UnitOutcomeBook(fast_s=1.0, slow_s=10.0, max_units=2, clock=clock)
    for unit in ("a", "b"):
        tally = book.tally(1, unit, "v1", SHARES)
        assert tally is not None
        tally.add(0.0, False, 1.0)
    assert book.tally(1, "c", "v1", SHARES) is None  # both windows still open
    assert book.untracked == 1
    clock.now = 11.0
    assert len(book.drain()) == 2
    assert book.tally(1, "c", "v1", SHARES) is not None
    assert book.size == 1


def test_refuses_a_fast_window_longer_than_the_slow_one() -> None:
    with pytest.raises(ValueError, match="fast_s"):
        UnitOutcomeBook(fast_s=5.0, slow_s=1.0)


@pytest.mark.django_db(transaction=True)
def test_the_upsert_keeps_the_process_that_saw_the_user_first(metrics: object) -> None:
    experiment_id = create_experiment().id
    base = (experiment_id, "u1", "v2")
    # Process P saw the user first at t=100 (two flushes); Q at t=101; R earlier, at t=99.5.
    write_unit_rows([(*base, 100.0, 0.1, 0.9, 1, 1, 1, 1, 10.0, 100.0, 1, "3:1", "")])
    write_unit_rows([(*base, 100.0, 0.1, 0.9, 1, 0, 2, 1, 20.0, 200.0, 2, "", "3:1,4:1")])
    write_unit_rows(
        [(experiment_id, "u1", "v1", 101.0, 0.9, 0.9, 5, 5, 5, 5, 1.0, 1.0, 1, "9:1", "9:1")]
    )
    row = UnitOutcome.objects.get(experiment_id=experiment_id, unit_id="u1")
    assert (row.first_seen, row.variant_key, row.share) == (100.0, "v2", 0.1)
    assert (row.requests_fast, row.errors_fast, row.requests_slow, row.errors_slow) == (2, 1, 3, 2)
    assert (row.latency_sum, row.latency_count) == (30.0, 3)
    # Bucket counts are written once per window: replaced, and kept when a write has none.
    assert (row.latency_buckets_fast, row.latency_buckets_slow) == ("3:1", "3:1,4:1")
    write_unit_rows(
        [(experiment_id, "u1", "v1", 99.5, 0.95, 0.95, 1, 0, 1, 0, 4.0, 16.0, 1, "", "")]
    )
    row.refresh_from_db()
    assert (row.first_seen, row.variant_key, row.share, row.control_share) == (
        99.5,
        "v1",
        0.95,
        0.95,
    )
    assert (row.requests_fast, row.errors_fast, row.requests_slow, row.latency_sum) == (
        1,
        0,
        1,
        4.0,
    )
    # An earlier start replaces the bucket counts too (with none yet).
    assert (row.latency_buckets_fast, row.latency_buckets_slow) == ("", "")
    # Rows of an experiment deleted meanwhile are skipped, the others written.
    assert (
        write_unit_rows([(10**9, "x", "v1", 1.0, 0.5, 0.5, 1, 1, 1, 1, 1.0, 1.0, 1, "", "")]) == 0
    )


@pytest.mark.django_db(transaction=True)
def test_the_observation_flush_writes_the_users_too(metrics: object) -> None:
    experiment_id = create_experiment().id
    clock = Clock(1000.0)
    book = UnitOutcomeBook(fast_s=3.0, slow_s=60.0, clock=clock)
    aggregator = ObservationAggregator(
        bucket_s=10, flush_interval_s=60.0, max_cells=100, clock=clock, units=book
    )
    tally = book.tally(experiment_id, "u9", "v2", SHARES)
    aggregator.observe(experiment_id, "v2", 15.0, error=True, unit=tally)
    aggregator.observe(experiment_id, "v2", 25.0, error=False, unit=tally)
    assert aggregator.flush_now() == 1
    row = UnitOutcome.objects.get(experiment_id=experiment_id, unit_id="u9")
    assert (row.first_seen, row.requests_fast, row.errors_fast, row.latency_sum) == (
        1000.0,
        2,
        1,
        40.0,
    )
