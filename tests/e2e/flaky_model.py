"""A model server that fails a set share of requests: `tests.model_server` plus random 500s.

``python -m tests.e2e.flaky_model --port 9002 --delay 0.07 --error-rate 0.2`` runs one in the
foreground. The failures are drawn from a seeded generator, so a run is repeatable.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import uvicorn

from tests.model_server import ModelServer

FAILURE_HEADER = (b"x-model-status", b"500")


class FlakyModel:
    """Wraps a ModelServer and turns a share of its answers into HTTP 500."""

    def __init__(self, server: ModelServer, *, error_rate: float, seed: int) -> None:
        self.server = server
        self.error_rate = error_rate
        self.random = random.Random(seed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.random.random() < self.error_rate:
            scope = {**scope, "headers": [*scope["headers"], FAILURE_HEADER]}
        await self.server(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one model server that sometimes fails.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="model")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    server = ModelServer(name=args.name, delay_s=args.delay, port=args.port, keep_requests=False)
    uvicorn.run(
        FlakyModel(server, error_rate=args.error_rate, seed=args.seed),
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
