"""Per-user sums of generative answers at the edge (routing/observe/unit_llm.py), and upserts."""

from __future__ import annotations

import pytest

from routing.models import UnitLLMOutcome, UnitOutcome
from routing.observe.histogram import LogHistogram
from routing.observe.llm_stats import LLMRecord
from routing.observe.observations import ObservationAggregator
from routing.observe.unit_llm import UnitLLMBook, write_llm_unit_rows
from routing.observe.unit_outcomes import UnitOutcomeBook, decode_buckets
from tests.factories import create_experiment

INDEX = LogHistogram().bucket_index
SHARES = {"v1": 0.9, "v2": 0.1, "": 0.9}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(ttft: float | None, tokens: int | None, cost: float | None) -> LLMRecord:
    return LLMRecord(
        duration_ms=500.0, ttft_ms=ttft, input_tokens=10, output_tokens=tokens, cost=cost
    )


def test_answers_count_in_the_windows_of_the_users_first_request() -> None:
    clock = Clock(1000.0)
    units = UnitOutcomeBook(fast_s=3.0, slow_s=60.0, clock=clock)
    book = UnitLLMBook(clock=clock)
    tally = units.tally(1, "u1", "v2", SHARES)
    assert tally is not None
    book.add(tally, answer(80.0, 20, 1e-5), 1000.5)  # no completed request yet: not counted
    assert len(book) == 0
    tally.add(1000.0, False, 12.0)
    book.add(tally, answer(80.0, 20, 1e-5), 1000.5)
    book.add(tally, answer(120.0, 40, None), 1002.0)  # no price: no cost
    book.add(tally, answer(None, None, None), 1002.5)  # a plain answer: counted, no figures
    clock.now = 1002.9
    assert book.drain() == []  # the fast window is still open
    clock.now = 1003.5
    (fast,) = book.drain()
    assert fast[:8] == (1, "u1", "v2", 1000.0, 0.1, 0.9, 3, 3)
    # ttft sum/count, tokens sum/count, rate sum/count (tokens per s over 500 ms), cost sum/count
    assert fast[8:16] == (200.0, 2, 60.0, 2, 120.0, 2, 1e-5, 1)
    assert decode_buckets(fast[16]) == {INDEX(80.0): 1, INDEX(120.0): 1} and fast[17] == ""
    book.add(tally, answer(300.0, 10, 2e-5), 1030.0)  # slow window only
    clock.now = 1031.0
    assert book.drain() == []
    book.add(tally, answer(90.0, 1, 1e-6), 1061.0)  # after both windows: not counted
    clock.now = 1061.0
    (slow,) = book.drain()
    assert slow[6:16] == (0, 1, 300.0, 1, 10.0, 1, 20.0, 1, 2e-5, 1)
    # The slow window's buckets hold every TTFT of the window.
    assert slow[16] == ""
    assert decode_buckets(slow[17]) == {INDEX(80.0): 1, INDEX(120.0): 1, INDEX(300.0): 1}
    assert len(book) == 0 and book.drain() == []


def test_shutdown_writes_everything_and_failed_rows_are_written_again() -> None:
    clock = Clock(5.0)
    units = UnitOutcomeBook(fast_s=3.0, slow_s=60.0, clock=clock)
    book = UnitLLMBook(clock=clock)
    tally = units.tally(1, "u1", "v1", SHARES)
    assert tally is not None
    tally.add(5.0, False, 1.0)
    book.add(tally, answer(50.0, 5, 1e-6), 5.0)
    rows = book.drain(everything=True)
    assert [row[6:10] for row in rows] == [(1, 1, 50.0, 1)]
    assert rows[0][16:] == (f"{INDEX(50.0)}:1", f"{INDEX(50.0)}:1")
    book.restore(rows)
    assert book.drain() == rows


def test_a_user_whose_first_answer_comes_after_the_fast_window() -> None:
    clock = Clock(0.0)
    units = UnitOutcomeBook(fast_s=1.0, slow_s=10.0, clock=clock)
    book = UnitLLMBook(clock=clock)
    tally = units.tally(1, "u1", "v1", SHARES)
    assert tally is not None
    tally.add(0.0, False, 1.0)
    book.add(tally, answer(70.0, 3, None), 5.0)
    clock.now = 5.0
    (fast,) = book.drain()  # its fast window had closed: written with nothing in it
    assert fast[6:8] == (0, 1) and fast[16] == ""
    clock.now = 10.5
    (slow,) = book.drain()
    assert slow[6:8] == (0, 0) and decode_buckets(slow[17]) == {INDEX(70.0): 1}


@pytest.mark.django_db(transaction=True)
def test_the_upsert_keeps_the_process_that_saw_the_user_first(metrics: object) -> None:
    experiment_id = create_experiment().id
    zeros = (0.0, 0, 0.0, 0, 0.0, 0)
    write_llm_unit_rows(
        [(experiment_id, "u1", "v2", 100.0, 0.1, 0.9, 1, 1, 80.0, 1, *zeros, "3:1", "")]
    )
    write_llm_unit_rows(
        [(experiment_id, "u1", "v2", 100.0, 0.1, 0.9, 0, 1, 20.0, 1, *zeros, "", "3:1,4:1")]
    )
    write_llm_unit_rows(
        [(experiment_id, "u1", "v1", 101.0, 0.9, 0.9, 5, 5, 9.0, 9, *zeros, "9:1", "9:1")]
    )
    row = UnitLLMOutcome.objects.get(experiment_id=experiment_id, unit_id="u1")
    assert (row.first_seen, row.variant_key, row.answers_fast, row.answers_slow) == (
        100.0,
        "v2",
        1,
        2,
    )
    assert (row.ttft_sum, row.ttft_count) == (100.0, 2)
    assert (row.ttft_buckets_fast, row.ttft_buckets_slow) == ("3:1", "3:1,4:1")
    assert (
        write_llm_unit_rows([(10**9, "x", "v1", 1.0, 0.5, 0.5, 1, 1, 1.0, 1, *zeros, "", "")]) == 0
    )


@pytest.mark.django_db(transaction=True)
def test_the_observation_flush_writes_the_users_llm_sums(metrics: object) -> None:
    experiment_id = create_experiment().id
    clock = Clock(1000.0)
    units = UnitOutcomeBook(fast_s=3.0, slow_s=60.0, clock=clock)
    aggregator = ObservationAggregator(
        bucket_s=10, flush_interval_s=60.0, max_cells=100, clock=clock, units=units
    )
    tally = units.tally(experiment_id, "u9", "v2", SHARES)
    aggregator.observe(experiment_id, "v2", 600.0, error=False, unit=tally)
    aggregator.observe_llm(experiment_id, "v2", answer(90.0, 30, 3e-5), tally)
    aggregator.observe(experiment_id, "v2", 15.0, error=False, unit=tally)  # a plain request
    assert aggregator.flush_now() == 1
    assert UnitOutcome.objects.get(experiment_id=experiment_id, unit_id="u9").requests_fast == 2
    row = UnitLLMOutcome.objects.get(experiment_id=experiment_id, unit_id="u9")
    assert (row.first_seen, row.share, row.control_share) == (1000.0, 0.1, 0.9)
    assert (row.answers_fast, row.ttft_sum, row.output_tokens_sum, row.cost_sum) == (
        1,
        90.0,
        30.0,
        3e-5,
    )
    assert row.ttft_buckets_fast == row.ttft_buckets_slow == f"{INDEX(90.0)}:1"
