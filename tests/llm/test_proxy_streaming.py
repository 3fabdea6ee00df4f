"""Streamed and whole LLM answers through a real edge: relayed unbuffered, measured (TTFB, TTFT,
chunks, tokens, cost) into the observation buckets, and a client that leaves cancels upstream."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from routing.models import Event
from tests.llm.conftest import LARGE_PRICES, SMALL_PRICES, LLMEdge, users_for

pytestmark = pytest.mark.django_db(transaction=True)


def chat(user: str, *, stream: bool, usage: bool = False, words: str = "one two three") -> dict:
    body: dict = {"model": "m", "user": user, "messages": [{"role": "user", "content": words}]}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return body


def stream_arrivals(
    edge: LLMEdge, body: dict, **extra: str
) -> tuple[httpx.Headers, list[tuple[float, bytes]]]:
    """POST a streamed chat through the proxy; each SSE data line with its arrival time."""
    arrivals: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{edge.proxy()}/chat/completions",
        json=body,
        headers={"X-Rampart-Key": edge.key, **extra},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.perf_counter() - started, line[6:].encode()))
        return response.headers, arrivals


def test_streams_are_relayed_unbuffered_and_measured(llm_edge: LLMEdge) -> None:
    [small_user] = users_for("chat", "small", 1)
    [large_user] = users_for("chat", "large", 1)
    # The large model: TTFT 150 ms, then 12 tokens at 10/s: the last one 1.1 s after the first.
    headers, arrivals = stream_arrivals(
        llm_edge, chat(large_user, stream=True, usage=True), **{"x-llm-tokens-per-s": "10"}
    )
    assert headers["x-rampart-variant"] == "large"
    assert headers["content-type"].startswith("text/event-stream")
    assert arrivals[-1][1] == b"[DONE]"
    chunks = [orjson.loads(data) for _, data in arrivals[:-1]]
    first_token = next(
        t
        for (t, _), c in zip(arrivals, chunks, strict=False)
        if c["choices"] and c["choices"][0]["delta"].get("content")
    )
    last_token = arrivals[-1][0]
    assert first_token >= 0.15
    # Unbuffered: the first token reached the client well before the answer ended.
    assert last_token - first_token >= 0.6
    assert chunks[-1]["usage"]["completion_tokens"] == 12

    # The small model, streamed without usage: tokens are counted, flagged approximate.
    headers, arrivals = stream_arrivals(llm_edge, chat(small_user, stream=True))
    assert headers["x-rampart-variant"] == "small"
    # And read whole: usage from the JSON answer.
    whole = httpx.post(
        f"{llm_edge.proxy()}/chat/completions",
        json=chat(small_user, stream=False, words="a b c d e"),
        headers={"X-Rampart-Key": llm_edge.key},
    )
    assert whole.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}

    llm_edge.stop()
    cells = llm_edge.cells()
    large = cells["large"]
    assert (large.streams, large.ttft.count, large.ttfb.count) == (1, 1, 1)
    assert large.ttft.quantile(0.5) >= 150 * 0.99  # the histogram's 1% relative accuracy
    assert large.ttfb.quantile(0.5) <= large.ttft.quantile(0.5)
    assert large.chunks >= 1
    assert (large.token_requests, large.approx_requests) == (1, 0)
    assert (large.input_tokens, large.output_tokens) == (3, 12)
    assert large.cost_sum == pytest.approx((3 * LARGE_PRICES[0] + 12 * LARGE_PRICES[1]) / 1e6)
    # 12 tokens in at least 150 ms + 11 / 10 s.
    assert large.rate_n == 1 and 0 < large.rate_sum < 12 / 1.25

    small = cells["small"]
    assert (small.streams, small.ttft.count) == (1, 1)
    assert (small.token_requests, small.approx_requests) == (2, 1)
    # 8 counted content events (input unknown: 0), then 5 + 8 from the JSON usage.
    assert (small.input_tokens, small.output_tokens) == (5, 16)
    expected = (8 * SMALL_PRICES[1] + 5 * SMALL_PRICES[0] + 8 * SMALL_PRICES[1]) / 1e6
    assert small.cost_sum == pytest.approx(expected)
    assert small.cost_n == 2

    # Each user's cost, as llm_cost events for cost per conversion (one per user and flush).
    costs = {
        unit: sum(values)
        for unit in (small_user, large_user)
        if (
            values := list(
                Event.objects.filter(unit_id=unit, name="llm_cost").values_list("value", flat=True)
            )
        )
    }
    assert costs[large_user] == pytest.approx(large.cost_sum)
    assert costs[small_user] == pytest.approx(small.cost_sum)


def test_a_client_that_leaves_mid_stream_cancels_the_upstream_call(llm_edge: LLMEdge) -> None:
    [user] = users_for("chat", "large", 1)
    large = llm_edge.large.model
    body = chat(user, stream=True)
    with httpx.stream(
        "POST",
        f"{llm_edge.proxy()}/chat/completions",
        json=body,
        headers={"X-Rampart-Key": llm_edge.key, "x-llm-output-tokens": "2000"},
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            if '"content":"the"' in line:
                break
    # 2,000 tokens at 100/s would take 20 s: the stand-in must see the proxy hang up before.
    deadline = time.monotonic() + 10
    while large.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert large.disconnects == 1
    assert large.completed == 0
    # What was measured before the client left counts: its TTFT, the tokens seen (counted).
    llm_edge.stop()
    cell = llm_edge.cells()["large"]
    assert (cell.streams, cell.ttft.count, cell.approx_requests) == (1, 1, 1)
    assert 1 <= cell.output_tokens < 2000
