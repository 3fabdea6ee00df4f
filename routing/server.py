"""The edge's HTTP protocol for uvicorn: httptools, with each response's writes coalesced.

Serve the edge with ``uvicorn config.asgi:application --http routing.server:EdgeHttpProtocol``
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
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # FlowControl keeps the real transport (it pauses and resumes reading); responses,
        # written by uvicorn through self.transport, are coalesced.
        self.transport = CoalescingTransport(transport, self.loop)
