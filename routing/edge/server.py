"""The edge's HTTP protocol for uvicorn: httptools, with each response's writes coalesced.

Serve the edge with ``uvicorn config.asgi:application --http routing.edge.server:EdgeHttpProtocol``
(the Dockerfile, docker-compose.yml, ``make run`` and ``make demo`` do).

uvicorn writes a response's status line and headers to the socket as soon as the app sends
``http.response.start``, and the body with the next message: two ``send()`` system calls and
two TCP segments for every answer, where nginx writes both with one ``writev()``. On loopback
a socket write costs the sender the whole TCP path, about as much CPU time as the rest of the
edge's own work on a proxied request, so the second write was the largest single cost left
that Rampart controls (bench/proxy.py: about 12 µs of 85 µs of CPU per proxied request).

``EdgeHttpProtocol`` is uvicorn's httptools protocol with its transport wrapped in a
``CoalescingTransport``: data written during one pass of the event loop is held and written
once, by a callback the loop runs next (``call_soon``), so a head and a body sent back to
back leave together. Nothing waits longer than that pass: a streamed answer's head still goes
out before its first chunk arrives from upstream, each chunk goes out as it comes, and
closing or ending the stream writes what is held first. Reading, flow control and everything
else go to uvicorn's transport unchanged.

Slow clients: uvicorn's own keep-alive timeout only runs between requests, so a client that
sends half a request line, or headers without their end, or half of a body, kept its
connection (and a task waiting for the body) forever. ``ConnectionGuard`` bounds that without
a timer per request: one sweep per process, every ``period_s`` (a tenth of the shorter
timeout, 50 ms to 1 s) while connections are open, looks at each connection's parser state
and closes, with a 408 ``request_timeout`` problem, those that have waited for the same
request's headers longer than EDGE_HEADER_TIMEOUT_S (counted from the connection or the
request's first byte) or for its body longer than EDGE_BODY_TIMEOUT_S (counted from the end
of its headers). A timed-out body ends the app's wait with ``http.disconnect``. The requests
themselves pay nothing: the sweep reads the state uvicorn keeps anyway (a new ``scope`` per
request, ``cycle.more_body``), and a state's start is known to within one period. A process
holds at most EDGE_MAX_CONNECTIONS connections: one more is answered 503
``too_many_connections`` and closed at once, before it costs a task or a buffer.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import Any, Final

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from routing.edge.problems import problem_body
from routing.observe import metrics

HEADERS: Final = "headers"
BODY: Final = "body"


class CoalescingTransport(asyncio.Transport):
    """A transport whose writes within one event-loop pass reach the socket as one write."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            held.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what is held now (the loop calls this once per pass that wrote)."""
        held, self._held = self._held, None
        if not held or self._transport.is_closing():
            return
        self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        held = self._held
        pending = sum(len(data) for data in held) if held else 0
        return pending + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # ------------------------------------------------------------------ the rest, as it is

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        # An upgrade (WebSocket) hands the connection to another protocol: from then on its
        # writes go straight through, after anything still held.
        self.flush()
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class ConnectionGuard:
    """The slow-client sweep and the connection bound of one uvicorn server (one process)."""

    def __init__(
        self,
        connections: set[Any],
        loop: asyncio.AbstractEventLoop,
        *,
        header_timeout_s: float,
        body_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.connections = connections
        self.loop = loop
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.period_s = min(max(min(header_timeout_s, body_timeout_s) / 10.0, 0.05), 1.0)
        # protocol -> (what it waited for at the last sweep, since when)
        self._waiting: dict[Any, tuple[object, float]] = {}
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def from_settings(
        cls, connections: set[Any], loop: asyncio.AbstractEventLoop
    ) -> ConnectionGuard:
        return cls(
            connections,
            loop,
            header_timeout_s=float(settings.EDGE_HEADER_TIMEOUT_S),
            body_timeout_s=float(settings.EDGE_BODY_TIMEOUT_S),
            max_connections=int(settings.EDGE_MAX_CONNECTIONS),
        )

    def admit(self, protocol: Any) -> bool:
        """Whether a new connection (already in ``connections``) may stay."""
        if len(self.connections) > self.max_connections:
            return False
        # Its headers are due EDGE_HEADER_TIMEOUT_S from now (state: no request yet).
        self._waiting[protocol] = (None, self.loop.time())
        if self._handle is None:
            self._handle = self.loop.call_later(self.period_s, self._sweep)
        return True

    def _sweep(self) -> None:
        now = self.loop.time()
        previous = self._waiting
        current: dict[Any, tuple[object, float]] = {}
        for protocol in tuple(self.connections):
            waiting_for = getattr(protocol, "waiting_for", None)
            state = waiting_for() if waiting_for is not None else None
            if state is None:
                continue
            token, phase = state
            seen = previous.get(protocol)
            since = seen[1] if seen is not None and seen[0] is token else now
            timeout_s = self.header_timeout_s if phase is HEADERS else self.body_timeout_s
            if now - since >= timeout_s:
                protocol.time_out(phase, timeout_s)
            else:
                current[protocol] = (token, since)
        self._waiting = current
        metrics.EDGE_CONNECTIONS.set(len(self.connections))
        if self.connections:
            self._handle = self.loop.call_later(self.period_s, self._sweep)
        else:
            self._handle = None


# One guard per uvicorn server (its ServerState), created with its first connection.
_guards: weakref.WeakKeyDictionary[Any, ConnectionGuard] = weakref.WeakKeyDictionary()


def _response(status: bytes, code: str, detail: str, extra: bytes = b"") -> bytes:
    body = problem_body(int(status[:3]), code, detail)
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n%s\r\n%s" % (status, len(body), extra, body)
    )


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a ``CoalescingTransport``, with the
    slow-client timeouts and the connection bound of ``ConnectionGuard``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # FlowControl keeps the real transport (it pauses and resumes reading); responses,
        # written by uvicorn through self.transport, are coalesced.
        self.transport = CoalescingTransport(transport, self.loop)
        guard = _guards.get(self.server_state)
        if guard is None:
            guard = _guards[self.server_state] = ConnectionGuard.from_settings(
                self.connections, self.loop
            )
        if not guard.admit(self):
            metrics.EDGE_CONNECTIONS_REFUSED.inc()
            self.transport.write(
                _response(
                    b"503 Service Unavailable",
                    "too_many_connections",
                    f"this edge process holds {guard.max_connections} connections already",
                    b"retry-after: 1\r\n",
                )
            )
            self.transport.close()

    def waiting_for(self) -> tuple[object, str] | None:
        """What the connection waits for from its client: (a token of the request, HEADERS
        or BODY), or None (an answer is under way, or an idle keep-alive connection, which
        uvicorn's keep-alive timeout closes)."""
        scope = self.scope
        cycle = self.cycle
        # uvicorn makes a new scope when a request's first byte arrives and a new cycle when
        # its headers are complete; no scope yet: nothing received on this connection.
        if cycle is None or cycle.scope is not scope:
            return scope, HEADERS
        if cycle.more_body and not cycle.response_started and not cycle.disconnected:
            return cycle, BODY
        return None

    def time_out(self, phase: str, timeout_s: float) -> None:
        """Answer 408 and close: the request's headers or body did not arrive in time."""
        if self.transport.is_closing():
            return
        metrics.EDGE_SLOW_CLIENTS.labels(phase).inc()
        self.transport.write(
            _response(
                b"408 Request Timeout",
                "request_timeout",
                f"the request's {phase} did not arrive within {timeout_s:g} s",
            )
        )
        self.transport.close()
