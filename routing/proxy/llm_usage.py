"""Reading OpenAI-compatible answers: which requests are completions, content events, usage, cost.

The proxy reads token figures only on completion paths (``is_llm_target``: chat completions,
text completions and the Responses API), so other inference traffic pays one substring test.
Shapes read (OpenAI API reference):

* chat completions: ``usage.prompt_tokens`` / ``usage.completion_tokens``; streamed chunks
  carry ``choices[i].delta.content``, and with ``stream_options.include_usage`` a last chunk
  with empty ``choices`` and the ``usage``;
* text completions: the same usage, ``choices[i].text`` in chunks;
* Responses API: ``usage.input_tokens`` / ``usage.output_tokens`` (in the answer, or in the
  ``response`` of the streamed ``response.completed`` event); ``response.output_text.delta``
  events carry content.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, TypeGuard

import orjson

_LLM_PATHS: Final = ("/completions", "/responses")


def is_llm_target(target: str) -> bool:
    """Whether a forwarded path (with its query) is an OpenAI-style completion endpoint."""
    if "/completions" not in target and "/responses" not in target:
        return False
    path = target.partition("?")[0].rstrip("/")
    return path.endswith(_LLM_PATHS)


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's headers say ``Content-Type: text/event-stream``."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value[:17].lower() == b"text/event-stream"
    return False


def usage_of(data: Any) -> tuple[int, int] | None:
    """(input tokens, output tokens) of an answer or chunk object, or None if it has none."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        response = data.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    output = usage.get("completion_tokens", usage.get("output_tokens"))
    if not (_count(prompt) and _count(output)):
        return None
    return prompt, output


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def carries_content(data: Any) -> bool:
    """Whether a decoded SSE data object carries generated content (text of some choice)."""
    if not isinstance(data, dict):
        return True
    choices = data.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
                return True
            if choice.get("text"):
                return True
        return False
    kind = data.get("type")
    if isinstance(kind, str):
        return kind.endswith(".delta") and bool(data.get("delta"))
    return "usage" not in data


def usage_of_json(body: bytes) -> tuple[int, int] | None:
    """The usage of a whole JSON answer, or None (not JSON, or no usage)."""
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def cost_of(
    input_tokens: int, output_tokens: int, prices: tuple[float, float] | None
) -> float | None:
    """The cost of one answer at (input, output) prices per million tokens, or None."""
    if prices is None:
        return None
    return (input_tokens * prices[0] + output_tokens * prices[1]) / 1_000_000.0
