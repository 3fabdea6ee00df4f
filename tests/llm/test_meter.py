"""The stream meter and the usage reader on exact inputs: split events, CRLF, shapes, cost."""

from __future__ import annotations

import time

import pytest

from routing.observe.llm_stats import LLMCell, LLMRecord
from routing.proxy.llm_usage import carries_content, cost_of, is_llm_target, usage_of
from routing.proxy.streaming import StreamMeter, whole_record

SSE = [(b"content-type", b"text/event-stream")]


def test_llm_targets() -> None:
    assert is_llm_target("/v1/chat/completions")
    assert is_llm_target("/v1/completions?x=1")
    assert is_llm_target("/v1/responses/")
    assert not is_llm_target("/predict")
    assert not is_llm_target("/v1/completions/abc/x")


def test_usage_shapes() -> None:
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == (3, 4)
    assert usage_of({"usage": {"input_tokens": 5, "output_tokens": 6}}) == (5, 6)
    completed = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 1, "output_tokens": 2}},
    }
    assert usage_of(completed) == (1, 2)
    assert usage_of({"usage": None}) is None
    assert usage_of({"usage": {"prompt_tokens": True, "completion_tokens": 1}}) is None
    assert usage_of({"usage": {"prompt_tokens": -1, "completion_tokens": 1}}) is None
    assert usage_of([1]) is None


def test_content_events() -> None:
    assert not carries_content({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    assert carries_content({"choices": [{"delta": {"content": "hi"}}]})
    assert carries_content({"choices": [{"text": "hi"}]})
    assert not carries_content({"choices": [], "usage": {"prompt_tokens": 1}})
    assert carries_content({"type": "response.output_text.delta", "delta": "x"})
    assert not carries_content({"type": "response.created"})
    assert carries_content(None)  # data that is not JSON is content of a plain event stream


def test_meter_splits_events_across_chunks_and_crlf() -> None:
    meter = StreamMeter(time.perf_counter(), sse=True, llm=True)
    meter.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\r\n\r\nda')
    assert meter.ttft_ms is None
    meter.feed(b'ta: {"choices":[{"delta":{"content":"a"}}]}\r\n')
    assert meter.ttft_ms is None  # the event is not complete yet
    meter.feed(b'\r\ndata: {"choices":[{"delta":{"content":"b"}}]}\n\n')
    assert meter.ttft_ms is not None and meter.content_events == 2
    meter.feed(b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9}}\n\n')
    meter.feed(b"data: [DONE]\n\n")
    record = meter.record(100.0, (1.0, 2.0))
    assert (record.input_tokens, record.output_tokens, record.approximate) == (7, 9, False)
    assert record.cost == pytest.approx((7 * 1.0 + 9 * 2.0) / 1e6)
    assert record.chunks == 5


def test_meter_without_usage_counts_content_events() -> None:
    meter = StreamMeter(time.perf_counter(), sse=True, llm=True)
    meter.feed(b'data: {"choices":[{"text":"x"}]}\n\ndata: {"choices":[{"text":"y"}]}\n\n')
    record = meter.record(50.0, None)
    assert (record.output_tokens, record.approximate, record.cost) == (2, True, None)


def test_plain_chunked_answer_has_ttfb_and_chunks_only() -> None:
    meter = StreamMeter(time.perf_counter(), sse=False, llm=False)
    meter.feed(b"x" * 10)
    meter.feed(b"y")
    record = meter.record(20.0, (1.0, 1.0))
    assert record.ttft_ms is None and record.output_tokens is None and record.chunks == 2


def test_whole_answers() -> None:
    body = b'{"usage":{"prompt_tokens":2,"completion_tokens":3}}'
    record = whole_record(body, [(b"content-type", b"application/json")], 40.0, (1.0, 1.0))
    assert (record.input_tokens, record.output_tokens, record.ttft_ms) == (2, 3, None)
    # Head and body came together: the answer's TTFB is its latency; not a stream.
    assert (record.ttfb_ms, record.streamed) == (40.0, False)
    sse = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]'
    record = whole_record(sse, SSE, 40.0, None)
    assert (record.ttft_ms, record.output_tokens, record.approximate) == (40.0, 1, True)
    assert whole_record(b"not json", [], 1.0, None).output_tokens is None
    assert cost_of(1_000_000, 0, (2.5, 10.0)) == 2.5


def test_cells_merge_and_round_trip() -> None:
    a, b = LLMCell(), LLMCell()
    a.add(
        LLMRecord(
            duration_ms=500.0,
            ttfb_ms=10.0,
            ttft_ms=100.0,
            chunks=4,
            input_tokens=3,
            output_tokens=10,
            cost=0.5,
            streamed=True,
        )
    )
    b.add(LLMRecord(duration_ms=250.0, input_tokens=1, output_tokens=5, approximate=True))
    a.merge(b)
    back = LLMCell.from_json(a.to_json())
    assert (back.streams, back.chunks, back.token_requests, back.approx_requests) == (1, 4, 2, 1)
    assert (back.input_tokens, back.output_tokens, back.output_sq) == (4, 15.0, 125.0)
    assert back.rate_n == 2 and back.rate_sum == pytest.approx(20.0 + 20.0)
    assert (back.cost_n, back.cost_sum) == (1, 0.5)
    assert back.ttft.count == 1 and back.ttfb.count == 1
    with pytest.raises(ValueError):
        LLMCell.from_json('{"v":2}')


def test_unit_costs_sum_per_user_and_restore() -> None:
    from routing.observe.llm_costs import COST_EVENT, UnitCosts

    costs = UnitCosts()
    costs.add("u1", 0.5, 1000.0)
    costs.add("u1", 0.25, 1003.0)
    costs.add("u2", 1.0, 1001.0)
    rows = costs.drain()
    assert len(costs) == 0
    by_unit = {unit: (name, value, at.timestamp()) for _, unit, name, value, at in rows}
    assert by_unit == {"u1": (COST_EVENT, 0.75, 1000.0), "u2": (COST_EVENT, 1.0, 1001.0)}
    assert len({row[0] for row in rows}) == 2  # unique event ids
    costs.restore(rows)
    again = {unit: value for _, unit, _, value, _ in costs.drain()}
    assert again == {"u1": 0.75, "u2": 1.0}
