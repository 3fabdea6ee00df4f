"""The OpenAI-compatible stand-in (``scripts.llm_server``) served on loopback in a test thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from scripts.llm_server import LLMServer
from tests.processes import free_port


class ServedLLM:
    """An ``LLMServer`` on 127.0.0.1 at a free port, run by uvicorn in a daemon thread."""

    def __init__(self, **options: Any) -> None:
        self.model = LLMServer(**options)
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedLLM:
        config = uvicorn.Config(
            self.model,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        server = self._server = uvicorn.Server(config)
        thread = self._thread = threading.Thread(
            target=server.run, name=f"llm-{self.model.name}", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"stand-in LLM {self.model.name} did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = self._thread = None
