"""An OpenAI-compatible stand-in for one LLM version (plain ASGI on uvicorn): tests, demo.

It serves ``POST /v1/chat/completions`` and ``POST /v1/completions`` the way OpenAI's API does,
as one JSON answer or, with ``"stream": true``, as server-sent events (``data: {chunk}``
lines, then ``data: [DONE]``), ``POST /v1/responses`` (the Responses API: a ``response``
object, or typed events from ``response.created`` to ``response.completed`` with the usage;
``scripts.llm_responses``), and ``GET /v1/models``. Timing is configurable:

* time to first token (``ttft_ms``; with ``ttft_sigma`` > 0 it is drawn from
  LogNormal(ln(ttft_ms), ttft_sigma), so TTFT has a right tail);
* output tokens per second (``tokens_per_s``) after the first token;
* output tokens per answer (``output_tokens``, or the request's ``max_tokens`` /
  ``max_completion_tokens`` when smaller).

A streamed chat answer starts like OpenAI's: a first chunk with the assistant role and empty
content, then one chunk per token, a chunk with ``finish_reason``, and with
``stream_options.include_usage`` a last chunk with empty ``choices`` and the ``usage``. Input
tokens are the whitespace-separated words of the prompt or messages (a stand-in has no
tokenizer; what matters is that the proxy reads the figures the server reports).

Per request, headers override the configuration: ``x-llm-ttft-ms``, ``x-llm-tokens-per-s``,
``x-llm-output-tokens``, ``x-llm-status``. Counters (``requests``, ``completed``,
``disconnects``) let tests compare the proxy's records with what happened.

``python -m scripts.llm_server --name small --port 9201 --ttft-ms 80 --tokens-per-s 200``
runs one in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import time
from typing import Any

import orjson
import uvicorn

from scripts.llm_responses import ResponsesAnswer, input_tokens

Scope = dict[str, Any]

_WORDS = [
    "the",
    "model",
    "answers",
    "in",
    "short",
    "plain",
    "words",
    "so",
    "that",
    "every",
    "token",
    "is",
    "one",
    "word",
    "of",
    "text",
    "and",
    "the",
    "proxy",
    "can",
    "count",
    "what",
    "it",
    "forwards",
]


class LLMServer:
    """One LLM version answering OpenAI-style completions with configurable timing."""

    def __init__(
        self,
        *,
        name: str = "llm",
        ttft_ms: float = 0.0,
        tokens_per_s: float = 1000.0,
        output_tokens: int = 16,
        ttft_sigma: float = 0.0,
        status: int = 200,
        seed: int | None = None,
    ) -> None:
        if ttft_ms < 0 or tokens_per_s <= 0 or output_tokens < 1 or ttft_sigma < 0:
            raise ValueError(
                "ttft_ms >= 0, tokens_per_s > 0, output_tokens >= 1, ttft_sigma >= 0 required"
            )
        self.name = name
        self.ttft_ms = ttft_ms
        self.tokens_per_s = tokens_per_s
        self.output_tokens = output_tokens
        self.ttft_sigma = ttft_sigma
        self.status = status
        self.random = random.Random(seed)
        self.requests = 0
        self.completed = 0
        self.disconnects = 0
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []

    def reset_counts(self) -> None:
        self.requests = self.completed = self.disconnects = 0
        self.bodies = []
        self.authorizations = []

    # ----------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        path: str = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [_model(self.name)]})
            self.completed += 1
            return
        chat = path.endswith("/chat/completions")
        responses = path.endswith("/responses")
        if scope["method"] != "POST" or not (chat or responses or path.endswith("/completions")):
            await _json(send, 404, _error(f"no route {scope['method']} {path}", "not_found"))
            return
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            await _json(send, 400, _error("the body is not a JSON object", "invalid_request"))
            return
        self.bodies.append(body)
        self.authorizations.append(headers.get("authorization"))
        status = int(headers.get("x-llm-status", self.status))
        if status >= 400:
            await _json(send, status, _error(f"{self.name} refused the request", "server_error"))
            self.completed += 1
            return
        ttft_s = self._ttft_s(headers)
        tokens_per_s = float(headers.get("x-llm-tokens-per-s", self.tokens_per_s))
        limit = (
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or body.get("max_output_tokens")
        )
        count = int(headers.get("x-llm-output-tokens", self.output_tokens))
        if isinstance(limit, int) and 0 < limit < count:
            count = limit
        answer: Answer | ResponsesAnswer
        if responses:
            answer = ResponsesAnswer(self.name, input_tokens(body), count, _token)
        else:
            answer = Answer(self.name, chat, _prompt_tokens(body, chat), count)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            finished = await self._stream(send, receive, answer, ttft_s, tokens_per_s, usage)
        else:
            finished = await _sleep_unless_disconnected(
                ttft_s + (count - 1) / tokens_per_s, receive
            )
            if finished:
                await _json(send, 200, answer.whole())
        if finished:
            self.completed += 1
        else:
            self.disconnects += 1

    def _ttft_s(self, headers: dict[str, str]) -> float:
        if "x-llm-ttft-ms" in headers:
            return float(headers["x-llm-ttft-ms"]) / 1000.0
        if self.ttft_sigma > 0 and self.ttft_ms > 0:
            return self.random.lognormvariate(math.log(self.ttft_ms), self.ttft_sigma) / 1000.0
        return self.ttft_ms / 1000.0

    async def _stream(
        self,
        send: Any,
        receive: Any,
        answer: Answer,
        ttft_s: float,
        tokens_per_s: float,
        include_usage: bool,
    ) -> bool:
        """Send the answer as SSE, one token per event; False if the client hung up."""
        sse = b"text/event-stream; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", sse),
                    (b"cache-control", b"no-cache"),
                    (b"x-model", self.name.encode()),
                ],
            }
        )
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            for event in answer.opening():
                await _send(send, event)
            started = time.perf_counter()
            for index in range(answer.output_tokens):
                # Token i is due at TTFT + i / rate after the start: no drift from send times.
                due = started + ttft_s + index / tokens_per_s
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.wait({gone}, timeout=wait)
                if gone.done():
                    return False
                await _send(send, answer.token_event(index))
            for event in answer.closing(include_usage):
                await _send(send, event)
            await send({"type": "http.response.body", "body": b""})
            return True
        except OSError:  # uvicorn's ClientDisconnected: the client left between two checks
            return False
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone

    # ----------------------------------------------------------------- running

    def run(self, *, port: int, host: str = "127.0.0.1", loop: str = "uvloop") -> None:
        uvicorn.run(
            self,
            host=host,
            port=port,
            loop=loop,
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
        )


class Answer:
    """The pieces of one completion, chat or text, whole or as stream chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, output_tokens: int) -> None:
        self.model = model
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{model}-{time.time_ns():x}"
        self.created = int(time.time())

    def token(self, index: int) -> str:
        return _token(index)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.prompt_tokens + self.output_tokens,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self) -> dict[str, Any]:
        text = "".join(self.token(i) for i in range(self.output_tokens))
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage()}

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def opening(self) -> list[bytes]:
        """The events before the first token: a chat answer's role chunk."""
        return [_data(self._chunk({"role": "assistant", "content": ""}, None))] if self.chat else []

    def token_event(self, index: int) -> bytes:
        text = self.token(index)
        return _data(self._chunk({"content": text} if self.chat else text, None))

    def closing(self, include_usage: bool) -> list[bytes]:
        """The finish chunk, the usage chunk if asked for, and ``[DONE]``."""
        events = [_data(self._chunk({} if self.chat else "", "stop"))]
        if include_usage:
            head = self._head("chat.completion.chunk" if self.chat else "text_completion")
            events.append(_data({**head, "choices": [], "usage": self.usage()}))
        return [*events, b"data: [DONE]\n\n"]


def _token(index: int) -> str:
    word = _WORDS[index % len(_WORDS)]
    return word if index == 0 else f" {word}"


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """Words of the prompt (completions) or of the messages' text (chat), at least 1."""
    texts: list[str] = []
    if chat:
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            texts.append(prompt)
        elif isinstance(prompt, list):
            texts.extend(p for p in prompt if isinstance(p, str))
    return max(1, sum(len(text.split()) for text in texts))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "rampart-stand-in"}


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % orjson.dumps(chunk)


async def _send(send: Any, event: bytes) -> None:
    await send({"type": "http.response.body", "body": event, "more_body": True})


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sleep_unless_disconnected(delay_s: float, receive: Any) -> bool:
    """Wait ``delay_s``; False if the client hung up first."""
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({gone}, timeout=max(delay_s, 0.0))
        return not done
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one OpenAI-compatible stand-in LLM.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--ttft-sigma", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=200.0)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    LLMServer(
        name=args.name,
        ttft_ms=args.ttft_ms,
        ttft_sigma=args.ttft_sigma,
        tokens_per_s=args.tokens_per_s,
        output_tokens=args.output_tokens,
        seed=args.seed,
    ).run(port=args.port)


if __name__ == "__main__":
    main()
