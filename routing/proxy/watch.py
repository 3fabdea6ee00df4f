"""Client disconnects: cancel a request's upstream call when its client goes away."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from routing.edge.asgi import Message, Receive

# A request starts listening for its client's disconnect after waiting this long (up to
# twice as long) for its upstream; see WatchSweep.
DISCONNECT_WATCH_AFTER_S: Final = 0.05


class DisconnectWatch:
    """Cancels the request's task when the client disconnects during the upstream call.

    The client's disconnect arrives through ``receive()``, so noticing it takes a listener
    task. ``WatchSweep`` starts that listener (``listen``) only for requests still waiting
    after ``DISCONNECT_WATCH_AFTER_S``; see there why.

    It also remembers the attempt in flight whose observation is still due (``arm_key``,
    ``started``), so that a request abandoned by its client is still counted for its arm.
    """

    __slots__ = ("arm_key", "disconnected", "listener", "receive", "started", "task")

    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None) -> None:
        self.receive: Receive | None = receive
        self.task = task
        self.listener: asyncio.Future[Message] | None = None
        self.disconnected = False
        self.arm_key: str | None = None
        self.started = 0.0

    def listen(self) -> None:
        """Start listening for the client's disconnect, unless the request has finished."""
        if self.receive is None or self.listener is not None:
            return
        self.listener = asyncio.ensure_future(self.receive())
        self.listener.add_done_callback(self._on_message)

    def _on_message(self, listener: asyncio.Future[Message]) -> None:
        if listener.cancelled() or listener.exception() is not None:
            return
        if listener.result().get("type") == "http.disconnect" and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    def stop(self) -> None:
        """Stop watching; call before the last message of the response (see ``__call__``)."""
        # The sweep may hold this watch for another period: let the request's objects go now.
        # A watch without ``receive`` has finished.
        self.receive = None
        self.task = None
        if self.listener is not None:
            self.listener.cancel()

    def begin(self, arm_key: str) -> None:
        """An attempt whose observation belongs to ``arm_key`` starts now."""
        self.arm_key = arm_key
        self.started = time.perf_counter()


class WatchSweep:
    """Starts the disconnect listeners of requests that have waited a whole period.

    A listener task per request costs about as much CPU as the rest of Rampart's own work on
    a fast answer, and most answers arrive within milliseconds, long before a client gives
    up. So a request only joins a list here (one append), and a timer running while requests
    are in flight starts, every ``period_s``, the listeners of the requests that joined during
    the period before the last one and are still unanswered: a request starts listening after
    waiting between one and two periods. A client that leaves earlier is noticed then, and its
    upstream call cancelled at that point; later departures are noticed at once.
    """

    __slots__ = ("_handle", "_older", "_young", "period_s")

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._young: list[DisconnectWatch] = []
        self._older: list[DisconnectWatch] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, watch: DisconnectWatch) -> None:
        self._young.append(watch)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def _tick(self) -> None:
        for watch in self._older:
            if watch.receive is not None:
                watch.listen()
        self._older, self._young = self._young, []
        self._handle = None
        if self._older:
            self._handle = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._young.clear()
        self._older.clear()
