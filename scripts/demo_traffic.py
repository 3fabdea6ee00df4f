"""Simulated users for `make demo`: predictions through the proxy, purchases to the events API.

Visits arrive as a Poisson process at ``rate`` per second. A quarter of them come from
returning users (drawn from the last few thousand), the rest from new ones. Each visit makes
one to three predictions through ``POST /proxy/<experiment>/predict`` (with ``llm``, streamed
chat completions through ``/proxy/<experiment>/v1/chat/completions``) with the user id in
``X-Rampart-Unit`` and reads which version answered (``X-Rampart-Variant``). A new user
buys with the probability of the version that served the first visit (one decision per user,
so that users exposed early, who return more often, do not convert more for that reason
alone): a ``purchase`` and a ``revenue`` event, sent in batches to ``POST /v1/events`` as an
application would. Everything goes through the public edge APIs
with an API key; nothing is written to the database directly.

With ``digits`` (the quality scenarios), each prediction sends a held-out digit image
(``{"features": [64 numbers]}``) to a real classifier, and the true digit is sent
``label_delay_s`` later to ``POST /v1/labels`` with the answer's ``X-Rampart-Request-Id``,
as an application learns the truth after the fact.

Stickiness is recorded as the users see it: a returning user may move from control to the
canary when the ramp widens, and back to control only once the canary was rolled back; the
demo checks the times of those moves against the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

RETURNING_SHARE = 0.25
RETURNING_POOL = 5000
EVENT_FLUSH_S = 0.5
MAX_IN_FLIGHT = 256
QUESTIONS = (
    "Which running shoes suit a beginner?",
    "Suggest a gift for someone who likes hiking and photography",
    "Compare these two laptops for video editing on a budget",
    "What should I pack for a weekend by the sea?",
)


@dataclass
class Served:
    """One prediction as the user saw it."""

    at: float
    variant: str
    status: int


@dataclass
class TrafficStats:
    requests: int = 0
    failed: int = 0
    users: int = 0
    returning: int = 0
    conversions: int = 0
    events_sent: int = 0
    event_batches_failed: int = 0
    labels_sent: int = 0
    label_batches_failed: int = 0
    by_variant: Counter[str] = field(default_factory=Counter)
    status_codes: Counter[int] = field(default_factory=Counter)
    # Returning users whose version changed: control -> canary (the ramp widened), canary ->
    # control (wall-clock times: allowed only once the experiment stopped), anything else.
    to_canary: int = 0
    to_control_at: list[float] = field(default_factory=list)
    other_switches: int = 0
    recent: deque[Served] = field(default_factory=lambda: deque(maxlen=200_000))


class SimulatedUsers:
    """Drives the proxy and the events API until ``stop`` is set."""

    def __init__(
        self,
        *,
        base_url: str,
        experiment: str,
        api_key: str,
        rate: float,
        conversion: Mapping[str, float],
        control: str,
        seed: int = 7,
        digits: tuple[Any, Any] | None = None,
        label_delay_s: float = 2.0,
        llm: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.experiment = experiment
        self.api_key = api_key
        self.rate = rate
        self.conversion = dict(conversion)
        self.control = control
        self.random = random.Random(seed)
        self.stats = TrafficStats()
        self.last_variant: dict[str, str] = {}
        self.pool: deque[str] = deque(maxlen=RETURNING_POOL)
        self._events: list[dict[str, Any]] = []
        self._next_user = 0
        self.digits = digits
        self.label_delay_s = label_delay_s
        # (due at, monotonic; label) of answers whose truth is not sent yet.
        self._labels: deque[tuple[float, dict[str, Any]]] = deque()
        # LLM traffic: streamed chat completions with the user in the OpenAI "user" field.
        self.llm = llm
        self._first_served: Counter[str] = Counter()
        self._converted: Counter[str] = Counter()

    def conversion_rates(self) -> dict[str, float]:
        """Share of new users who bought, by the version that served their first visit."""
        return {
            variant: self._converted[variant] / users
            for variant, users in self._first_served.items()
            if users
        }

    def served_since(self, since: float) -> Counter[str]:
        """Versions that answered predictions sent at or after ``since`` (monotonic time)."""
        return Counter(s.variant for s in self.stats.recent if s.at >= since)

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=15)
        headers = {"X-Rampart-Key": self.api_key}
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers
        ) as session:
            flusher = asyncio.create_task(self._flush_events(session, stop))
            in_flight: set[asyncio.Task[None]] = set()
            gate = asyncio.Semaphore(MAX_IN_FLIGHT)
            next_arrival = time.monotonic()
            while not stop.is_set():
                next_arrival += self.random.expovariate(self.rate)
                delay = next_arrival - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                await gate.acquire()
                task = asyncio.create_task(self._visit(session, *self._pick_user()))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                task.add_done_callback(lambda _: gate.release())
            if in_flight:
                await asyncio.wait(in_flight, timeout=15)
            await flusher

    def _pick_user(self) -> tuple[str, bool]:
        """A user id, and whether this is the user's first visit."""
        if self.pool and self.random.random() < RETURNING_SHARE:
            self.stats.returning += 1
            return self.pool[self.random.randrange(len(self.pool))], False
        self._next_user += 1
        user = f"user-{self._next_user:06d}"
        self.pool.append(user)
        self.stats.users += 1
        return user, True

    async def _visit(self, session: aiohttp.ClientSession, user: str, first: bool) -> None:
        variant = None
        for _ in range(self.random.randint(1, 3)):
            truth = None
            if self.digits is not None:
                features, labels = self.digits
                row = self.random.randrange(len(labels))
                truth = int(labels[row])
                path = "predict"
                body = orjson.dumps({"features": [float(x) for x in features[row]]})
            else:
                path, body = self._request(user)
            try:
                async with session.post(
                    f"{self.base_url}/proxy/{self.experiment}/{path}",
                    data=body,
                    headers={"X-Rampart-Unit": user, "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    status = response.status
                    variant = response.headers.get("X-Rampart-Variant", "")
                    request_id = response.headers.get("X-Rampart-Request-Id")
            except (aiohttp.ClientError, TimeoutError):
                self.stats.failed += 1
                return
            self.stats.requests += 1
            self.stats.status_codes[status] += 1
            self.stats.by_variant[variant] += 1
            self.stats.recent.append(Served(time.monotonic(), variant, status))
            self._check_sticky(user, variant)
            if truth is not None and request_id and status == 200:
                label = {"request_id": request_id, "label": truth, "timestamp": time.time()}
                self._labels.append((time.monotonic() + self.label_delay_s, label))
            await asyncio.sleep(self.random.uniform(0.05, 0.3))
        if first and variant:
            self._first_served[variant] += 1
        if first and variant and self.random.random() < self.conversion.get(variant, 0.0):
            self._converted[variant] += 1
            self.stats.conversions += 1
            now = time.time()
            self._events.append(
                {
                    "event_id": uuid.uuid4().hex,
                    "unit_id": user,
                    "name": "purchase",
                    "timestamp": now,
                }
            )
            revenue = round(self.random.lognormvariate(3.0, 0.6), 2)
            self._events.append(
                {
                    "event_id": uuid.uuid4().hex,
                    "unit_id": user,
                    "name": "revenue",
                    "value": revenue,
                    "timestamp": now,
                }
            )

    def _request(self, user: str) -> tuple[str, bytes]:
        """The path and body of one prediction (or one streamed chat completion)."""
        if self.llm:
            question = self.random.choice(QUESTIONS)
            return "v1/chat/completions", orjson.dumps(
                {
                    "model": "assistant",
                    "user": user,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": question}],
                }
            )
        return "predict", orjson.dumps(
            {"user": user, "features": [self.random.random() for _ in (1, 2, 3)]}
        )

    def _check_sticky(self, user: str, variant: str) -> None:
        previous = self.last_variant.get(user)
        self.last_variant[user] = variant
        if previous is None or previous == variant:
            return
        if previous == self.control:
            self.stats.to_canary += 1
        elif variant == self.control:
            self.stats.to_control_at.append(time.time())
        else:
            self.stats.other_switches += 1

    async def _flush_events(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while True:
            stopping = stop.is_set()
            if self._events:
                batch, self._events = self._events, []
                try:
                    async with session.post(
                        f"{self.base_url}/v1/events",
                        data=orjson.dumps({"events": batch}),
                        headers={"Content-Type": "application/json"},
                    ) as response:
                        await response.read()
                        if response.status == 200:
                            self.stats.events_sent += len(batch)
                        else:
                            self.stats.event_batches_failed += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.stats.event_batches_failed += 1
            await self._flush_labels(session, everything=stopping)
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), EVENT_FLUSH_S)

    async def _flush_labels(self, session: aiohttp.ClientSession, *, everything: bool) -> None:
        """Send the labels that are due (all of them when stopping) to ``POST /v1/labels``."""
        now = time.monotonic()
        batch = []
        while self._labels and (everything or self._labels[0][0] <= now):
            _, label = self._labels.popleft()
            # The truth is known now: its timestamp is the time it is sent.
            batch.append({**label, "timestamp": time.time()})
        if not batch:
            return
        try:
            async with session.post(
                f"{self.base_url}/v1/labels",
                data=orjson.dumps({"labels": batch}),
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
                if response.status == 200:
                    self.stats.labels_sent += len(batch)
                else:
                    self.stats.label_batches_failed += 1
        except (aiohttp.ClientError, TimeoutError):
            self.stats.label_batches_failed += 1
