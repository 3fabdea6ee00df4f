"""The OpenAI-compatible stand-in LLM on a real socket: answers, SSE, timing and usage."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.llm_server import ServedLLM


@pytest.fixture(scope="module")
def llm() -> Iterator[ServedLLM]:
    served = ServedLLM(name="small", ttft_ms=120.0, tokens_per_s=100.0, output_tokens=6).start()
    yield served
    served.stop()


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def test_chat_completion_whole_with_usage(llm: ServedLLM) -> None:
    started = time.perf_counter()
    answer = httpx.post(
        f"{llm.url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "three words here"}]},
    )
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].split() == [
        "the",
        "model",
        "answers",
        "in",
        "short",
        "plain",
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    # TTFT 120 ms, then 5 more tokens at 100/s: 170 ms at least.
    assert elapsed >= 0.17


def test_streamed_chat_ttft_rate_and_usage(llm: ServedLLM) -> None:
    arrivals: list[tuple[float, str]] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{llm.url}/v1/chat/completions",
        json={
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello there"}],
        },
        headers={"x-llm-tokens-per-s": "10"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.perf_counter() - started, line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    chunks = [orjson.loads(data) for _, data in arrivals[:-1]]
    # The role chunk first (empty content), then 6 tokens, the finish chunk, the usage chunk.
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(contents) == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    first_content = next(t for t, data in arrivals if '"content":"the"' in data)
    # The role chunk comes before the TTFT; the first token not before it (no upper bounds:
    # a loaded machine only ever delays).
    assert arrivals[0][0] < first_content
    assert first_content >= 0.11
    assert arrivals[-1][0] - first_content >= 0.3  # 5 more tokens at 10/s: 0.5 s


def test_streamed_completion_without_usage_and_header_overrides(llm: ServedLLM) -> None:
    response = httpx.post(
        f"{llm.url}/v1/completions",
        json={"model": "m", "prompt": "a b c d", "stream": True, "max_tokens": 3},
        headers={"x-llm-ttft-ms": "0", "x-llm-output-tokens": "10"},
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["the", " model", " answers", ""]
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["object"] == "text_completion"


def test_errors_and_models(llm: ServedLLM) -> None:
    refused = httpx.post(
        f"{llm.url}/v1/chat/completions", json={"messages": []}, headers={"x-llm-status": "503"}
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "server_error"
    assert httpx.post(f"{llm.url}/v1/chat/completions", content=b"[1]").status_code == 400
    assert httpx.get(f"{llm.url}/v1/models").json()["data"][0]["id"] == "small"


def test_the_openai_client_talks_to_it(llm: ServedLLM) -> None:
    client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="sk-test")
    whole = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert whole.choices[0].message.content == "the model"
    assert whole.usage is not None and whole.usage.completion_tokens == 2
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == "the model answers in short plain"


def test_responses_api_whole_and_as_typed_events(llm: ServedLLM) -> None:
    whole = httpx.post(f"{llm.url}/v1/responses", json={"input": "a b c", "max_output_tokens": 2})
    assert whole.status_code == 200
    data = whole.json()
    assert (data["object"], data["status"]) == ("response", "completed")
    assert data["output"][0]["content"][0] == {
        "type": "output_text",
        "text": "the model",
        "annotations": [],
    }
    assert (data["usage"]["input_tokens"], data["usage"]["output_tokens"]) == (3, 2)

    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{llm.url}/v1/responses", json={"input": "hi", "stream": True}
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = answer.read().decode().split("\n")
    assert time.perf_counter() - started >= 0.12 + 5 / 100.0 - 0.01  # TTFT, then 5 more tokens
    kinds = [line[7:] for line in lines if line.startswith("event: ")]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds.count("response.output_text.delta") == 6 and kinds[-1] == "response.completed"
    payloads = [orjson.loads(event) for event in sse_events("\n".join(lines))]
    assert [p["type"] for p in payloads] == kinds  # each data line names its event's type
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert payloads[-1]["response"]["usage"]["output_tokens"] == 6
    assert "[DONE]" not in "\n".join(lines)
