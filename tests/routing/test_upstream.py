"""The proxy's upstream client against a real TCP server whose every byte the test scripts.

The server (asyncio.start_server on 127.0.0.1) reads one request at a time, by its
Content-Length, records exactly what arrived, and answers as the request's path says, so each
test can check what went over the wire and how the pool treats the connection afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from routing.proxy.upstream import Upstream, UpstreamAnswer, UpstreamClient
from tests.model_server import closed_url

OK_BODY = b'{"score":0.5}'


def ok(body: bytes = OK_BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@dataclass
class Received:
    head: bytes
    body: bytes


@dataclass
class ScriptedServer:
    """Answers each request with the script registered for its path."""

    scripts: dict[str, Callable[[asyncio.StreamWriter], Awaitable[None]]] = field(
        default_factory=dict
    )
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.received.append(Received(head, body))
                path = head.split(b" ")[1].decode().partition("?")[0]
                await self.scripts[path](writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def serving(
    scripts: dict[str, Callable[[asyncio.StreamWriter], Awaitable[None]]],
) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(scripts)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


@contextlib.asynccontextmanager
async def client(read_timeout_s: float = 5.0) -> AsyncIterator[UpstreamClient]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=10, limit_per_host=4), auto_decompress=False
    )
    try:
        yield UpstreamClient(session, connect_timeout_s=1.0, read_timeout_s=read_timeout_s)
    finally:
        await session.close()


def pool_state(upstream_client: UpstreamClient) -> tuple[int, int]:
    """Connections in use and idle in the pool (aiohttp keeps no public statistics)."""
    connector = upstream_client.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    idle = sum(len(conns) for conns in connector._conns.values())
    return len(connector._acquired), idle


def answer_with(data: bytes) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    return script


async def send(
    upstream_client: UpstreamClient,
    base_url: str,
    target: str = "/predict",
    *,
    method: str = "POST",
    headers: tuple[bytes, ...] = (),
    body: bytes = b"{}",
    buffer_limit: int = 1024,
) -> UpstreamAnswer:
    return await upstream_client.request(
        Upstream(base_url), method, target, headers, body, buffer_limit=buffer_limit
    )


def test_the_request_goes_out_as_given_and_the_connection_is_reused() -> None:
    async def scenario() -> None:
        async with serving({"/v1/models/m/predict": answer_with(ok())}) as server, client() as c:
            headers = (b"content-type: application/json\r\n", "x-note: caf\u00e9\r\n".encode())
            first = await send(
                c, server.url("/v1/models/m/"), "/predict?a=1&b=%2F", headers=headers
            )
            second = await send(c, server.url("/v1/models/m"), "/predict", body=b"")
            assert (first.status, first.body, second.body) == (200, OK_BODY, OK_BODY)
            assert (b"Content-Length", b"13") in first.headers
            assert server.connections == 1
            assert pool_state(c) == (0, 1)
            request = server.received[0]
            assert request.head == (
                b"POST /v1/models/m/predict?a=1&b=%2F HTTP/1.1\r\n"
                + f"Host: 127.0.0.1:{server.port}\r\n".encode()
                + b"content-type: application/json\r\nx-note: caf\xc3\xa9\r\n"
                + b"Content-Length: 2\r\n\r\n"
            )
            assert request.body == b"{}"
            # A POST without a body still says so; the path is the upstream's own.
            assert b"Content-Length: 0\r\n" in server.received[1].head

    asyncio.run(scenario())


def test_a_get_without_a_body_sends_no_content_length_and_an_empty_target_is_the_root() -> None:
    async def scenario() -> None:
        async with serving({"/": answer_with(ok())}) as server, client() as c:
            answer = await send(c, server.url(), "", method="GET", body=b"")
            assert answer.body == OK_BODY
            assert server.received[0].head == (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
            )

    asyncio.run(scenario())


def test_connection_close_interim_answers_and_head_requests() -> None:
    async def scenario() -> None:
        scripts = {
            "/close": answer_with(ok(extra=b"Connection: close\r\n")),
            "/continue": answer_with(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after")),
            # A HEAD answer announces a length but has no body.
            "/head": answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"),
        }
        async with serving(scripts) as server, client() as c:
            closed = await send(c, server.url(), "/close")
            assert closed.body == OK_BODY
            assert pool_state(c) == (0, 0)
            interim = await send(c, server.url(), "/continue")
            assert (interim.status, interim.body) == (200, b"after")
            head = await send(c, server.url(), "/head", method="HEAD", body=b"")
            assert (head.status, head.body) == (200, b"")
            assert pool_state(c) == (0, 1)
            again = await send(c, server.url(), "/continue")
            assert again.body == b"after"
            assert server.connections == 2

    asyncio.run(scenario())


def test_large_chunked_and_close_delimited_answers_stream() -> None:
    big = b"x" * 5000

    async def chunked(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"first,", b"second"):
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")

    async def until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nno length, ends at close")
        await writer.drain()
        writer.close()

    async def big_in_two_parts(writer: asyncio.StreamWriter) -> None:
        # (An answer that is already complete when its head is parsed is taken whole.)
        writer.write(ok(big)[:-1000])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(big[-1000:])

    scripts = {"/big": big_in_two_parts, "/chunked": chunked, "/eof": until_close}

    async def scenario() -> None:
        async with serving(scripts) as server, client() as c:
            large = await send(c, server.url(), "/big", buffer_limit=1024)
            assert large.body is None
            assert b"".join([chunk async for chunk in large.chunks()]) == big
            assert pool_state(c) == (0, 1)
            streamed = await send(c, server.url(), "/chunked")
            assert streamed.body is None
            assert await streamed.read() == b"first,second"
            assert pool_state(c) == (0, 1)
            delimited = await send(c, server.url(), "/eof")
            assert await delimited.read() == b"no length, ends at close"
            assert pool_state(c) == (0, 0)

    asyncio.run(scenario())


def test_read_timeouts_close_the_connection() -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)

    async def half_body(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await asyncio.sleep(2)

    async def slow_stream(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        # Three chunks, each within the read timeout of the one before: the whole answer
        # takes longer than the timeout and still arrives.
        for _ in range(3):
            await writer.drain()
            await asyncio.sleep(0.15)
            writer.write(b"1\r\nz\r\n")
        writer.write(b"0\r\n\r\n")

    scripts = {"/silent": silent, "/half": half_body, "/slow-stream": slow_stream}

    async def scenario() -> None:
        async with serving(scripts) as server, client(read_timeout_s=0.3) as c:
            loop = asyncio.get_running_loop()
            for path in ("/silent", "/half"):
                started = loop.time()
                with pytest.raises(TimeoutError):
                    await send(c, server.url(), path)
                assert 0.25 <= loop.time() - started < 1.5, path
                # The slot is freed once the socket is closed, a loop pass later.
                await asyncio.sleep(0)
                assert pool_state(c) == (0, 0), path
            streamed = await send(c, server.url(), "/slow-stream")
            assert await streamed.read() == b"zzz"

    asyncio.run(scenario())


def test_connection_failures_and_cancellation() -> None:
    async def slow(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)
        writer.write(ok())

    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    async def scenario() -> None:
        async with serving({"/slow": slow, "/hang-up": hang_up}) as server, client() as c:
            with pytest.raises((aiohttp.ClientError, OSError)):
                await send(c, closed_url())
            with pytest.raises(aiohttp.ClientError):
                await send(c, server.url(), "/hang-up")
            assert pool_state(c) == (0, 0)
            task = asyncio.ensure_future(send(c, server.url(), "/slow"))
            await asyncio.sleep(0.1)
            assert pool_state(c) == (1, 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Cancelled mid-answer: closed, never returned to the pool half-read.
            assert pool_state(c) == (0, 0)

    asyncio.run(scenario())


def test_only_http_urls_are_upstreams() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Upstream("ftp://127.0.0.1/model")


def test_a_cancelled_request_frees_its_pool_slot_only_after_closing_its_socket() -> None:
    """The pool's bound holds for sockets, not only for aiohttp's bookkeeping.

    With one connection per host, a request waits for the slot of one that is cancelled.
    Each time the client opens a socket, the sockets it still holds to the upstream are
    counted: the cancelled one must be gone by then (aiohttp freed the slot a loop pass
    before it closed the socket, so the waiting request connected while it was open)."""

    async def never(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        async with serving({"/slow": never, "/fast": answer_with(ok())}) as server:
            held_at_connect: list[int] = []
            sock_connect = loop.sock_connect

            async def counting_connect(sock: Any, address: Any) -> None:
                held_at_connect.append(established_to(server.port))
                await sock_connect(sock, address)

            loop.sock_connect = counting_connect  # type: ignore[method-assign]
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=1))
            try:
                upstream_client = UpstreamClient(session, connect_timeout_s=1.0, read_timeout_s=5.0)
                slow = asyncio.create_task(send(upstream_client, server.url(), "/slow"))
                while not server.received:
                    await asyncio.sleep(0.01)
                fast = asyncio.create_task(send(upstream_client, server.url(), "/fast"))
                await asyncio.sleep(0.05)  # waiting for the only slot
                slow.cancel()
                answer = await fast
                assert answer.status == 200
                with pytest.raises(asyncio.CancelledError):
                    await slow
            finally:
                await session.close()
            return held_at_connect

    assert asyncio.run(scenario()) == [0, 0]


def established_to(port: int) -> int:
    """ESTABLISHED IPv4 sockets of this machine whose remote end is ``port``."""
    with open("/proc/net/tcp") as listing:
        rows = [line.split() for line in listing.readlines()[1:]]
    return sum(1 for row in rows if int(row[2].split(":")[1], 16) == port and row[3] == "01")
