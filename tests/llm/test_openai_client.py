"""The official openai package, pointed at ``…/proxy/{experiment}/v1``, works unchanged through a
real edge: whole and streamed chat completions, text completions, the unit from the ``user``
field or from a header, the Rampart key as the API key or beside the model's own key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.llm.conftest import LLMEdge, start_llm_edge, users_for
from tests.llm_server import ServedLLM

pytestmark = pytest.mark.django_db(transaction=True)

TWELVE_TOKENS = "the model answers in short plain words so that every token is"
MESSAGES = [{"role": "user", "content": "write one short line"}]


def test_whole_and_streamed_answers_through_the_proxy(llm_edge: LLMEdge) -> None:
    [small_user] = users_for("chat", "small", 1)
    [large_user] = users_for("chat", "large", 1)
    # The Rampart key as the API key: the proxy takes it and does not forward it.
    client = openai.OpenAI(base_url=llm_edge.proxy(), api_key=llm_edge.key, max_retries=0)

    whole = client.chat.completions.with_raw_response.create(
        model="any", messages=MESSAGES, user=small_user
    )
    assert whole.headers["x-rampart-variant"] == "small"
    completion = whole.parse()
    assert completion.choices[0].message.content == "the model answers in short plain words so"
    assert completion.usage is not None and completion.usage.prompt_tokens == 4
    assert llm_edge.small.model.authorizations == [None]

    stream = client.chat.completions.create(
        model="any",
        messages=MESSAGES,
        user=large_user,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TWELVE_TOKENS
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    legacy = client.completions.create(model="any", prompt="a b", user=small_user, max_tokens=3)
    assert legacy.choices[0].text == "the model answers"

    streamed = client.completions.create(model="any", prompt="a b", user=large_user, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == TWELVE_TOKENS

    llm_edge.stop()
    cells = llm_edge.cells()
    described = {k: (c.streams, c.token_requests, c.ttft.count) for k, c in cells.items()}
    assert (cells["small"].token_requests, cells["large"].token_requests) == (2, 2), described
    assert (cells["small"].streams, cells["large"].streams) == (0, 2)
    assert cells["large"].ttft.count == 2
    assert cells["large"].approx_requests == 1  # the text stream had no usage chunk


def test_the_unit_from_a_header_and_the_models_own_key(
    make_key: Callable[..., str], llms: tuple[ServedLLM, ServedLLM], tmp_path: Path
) -> None:
    edge = start_llm_edge(
        make_key, llms, tmp_path / "edge.log", unit_source=("header", "X-End-User")
    )
    try:
        [user] = users_for("chat", "large", 1)
        client = openai.OpenAI(
            base_url=edge.proxy(),
            api_key="sk-model-key",
            default_headers={"X-Rampart-Key": edge.key},
            max_retries=0,
        )
        for _ in range(2):
            answer = client.chat.completions.with_raw_response.create(
                model="any", messages=MESSAGES, extra_headers={"X-End-User": user}
            )
            assert answer.headers["x-rampart-variant"] == "large"
        # The model's own key passes through to the model.
        assert edge.large.model.authorizations == ["Bearer sk-model-key"] * 2
    finally:
        edge.stop()


def test_the_responses_api_whole_and_streamed_through_the_proxy(llm_edge: LLMEdge) -> None:
    from routing.models import UnitLLMOutcome

    [small_user] = users_for("chat", "small", 1)
    [large_user] = users_for("chat", "large", 1)
    client = openai.OpenAI(base_url=llm_edge.proxy(), api_key=llm_edge.key, max_retries=0)

    whole = client.responses.with_raw_response.create(
        model="any", input="write one short line", user=small_user, max_output_tokens=8
    )
    assert whole.headers["x-rampart-variant"] == "small"
    response = whole.parse()
    assert response.output_text == "the model answers in short plain words so"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 8)

    stream = client.responses.create(
        model="any",
        input=[{"role": "user", "content": "write one short line"}],
        user=large_user,
        stream=True,
    )
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == TWELVE_TOKENS
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    completed = events[-1].response
    assert completed.usage is not None and completed.usage.output_tokens == 12
    assert completed.output_text == TWELVE_TOKENS

    llm_edge.stop()
    cells = llm_edge.cells()
    small, large = cells["small"], cells["large"]
    # Tokens from the JSON answer's usage and from response.completed, not counted events.
    assert (small.token_requests, small.output_tokens, small.approx_requests) == (1, 8, 0)
    assert (large.token_requests, large.output_tokens, large.approx_requests) == (1, 12, 0)
    # TTFT at the first response.output_text.delta: after the large model's 150 ms TTFT and
    # before the end of the answer (11 more tokens at 100/s).
    assert large.streams == 1 and large.ttft.count == 1
    assert 140 <= large.ttft.quantile(0.5) <= large.ttfb.quantile(0.5) + 250
    # The whole answer has a TTFB (its latency) but no TTFT: nothing was streamed.
    assert (small.streams, small.ttfb.count, small.ttft.count) == (0, 1, 0)
    # Per user, in the windows of its first request (the per-user guardrails' rows).
    rows = {
        row.unit_id: row
        for row in UnitLLMOutcome.objects.filter(experiment_id=llm_edge.experiment_id)
    }
    assert rows[large_user].ttft_count == 1 and rows[large_user].output_tokens_sum == 12
    assert rows[small_user].ttft_count == 0 and rows[small_user].output_tokens_sum == 8
    assert rows[small_user].cost_sum > 0 and rows[small_user].answers_slow == 1
