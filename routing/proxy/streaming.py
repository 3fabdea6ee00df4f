"""Measuring answers as the proxy relays them: first byte, first token, chunks, tokens and cost.

Streamed answers (no Content-Length, or larger than the proxy reads whole) are forwarded
chunk by chunk as they arrive: each chunk the upstream connection yields is sent to the client
before the next is read, with no buffering in between. A ``StreamMeter`` watches them pass:
it notes when the head arrived (TTFB), counts the chunks and, for ``text/event-stream``
answers, splits the events (lines ``data: ...`` ended by a blank line, RFC 8895 / WHATWG
"server-sent events") to stamp the first event that carries content (TTFT) and, on
completion paths, to count content events and read the final chunk's ``usage``
(``routing.proxy.llm_usage``). What it records goes to ``routing.observe.llm_stats`` (format and
meaning there).

Cost on the hot path: nothing for answers read whole outside completion paths; a JSON parse of
the body for completions read whole; per streamed chunk one ``perf_counter`` and, for event
streams, a split and one small JSON parse per event.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

import orjson

from routing.observe.llm_stats import LLMRecord
from routing.proxy.attempt import Attempt
from routing.proxy.llm_usage import (
    carries_content,
    cost_of,
    is_event_stream,
    is_llm_target,
    usage_of,
    usage_of_json,
)

__all__ = ["StreamMeter", "answer_record", "is_event_stream", "is_llm_target", "whole_record"]

# An event longer than this without its blank line ends the parsing (the relay goes on).
MAX_EVENT_BYTES: Final = 1024 * 1024


class StreamMeter:
    """What one streamed answer looked like on its way through the proxy."""

    __slots__ = (
        "_tail",
        "chunks",
        "content_events",
        "llm",
        "sse",
        "started",
        "ttfb_ms",
        "ttft_ms",
        "usage",
    )

    def __init__(self, started: float, *, sse: bool, llm: bool) -> None:
        self.started = started
        self.ttfb_ms = (time.perf_counter() - started) * 1000.0
        self.sse = sse
        self.llm = llm
        self.ttft_ms: float | None = None
        self.chunks = 0
        self.content_events = 0
        self.usage: tuple[int, int] | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Note one chunk of the body (call before forwarding it)."""
        self.chunks += 1
        if not self.sse:
            return
        if self.ttft_ms is not None and not self.llm:
            return
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self._tail = events.pop()
        if len(self._tail) > MAX_EVENT_BYTES:
            self.sse = False
            self._tail = b""
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return
        payload = b"\n".join(line[1:] if line[:1] == b" " else line for line in lines)
        if not payload or payload == b"[DONE]":
            return
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if carries_content(data):
            self.content_events += 1
            if self.ttft_ms is None:
                self.ttft_ms = (time.perf_counter() - self.started) * 1000.0
        if self.llm:
            usage = usage_of(data)
            if usage is not None:
                self.usage = usage

    def record(self, duration_ms: float, prices: tuple[float, float] | None) -> LLMRecord:
        """The answer's record once it has been relayed whole in ``duration_ms``."""
        record = LLMRecord(
            duration_ms=duration_ms,
            ttfb_ms=self.ttfb_ms,
            ttft_ms=self.ttft_ms,
            chunks=self.chunks,
            streamed=True,
        )
        if self.llm:
            _tokens(record, self.usage, self.content_events if self.sse else None, prices)
        return record


def answer_record(
    meter: StreamMeter | None, attempt: Attempt, prices: tuple[float, float] | None
) -> LLMRecord:
    """The record of an answer sent whole: relayed by ``meter``, or read whole (a completion)."""
    duration_ms = attempt.latency_ms or 0.0
    if meter is not None:
        return meter.record(duration_ms, prices)
    return whole_record(attempt.body or b"", attempt.headers, duration_ms, prices)


def whole_record(
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    duration_ms: float,
    prices: tuple[float, float] | None,
) -> LLMRecord:
    """The record of a completion answer read whole (JSON, or an event stream that came at once).

    Its TTFB is its latency: the upstream client reads the head and a body that came with it
    in one step (the usual case: a model server sends a non-streamed answer's head once the
    answer is ready), so the head's arrival is not stamped separately; for a body that came
    later the figure exceeds the true TTFB by the body's transfer time.
    """
    record = LLMRecord(duration_ms=duration_ms, ttfb_ms=duration_ms)
    if is_event_stream(headers):
        meter = StreamMeter(time.perf_counter(), sse=True, llm=True)
        meter.feed(body if body.endswith(b"\n\n") else body + b"\n\n")
        if meter.ttft_ms is not None:
            # Head and body came together: the first token arrived with the whole answer.
            record.ttft_ms = duration_ms
        _tokens(record, meter.usage, meter.content_events, prices)
    else:
        _tokens(record, usage_of_json(body), None, prices)
    return record


def _tokens(
    record: LLMRecord,
    usage: tuple[int, int] | None,
    content_events: int | None,
    prices: tuple[float, float] | None,
) -> None:
    if usage is not None:
        record.input_tokens, record.output_tokens = usage
    elif content_events:
        # No usage in the stream: one token per content event, flagged as an approximation.
        record.input_tokens, record.output_tokens = 0, content_events
        record.approximate = True
    else:
        return
    record.cost = cost_of(record.input_tokens, record.output_tokens, prices)
