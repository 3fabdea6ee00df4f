"""Requests to model upstreams over aiohttp's pooled connections, one write and one parse each.

The proxy forwards with aiohttp: the process's one ``ClientSession`` owns the TCP connector,
which pools keep-alive connections (PROXY_POOL_LIMIT in all, PROXY_POOL_LIMIT_PER_HOST per
upstream), opens new ones within the connect timeout (TLS included), and attaches aiohttp's
response protocol with its C (llhttp) parser to each. What this module leaves out is
``ClientSession.request()``'s per-request machinery, which a proxy does not need: building a
``ClientRequest`` (URL joining, header dictionaries, auto headers, cookies), redirects, traces,
a body payload object and, on Python 3.11, a task to write it. On this machine that machinery
cost about half of the proxy's CPU time per request (bench/proxy.py: a bare proxy calling
``session.request()`` did 6.5-7.4k req/s where the same proxy on this path did 14-14.6k).

Instead, the request head is formatted once, from headers that are forwarded byte for byte,
and written with the body in one ``transport.write()``; the answer comes back through the
connection's own protocol: ``set_response_params()`` installs a fresh parser and ``read()``
yields the parsed status line and headers with a payload stream. The read timeout
(PROXY_READ_TIMEOUT_S) bounds the wait from the request's last byte to the answer's last byte
for answers read whole, and the wait between two chunks for streamed ones. A request may also
carry a deadline (the proxy's PROXY_DEADLINE_S, shared by an attempt and its retry): the
connect and the wait for the answer (the whole answer when read whole, its head when streamed)
end by then at the latest. This is the same
sequence ``ClientRequest.send()`` and ``ClientResponse.start()`` follow, so connection reuse,
``Connection: close`` and 1xx interim answers behave as they do in aiohttp. The pieces used
below the session (``BaseConnector.connect()``, ``Connection``, the protocol's
``set_response_params()``, ``read()``, ``read_timeout``, ``start_timeout()`` and
``set_exception()``) are pinned with aiohttp's version
in pyproject.toml and exercised by tests/routing/test_upstream.py against real servers.

A connection goes back to the pool only after its answer was read to the end; on any error or
cancellation it is closed, so a half-read connection is never reused. Its pool slot is freed
only once its socket is closed (``_discard``): aiohttp's ``Connection.close()`` frees the slot
and wakes a request waiting for one at once, but the transport closes the socket a loop pass
later, after the woken request has already connected; so each cancelled request let the
process hold, for one pass, a socket more than PROXY_POOL_LIMIT_PER_HOST, and a loaded
process that handled many cancellations in one pass held many more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Final

import aiohttp
from aiohttp.client_proto import ResponseHandler
from yarl import URL

# Methods whose requests carry a body by definition: they get a Content-Length even when empty
# (RFC 9110 section 8.6), where a GET without a body gets none.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class Upstream:
    """One model version's base URL, prepared once: pool key, Host header and path prefix."""

    __slots__ = ("_pool_request", "base_url", "host_header", "path_prefix", "url")

    def __init__(self, base_url: str) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url
        self.url = url
        self._pool_request: aiohttp.ClientRequest | None = None
        self.host_header = f"Host: {url.host_port_subcomponent}\r\n".encode("latin-1")
        self.path_prefix = url.raw_path.rstrip("/")

    def pool_request(self, loop: asyncio.AbstractEventLoop) -> aiohttp.ClientRequest:
        """What the connector needs to pick a pooled connection or open one (host, port, TLS).

        It is only read, never sent, so one per upstream serves every call.
        """
        request = self._pool_request
        if request is None:
            request = aiohttp.ClientRequest("GET", self.url.with_path("/"), loop=loop)
            self._pool_request = request
        return request


class UpstreamAnswer:
    """An upstream's status line and headers, with the body read whole or still to stream."""

    __slots__ = ("_connection", "_payload", "body", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
        connection: aiohttp.connector.Connection | None,
        payload: aiohttp.StreamReader | None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self._connection = connection
        self._payload = payload

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body as it arrives; the connection is pooled again after the end."""
        payload = self._payload
        if payload is None:
            raise RuntimeError("this answer was read whole")
        try:
            while True:
                chunk = await payload.readany()
                if not chunk:
                    break
                yield chunk
        except BaseException:
            self.close()
            raise
        self._release()

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        if self.body is None:
            self.body = b"".join([chunk async for chunk in self.chunks()])
        return self.body

    def close(self) -> None:
        """Drop the connection (it is not reused): for answers abandoned before their end."""
        connection, self._connection = self._connection, None
        if connection is not None:
            _discard(connection)

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.release()


class UpstreamClient:
    """Sends requests over the connector of the process's one aiohttp session.

    Create it inside the event loop that will use it.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        connector = session.connector
        if connector is None:
            raise ValueError("the session has no connector")
        self.connector: aiohttp.BaseConnector = connector
        self.read_timeout_s = read_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._loop = asyncio.get_running_loop()
        self._connect_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s
        )

    async def request(
        self,
        upstream: Upstream,
        method: str,
        target: str,
        header_lines: Sequence[bytes],
        body: bytes,
        *,
        buffer_limit: int,
        deadline: float | None = None,
    ) -> UpstreamAnswer:
        """Send one request; reads the answer whole when it has no body, has already arrived
        in full, or has a Content-Length up to ``buffer_limit``; else leaves it to stream with
        ``chunks()``.

        ``target`` is the path (percent-encoded, as received) and query after the upstream's
        own path; ``header_lines`` are ``b"Name: value\\r\\n"`` lines to send as they are.
        ``deadline`` (the event loop's clock) cuts the connect and read timeouts short.
        Raises TimeoutError on a connect or read timeout or at the deadline, and
        aiohttp.ClientError or OSError when the connection fails.
        """
        head = [
            f"{method} {upstream.path_prefix}{target or '/'} HTTP/1.1\r\n".encode("latin-1"),
            upstream.host_header,
            *header_lines,
        ]
        if body or method in _BODY_METHODS:
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        head.append(body)
        loop = self._loop
        connect_timeout = self._connect_timeout
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("the request's deadline has passed")
            if left < self.connect_timeout_s:
                # Only a retry late in the request's time gets here: a timeout of its own.
                connect_timeout = aiohttp.ClientTimeout(total=None, connect=left, sock_connect=left)
        connection = await self.connector.connect(upstream.pool_request(loop), [], connect_timeout)
        timer = None
        try:
            protocol = connection.protocol
            transport = connection.transport
            if protocol is None or transport is None:
                raise aiohttp.ServerDisconnectedError()
            is_head = method == "HEAD"
            protocol.set_response_params(
                skip_payload=is_head,
                # An answer with neither Content-Length nor chunked coding ends when the
                # upstream closes the connection (RFC 9112 section 6.3), as in aiohttp's session.
                read_until_eof=True,
                auto_decompress=False,
            )
            transport.write(b"".join(head))
            expire_at = loop.time() + self.read_timeout_s
            if deadline is not None and deadline < expire_at:
                expire_at = deadline
            timer = _Deadline(protocol)
            timer.handle = loop.call_at(expire_at, timer.expire)
            while True:
                message, payload = await protocol.read()
                # Interim (1xx) answers are skipped, as ClientResponse.start() does.
                if not 100 <= message.code < 200 or message.code == 101:
                    break
            length = message.headers.get("Content-Length")
            if (
                is_head
                or payload.is_eof()
                or (length is not None and length.isdigit() and int(length) <= buffer_limit)
            ):
                if payload.is_eof():
                    # The whole body came with the head (the usual case for an inference
                    # answer): take it without read()'s coroutine and buffer loop.
                    data = payload.read_nowait()
                else:
                    timer.payload = payload
                    data = await payload.read()
                timer.handle.cancel()
                connection.release()
                return UpstreamAnswer(message.code, message.raw_headers, data, None, None)
            # A streamed answer may take as long as it needs, with at most the read timeout
            # between two chunks: aiohttp's protocol restarts that timer on every read.
            timer.handle.cancel()
            protocol.read_timeout = self.read_timeout_s
            protocol.start_timeout()
        except BaseException:
            if timer is not None and timer.handle is not None:
                timer.handle.cancel()
            _discard(connection)
            raise
        return UpstreamAnswer(message.code, message.raw_headers, None, connection, payload)


def _discard(connection: aiohttp.connector.Connection) -> None:
    """Close a connection that will not be reused; its pool slot is freed after its socket.

    ``abort()`` queues the transport's ``connection_lost`` (which closes the socket) on the
    loop; the slot's release is queued behind it, so the request it wakes connects only
    once the socket is gone.
    """
    transport = connection.transport
    if transport is None or transport.is_closing():
        connection.close()
        return
    transport.abort()
    asyncio.get_running_loop().call_soon(connection.close)


class _Deadline:
    """The read timeout of one request: one timer for the head and a buffered body.

    aiohttp's own read timeout restarts a timer on every read, three timer operations or more
    per answer; a buffered answer needs only one.
    """

    __slots__ = ("handle", "payload", "protocol")

    def __init__(self, protocol: ResponseHandler) -> None:
        self.protocol = protocol
        self.payload: aiohttp.StreamReader | None = None
        self.handle: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        error = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
        self.protocol.set_exception(error)
        if self.payload is not None:
            self.payload.set_exception(error)
