"""The stand-in LLM's Responses API answers (``POST /v1/responses``), whole or as SSE events.

Shapes follow OpenAI's API reference for the Responses API: a whole answer is a ``response``
object whose ``output`` holds one assistant ``message`` with one ``output_text`` part and whose
``usage`` has ``input_tokens`` / ``output_tokens``; a streamed one is a sequence of typed
server-sent events (``event: <type>`` and ``data: {"type": <type>, ...}``):
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per token,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``
and ``response.completed``, which carries the whole response with its ``usage``. There is no
``[DONE]`` line: the stream ends with the connection's last chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson


def input_tokens(body: dict[str, Any]) -> int:
    """Words of ``instructions`` and ``input`` (a string, or messages with text parts)."""
    texts: list[str] = []
    if isinstance(body.get("instructions"), str):
        texts.append(body["instructions"])
    given = body.get("input")
    if isinstance(given, str):
        texts.append(given)
    elif isinstance(given, list):
        for item in given:
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
    return max(1, sum(len(text.split()) for text in texts))


def sse(kind: str, payload: dict[str, Any]) -> bytes:
    """One typed server-sent event."""
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps({"type": kind, **payload}))


class ResponsesAnswer:
    """One Responses API answer of ``output_tokens`` tokens (``token(i)`` gives the text)."""

    chat = False

    def __init__(
        self, model: str, prompt_tokens: int, output_tokens: int, token: Callable[[int], str]
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.token = token
        stamp = f"{model}-{time.time_ns():x}"
        self.id, self.item_id = f"resp_{stamp}", f"msg_{stamp}"
        self.created = int(time.time())
        self._sequence = 0

    def text(self) -> str:
        return "".join(self.token(i) for i in range(self.output_tokens))

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [_part(text)]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def whole(self, *, status: str = "completed") -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": self.model,
            "output": [self._message("completed", self.text())] if done else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": self.usage() if done else None,
            "metadata": {},
        }

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + self.output_tokens,
        }

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        self._sequence += 1
        return sse(kind, {**payload, "sequence_number": self._sequence - 1})

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[bytes]:
        """The events before the first token."""
        started = self.whole(status="in_progress")
        return [
            self._event("response.created", {"response": started}),
            self._event("response.in_progress", {"response": started}),
            self._event(
                "response.output_item.added",
                {"output_index": 0, "item": self._message("in_progress", None)},
            ),
            self._event("response.content_part.added", {**self._at(), "part": _part("")}),
        ]

    def token_event(self, index: int) -> bytes:
        return self._event(
            "response.output_text.delta", {**self._at(), "delta": self.token(index), "logprobs": []}
        )

    def closing(self, include_usage: bool) -> list[bytes]:
        """The events after the last token (the usage is always in ``response.completed``)."""
        text = self.text()
        return [
            self._event("response.output_text.done", {**self._at(), "text": text, "logprobs": []}),
            self._event("response.content_part.done", {**self._at(), "part": _part(text)}),
            self._event(
                "response.output_item.done",
                {"output_index": 0, "item": self._message("completed", text)},
            ),
            self._event("response.completed", {"response": self.whole()}),
        ]


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}
