"""Mergeable per-bucket statistics of generative answers: TTFB, TTFT, chunks, tokens, rate, cost.

The proxy adds one ``LLMRecord`` per answered request to the ``LLMCell`` of its observation
cell (``routing.observe.observations``: experiment, variant, shadow flag, time bucket) and the
cell is stored as JSON text in ``ObservationBucket.llm`` (empty when the bucket saw no such answer).
Like the latency statistics, everything is a count, a sum or a histogram, so cells of the same
arm merge exactly (flushes, edge processes, buckets) and storage grows with time, not traffic.

What each part counts
    * ``ttfb`` (``routing.observe.histogram.LogHistogram``, ms): time from sending the request
      upstream to receiving the answer's head, for every measured answer. For answers relayed
      chunk by chunk (``streams`` of them, with ``chunks`` body chunks in all) the head's
      arrival is stamped; a completion read whole (head and body together, the usual case for
      a non-streamed answer) records its latency (``routing.proxy.streaming.whole_record``).
    * ``ttft`` (ms): time to the first server-sent event that carries content (a non-empty
      ``delta.content`` or ``text`` of a choice, a Responses API ``output_text`` delta, or
      any non-JSON data other than ``[DONE]``), for ``text/event-stream`` answers; an SSE answer
      that arrived whole (head and body at once) counts its latency.
    * tokens: ``token_requests`` answers with token figures, ``input_tokens`` and
      ``output_tokens`` their sums (and the sum of squares of output tokens, for the mean
      guardrail). Figures come from the answer's ``usage`` (JSON answer, or the final SSE chunk
      when the caller asked for ``stream_options.include_usage``); without one, the output
      tokens are the number of content events, input tokens 0, and the answer is also
      counted in ``approx_requests``: an approximation (providers often put several tokens in
      one event).
    * ``rate``: output tokens per second of each answer, output tokens over the request's whole
      duration (LLMPerf's "request output throughput"), as n, sum, sum of squares: the metric
      is the mean of the per-request rates.
    * ``cost``: input tokens × input price + output tokens × output price (per million tokens,
      the variant's prices), for answers with token figures of variants that have prices.

JSON format (compact)::

    {"v":1,"sn":2,"ch":31,"tb":{...},"tt":{...},"tn":2,"ta":0,"ti":40,"to":30.0,"to2":450.0,
     "rn":2,"rs":301.2,"rq":45400.1,"cn":2,"cs":0.0012,"cq":7.2e-07}

``tb``/``tt`` are ``LogHistogram.to_json()`` objects (absent when empty).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from routing.observe.histogram import LogHistogram

FORMAT_VERSION = 1


@dataclass(slots=True)
class LLMRecord:
    """What the proxy measured of one answer (None: not measured)."""

    duration_ms: float
    ttfb_ms: float | None = None
    ttft_ms: float | None = None
    chunks: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    approximate: bool = False
    cost: float | None = None
    streamed: bool = False


class LLMCell:
    """Sums and histograms of the ``LLMRecord``s of one observation cell."""

    __slots__ = (
        "approx_requests",
        "chunks",
        "cost_n",
        "cost_sq",
        "cost_sum",
        "input_tokens",
        "output_sq",
        "output_tokens",
        "rate_n",
        "rate_sq",
        "rate_sum",
        "streams",
        "token_requests",
        "ttfb",
        "ttft",
    )

    def __init__(self) -> None:
        self.ttfb = LogHistogram()
        self.ttft = LogHistogram()
        self.streams = 0
        self.chunks = 0
        self.token_requests = 0
        self.approx_requests = 0
        self.input_tokens = 0
        self.output_tokens = 0.0
        self.output_sq = 0.0
        self.rate_n = 0
        self.rate_sum = 0.0
        self.rate_sq = 0.0
        self.cost_n = 0
        self.cost_sum = 0.0
        self.cost_sq = 0.0

    def add(self, record: LLMRecord) -> None:
        if record.ttfb_ms is not None:
            self.ttfb.add(record.ttfb_ms)
        if record.streamed:
            self.streams += 1
            self.chunks += record.chunks
        if record.ttft_ms is not None:
            self.ttft.add(record.ttft_ms)
        output = record.output_tokens
        if output is None:
            return
        self.token_requests += 1
        if record.approximate:
            self.approx_requests += 1
        self.input_tokens += record.input_tokens or 0
        self.output_tokens += output
        self.output_sq += output * output
        if record.duration_ms > 0:
            rate = output * 1000.0 / record.duration_ms
            self.rate_n += 1
            self.rate_sum += rate
            self.rate_sq += rate * rate
        cost = record.cost
        if cost is not None and math.isfinite(cost):
            self.cost_n += 1
            self.cost_sum += cost
            self.cost_sq += cost * cost

    def merge(self, other: LLMCell) -> None:
        self.ttfb.merge(other.ttfb)
        self.ttft.merge(other.ttft)
        self.streams += other.streams
        self.chunks += other.chunks
        self.token_requests += other.token_requests
        self.approx_requests += other.approx_requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.output_sq += other.output_sq
        self.rate_n += other.rate_n
        self.rate_sum += other.rate_sum
        self.rate_sq += other.rate_sq
        self.cost_n += other.cost_n
        self.cost_sum += other.cost_sum
        self.cost_sq += other.cost_sq

    @property
    def empty(self) -> bool:
        return not (self.ttfb.count or self.ttft.count or self.token_requests)

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "sn": self.streams,
            "ch": self.chunks,
            "tn": self.token_requests,
            "ta": self.approx_requests,
            "ti": self.input_tokens,
            "to": self.output_tokens,
            "to2": self.output_sq,
            "rn": self.rate_n,
            "rs": self.rate_sum,
            "rq": self.rate_sq,
            "cn": self.cost_n,
            "cs": self.cost_sum,
            "cq": self.cost_sq,
        }
        if self.ttfb.count:
            data["tb"] = json.loads(self.ttfb.to_json())
        if self.ttft.count:
            data["tt"] = json.loads(self.ttft.to_json())
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LLMCell:
        data = json.loads(text)
        if data.get("v") != FORMAT_VERSION:
            raise ValueError(f"unknown LLM statistics format: {data.get('v')!r}")
        cell = cls()
        if "tb" in data:
            cell.ttfb = LogHistogram.from_json(json.dumps(data["tb"]))
        if "tt" in data:
            cell.ttft = LogHistogram.from_json(json.dumps(data["tt"]))
        cell.streams = int(data["sn"])
        cell.chunks = int(data["ch"])
        cell.token_requests = int(data["tn"])
        cell.approx_requests = int(data["ta"])
        cell.input_tokens = int(data["ti"])
        cell.output_tokens = float(data["to"])
        cell.output_sq = float(data["to2"])
        cell.rate_n = int(data["rn"])
        cell.rate_sum = float(data["rs"])
        cell.rate_sq = float(data["rq"])
        cell.cost_n = int(data["cn"])
        cell.cost_sum = float(data["cs"])
        cell.cost_sq = float(data["cq"])
        return cell
