"""A classifier stand-in: answers ``{"label": "a"}``, or ``"b"`` for a set share of request bodies.

``python -m tests.e2e.label_model --port 9003 --disagree 0.2`` runs one in the foreground. The
label depends only on the body (its CRC-32), so two servers with the same ``--disagree`` give the
same answer to the same request, and one with 0.2 differs from one with 0 on about 20% of
distinct bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib
from typing import Any

import orjson
import uvicorn


class LabelModel:
    def __init__(self, *, disagree: float, delay_s: float) -> None:
        self.threshold = round(disagree * 10_000)
        self.delay_s = delay_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        label = "b" if zlib.crc32(body) % 10_000 < self.threshold else "a"
        payload = orjson.dumps({"label": label})
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one classifier stand-in.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--disagree", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(
        LabelModel(disagree=args.disagree, delay_s=args.delay),
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
