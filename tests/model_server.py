"""A tiny configurable model server (plain ASGI on uvicorn) for proxy tests and benchmarks.

Each :class:`ModelServer` listens on 127.0.0.1 at a free port, in a thread of the test process,
and counts what it receives so tests can compare the proxy's records with what really happened.
Its behaviour can change while it runs (``server.delay_s = 0.5``, ``server.status = 503``) and
per request with headers:

* ``x-model-delay``: seconds to wait before answering (a slow model);
* ``x-model-status``: the status code to answer with (a failing model);
* ``x-model-stream``: answer with that many bytes, streamed in 16 KiB chunks without a
  Content-Length (a streaming model).

The answer is JSON ``{"score": <server.score>, "path": <request path>}`` with an ``x-model``
header naming the server, so two servers with the same score give byte-identical bodies.
A server that is down is a port nothing listens on: :func:`closed_url`.

``python -m tests.model_server --port 9001`` runs one in the foreground (used by bench/proxy.py),
and ``uvicorn tests.model_server:proxy_edge --factory`` serves the edge with the proxy mounted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

from tests.processes import free_port

Scope = dict[str, Any]
Message = dict[str, Any]

STREAM_CHUNK_BYTES = 16 * 1024


@dataclass
class ReceivedRequest:
    method: str
    path: str
    raw_path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ModelServer:
    """One model version: a plain ASGI app plus the uvicorn server that runs it in a thread."""

    name: str = "model"
    score: float = 0.5
    delay_s: float = 0.0
    status: int = 200
    keep_requests: bool = True
    port: int = field(default_factory=free_port)
    count: int = 0
    completed: int = 0
    disconnects: int = 0
    received: list[ReceivedRequest] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_counts(self) -> None:
        self.count = self.completed = self.disconnects = 0
        self.received = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.count += 1
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        if self.keep_requests:
            self.received.append(
                ReceivedRequest(
                    method=scope["method"],
                    path=scope["path"],
                    raw_path=(scope.get("raw_path") or b"").decode("latin-1"),
                    query=scope["query_string"].decode("latin-1"),
                    headers=headers,
                    body=body,
                )
            )
        delay = float(headers.get("x-model-delay", self.delay_s))
        if delay > 0 and not await _sleep_unless_disconnected(delay, receive):
            self.disconnects += 1
            return
        status = int(headers.get("x-model-status", self.status))
        stream_bytes = int(headers.get("x-model-stream", "0"))
        response_headers = [
            (b"x-model", self.name.encode()),
            (b"content-type", b"application/json"),
        ]
        if stream_bytes:
            await send(
                {"type": "http.response.start", "status": status, "headers": response_headers}
            )
            remaining = stream_bytes
            while remaining > 0:
                size = min(STREAM_CHUNK_BYTES, remaining)
                remaining -= size
                await send({"type": "http.response.body", "body": b"x" * size, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            payload = orjson.dumps({"score": self.score, "path": scope["path"]})
            response_headers.append((b"content-length", str(len(payload)).encode()))
            await send(
                {"type": "http.response.start", "status": status, "headers": response_headers}
            )
            await send({"type": "http.response.body", "body": payload})
        self.completed += 1

    def start(self) -> ModelServer:
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name=f"model-{self.name}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"model server {self.name} did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = self._thread = None


async def _sleep_unless_disconnected(delay_s: float, receive: Any) -> bool:
    """Wait ``delay_s``; False if the client (the proxy) hung up first."""
    listener = asyncio.ensure_future(receive())
    try:
        done, _ = await asyncio.wait({listener}, timeout=delay_s)
        return not (done and listener.result()["type"] == "http.disconnect")
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener


def closed_url() -> str:
    """The URL of a model that is down: a free port on loopback that nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


def proxy_edge() -> Any:
    """ASGI factory for uvicorn (``--factory``): the real edge with only the proxy mounted."""
    import django

    django.setup()
    from routing.edge.app import build_edge
    from routing.proxy.app import ProxyApp

    return build_edge(mounts={"/proxy/": ProxyApp})


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one tiny model server in the foreground.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="model")
    parser.add_argument("--score", type=float, default=0.5)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = ModelServer(
        name=args.name, score=args.score, delay_s=args.delay, port=args.port, keep_requests=False
    )
    uvicorn.run(
        server,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
