"""The edge's uvicorn protocol: each loop pass's writes leave as one, and nothing is held longer.

The transport is checked write by write against a recording transport; the protocol is
checked end to end with a real uvicorn server on 127.0.0.1 and raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from routing.edge.server import CoalescingTransport, EdgeHttpProtocol
from tests.processes import free_port


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


def test_writes_in_one_pass_leave_as_one_and_in_order() -> None:
    async def scenario() -> None:
        real = RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.writelines([b"he", bytearray(b"llo")])
        assert real.writes == []
        assert transport.get_write_buffer_size() == 19 + 5 + 7
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nhello"]
        transport.write(b"next")
        await asyncio.sleep(0)
        transport.write(b"last")
        await asyncio.sleep(0)
        assert real.writes[1:] == [b"next", b"last"]
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)

    asyncio.run(scenario())


def test_close_writes_what_is_held_first_and_abort_drops_it() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        real = RecordingTransport()
        transport = CoalescingTransport(real, loop)
        transport.write(b"answer")
        transport.close()
        assert (real.writes, real.events) == ([b"answer"], ["close"])
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        assert real.writes == [b"answer"]

        aborted = RecordingTransport()
        transport = CoalescingTransport(aborted, loop)
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        assert (aborted.writes, aborted.events) == ([], ["abort"])

        # The peer went away before the pass ended: nothing is written to a closing socket.
        gone = RecordingTransport()
        transport = CoalescingTransport(gone, loop)
        transport.write(b"late")
        gone.closing = True
        await asyncio.sleep(0)
        assert gone.writes == []

        upgraded = RecordingTransport()
        transport = CoalescingTransport(upgraded, loop)
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        other = asyncio.Protocol()
        transport.set_protocol(other)
        assert upgraded.writes == [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"]
        assert upgraded.protocol is other

    asyncio.run(scenario())


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"second"})
        return
    headers = [(b"content-length", b"2")]
    if scope["path"] == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def serving() -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=EdgeHttpProtocol,
        loop="uvloop",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def read_until(sock: socket.socket, marker: bytes, *, limit_s: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + limit_s
    while marker not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_real_server_answers_keeps_alive_streams_without_delay_and_closes_cleanly() -> None:
    with serving() as port, socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(2):
            sock.sendall(b"GET /small HTTP/1.1\r\nHost: edge\r\n\r\n")
            answer = read_until(sock, b"\r\n\r\nok")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert answer.endswith(b"\r\n\r\nok")

        # A streamed answer's head and first chunk arrive while the app still waits.
        started = time.monotonic()
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: edge\r\n\r\n")
        first = read_until(sock, b"first")
        assert b"first" in first
        assert time.monotonic() - started < 0.4
        rest = read_until(sock, b"0\r\n\r\n")
        assert b"second" in first + rest
        assert time.monotonic() - started >= 0.45

        sock.sendall(b"GET /close HTTP/1.1\r\nHost: edge\r\n\r\n")
        closing = read_until(sock, b"never there")
        assert closing.endswith(b"\r\n\r\nok")
        assert sock.recv(10) == b""  # closed after the answer was written
