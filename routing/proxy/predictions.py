"""Request ids and predictions of proxied answers, for experiments with quality tracking on.

Every answer of such an experiment carries ``X-Rampart-Request-Id``: the caller's own id
when the request has one in the experiment's ``quality_request_id_header``, else one the
proxy makes (a random per-process prefix and a counter: unique without a system call). The
application sends the true outcome later with that id (``POST /v1/labels``).

A sampled request (``quality_sample_rate``; only units in the experiment, with a unit id)
has its prediction read from a successful (2xx) answer at ``quality_prediction_path``
(``experiments.prediction_path``) and recorded with its request id, arm, unit and time by
``routing.observe.predictions.PredictionRecorder``, off the hot path. Reading costs one
``orjson.loads`` of the answer. An answer that is not JSON, lacks the path or holds a
value of the wrong kind is recorded with that status and counted: never an error for the
user, whose answer is passed on unchanged. Answers streamed in chunks (over 1 MiB, or
without a length) are counted as ``streamed`` and not read. Control's answer to a fallback
is not recorded: it is not the assigned arm's prediction. A shadow's answer to a sampled
request that control answered is recorded too, under the shadow's key and the same request
id (``shadow_answer``), so the shadow's quality can be compared with control's on the same
requests when the label arrives (``analysis.shadow_quality``).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
import zlib
from collections.abc import Sequence
from typing import Any, Final

import orjson

from experiments.contracts import ExperimentView
from experiments.prediction_path import MISSING, PathStep, parse_prediction_path, read_path
from routing.observe.predictions import PredictionRecorder
from routing.proxy.headers import content_encoding

REQUEST_ID_HEADER: Final = b"x-rampart-request-id"
MAX_REQUEST_ID_LENGTH: Final = 128
# A score vector longer than this is refused (wrong_type): no classifier has that many classes
# worth a quality guardrail, and the row would be large.
MAX_SCORES: Final = 1_000

STATUS_OK: Final = "ok"
STATUS_NOT_JSON: Final = "not_json"
STATUS_MISSING: Final = "missing"
STATUS_WRONG_TYPE: Final = "wrong_type"
STATUS_STREAMED: Final = "streamed"

_PREFIX: Final = os.urandom(6).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique across processes (48 random bits per process) and requests.

    The counter has eight hex digits at least, so one process's ids sort in the order it
    made them: each new prediction row then goes to the end of the request-id index
    instead of somewhere inside it (unpadded, "…-10" sorts before "…-f").
    """
    return f"{_PREFIX}-{next(_counter):08x}"


class QualityPlan:
    """One experiment's quality settings, compiled for the proxy (``Plan.quality``)."""

    __slots__ = ("experiment_id", "header", "kind", "rate", "steps")

    def __init__(
        self,
        *,
        experiment_id: int,
        steps: tuple[PathStep, ...],
        kind: str,
        header: bytes,
        rate: float,
    ) -> None:
        self.experiment_id = experiment_id
        self.steps = steps
        self.kind = kind
        self.header = header
        self.rate = rate

    def ticket(
        self, headers: list[tuple[bytes, bytes]], unit: str | None, in_experiment: bool
    ) -> Ticket:
        """The request's id (the caller's, if valid, else a new one) and whether it is sampled."""
        request_id = None
        wanted = self.header
        if wanted:
            for name, value in headers:
                if name == wanted:
                    if 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii():
                        text = value.decode("ascii").strip()
                        if text and "\x00" not in text:
                            request_id = text
                    break
        if request_id is None:
            request_id = new_request_id()
        rate = self.rate
        sampled = (
            in_experiment
            and unit is not None
            and rate > 0.0
            and (rate >= 1.0 or random.random() < rate)
        )
        return Ticket(self, request_id, unit if sampled else None)


class Ticket:
    """One request's quality bookkeeping: its id, and its unit when it is sampled."""

    __slots__ = ("header", "plan", "request_id", "unit")

    def __init__(self, plan: QualityPlan, request_id: str, unit: str | None) -> None:
        self.plan = plan
        self.request_id = request_id
        self.header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        # None: not sampled, the prediction is not read.
        self.unit = unit


def quality_plan(view: ExperimentView) -> QualityPlan | None:
    """The compiled quality settings of ``view``, or None when tracking is off."""
    quality = view.quality
    if quality is None:
        return None
    return QualityPlan(
        experiment_id=view.id,
        steps=parse_prediction_path(quality.prediction_path),
        kind=quality.prediction_kind,
        header=quality.request_id_header.lower().encode("latin-1"),
        rate=quality.sample_rate,
    )


def read_prediction(
    body: bytes, steps: tuple[PathStep, ...], kind: str, encoding: bytes = b""
) -> tuple[str, str]:
    """(status, prediction as JSON text) of one answer body; the text is "" unless ok."""
    try:
        if encoding:
            if encoding in (b"gzip", b"x-gzip"):
                body = zlib.decompress(body, wbits=31)
            elif encoding == b"deflate":
                body = zlib.decompress(body)
            else:
                return STATUS_NOT_JSON, ""
        data = orjson.loads(body)
    except (orjson.JSONDecodeError, zlib.error):
        return STATUS_NOT_JSON, ""
    value = read_path(data, steps)
    if value is MISSING:
        return STATUS_MISSING, ""
    if not _fits(value, kind):
        return STATUS_WRONG_TYPE, ""
    return STATUS_OK, orjson.dumps(value).decode()


def _fits(value: Any, kind: str) -> bool:
    kind_of = type(value)
    if kind == "class":
        return kind_of is str or kind_of is int or kind_of is bool
    if kind == "number":
        return kind_of is int or (kind_of is float and math.isfinite(value))
    # scores: a vector of finite numbers, or one probability (of the class 1 of two)
    if kind_of is float or kind_of is int:
        return 0.0 <= value <= 1.0
    if kind_of is not list or not 0 < len(value) <= MAX_SCORES:
        return False
    return all((type(item) is float and math.isfinite(item)) or type(item) is int for item in value)


class ProxyPredictions:
    """The proxy's part: request-id headers on answers, and predictions to the recorder."""

    def __init__(self, recorder: PredictionRecorder | None = None) -> None:
        self.recorder = recorder or PredictionRecorder()

    async def start(self) -> None:
        await self.recorder.start()

    async def stop(self) -> None:
        await self.recorder.stop()

    def shadow_answer(
        self,
        ticket: Ticket,
        shadow_key: str,
        status: int,
        body: bytes,
        upstream_headers: Sequence[tuple[bytes, bytes]],
    ) -> None:
        """Record a shadow's prediction for a sampled request (off the user's path)."""
        unit = ticket.unit
        if unit is None or not 200 <= status < 300:
            return
        plan = ticket.plan
        outcome, value = read_prediction(
            body, plan.steps, plan.kind, content_encoding(upstream_headers)
        )
        self.recorder.record(
            (
                plan.experiment_id,
                ticket.request_id,
                shadow_key,
                unit,
                time.time(),
                plan.kind,
                outcome,
                value,
            )
        )

    def answer(
        self,
        ticket: Ticket,
        arm_key: str,
        status: int,
        body: bytes | None,
        upstream_headers: Sequence[tuple[bytes, bytes]],
        response_headers: list[tuple[bytes, bytes]],
        *,
        fallback: bool = False,
    ) -> None:
        """Add the request id to ``response_headers``; record the prediction if sampled."""
        response_headers.append(ticket.header)
        unit = ticket.unit
        if unit is None or fallback or not 200 <= status < 300:
            return
        plan = ticket.plan
        if body is None:
            self.recorder.count(STATUS_STREAMED)
            return
        outcome, value = read_prediction(
            body, plan.steps, plan.kind, content_encoding(upstream_headers)
        )
        self.recorder.record(
            (
                plan.experiment_id,
                ticket.request_id,
                arm_key,
                unit,
                time.time(),
                plan.kind,
                outcome,
                value,
            )
        )
