"""A small stand-in for one ML model version, for `make demo`: an ASGI app on uvicorn.

It answers every POST (or GET) with a JSON prediction after a log-normally distributed
delay, so latency has a realistic right tail, and fails a configurable share of requests
with 503. ``python -m scripts.demo_models --name v2 --port 9102 --median-ms 28`` runs one.

With median m and log-scale spread sigma, the p-quantile of the delay is
m * exp(sigma * z_p) (z_0.95 = 1.645): scaling the median by 1.4 scales p95 by 1.4 too.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import zlib
from typing import Any

import orjson
import uvicorn

Scope = dict[str, Any]

# exp(0.25 * 1.645) = 1.51: p95 is about 1.5 times the median, a moderate inference tail.
DEFAULT_SIGMA = 0.25


class ModelVersion:
    """One model version: delay ~ LogNormal(ln(median), sigma), then a prediction or a 503."""

    def __init__(
        self,
        *,
        name: str,
        median_ms: float,
        sigma: float = DEFAULT_SIGMA,
        error_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if median_ms <= 0 or sigma < 0 or not 0 <= error_rate <= 1:
            raise ValueError("median_ms > 0, sigma >= 0 and 0 <= error_rate <= 1 are required")
        self.name = name
        self.mu = math.log(median_ms / 1000.0)
        self.sigma = sigma
        self.error_rate = error_rate
        self.random = random.Random(seed)
        self.served = 0

    def delay_s(self) -> float:
        return self.random.lognormvariate(self.mu, self.sigma)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await asyncio.sleep(self.delay_s())
        self.served += 1
        payload: dict[str, str | float]
        if self.random.random() < self.error_rate:
            status, payload = 503, {"error": "model overloaded", "model": self.name}
        else:
            # A deterministic score per request body: the same input gets the same answer.
            score = zlib.crc32(body) / 0xFFFFFFFF
            status, payload = 200, {"model": self.name, "score": round(score, 4)}
        answer = orjson.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                    (b"x-model", self.name.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one demo model version in the foreground.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--median-ms", type=float, required=True)
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    model = ModelVersion(
        name=args.name,
        median_ms=args.median_ms,
        sigma=args.sigma,
        error_rate=args.error_rate,
        seed=args.seed,
    )
    uvicorn.run(
        model,
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
