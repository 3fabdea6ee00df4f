"""Sending to the edge, shared by the clients and the local evaluators.

The background sending (``BatchFlusher``, ``AsyncBatchFlusher``) and the retried requests
(``call_with_retries``, ``acall_with_retries``) send ``rampart_sdk.client``'s events and the
exposures of ``rampart_sdk.local``'s evaluators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import httpx

from rampart_sdk._transport import RetryPolicy, connection_error, error_for, json_body
from rampart_sdk.errors import RampartError

_JSON: Final = {"Content-Type": "application/json"}

logger = logging.getLogger("rampart_sdk")


def call_with_retries(
    http: httpx.Client, retry: RetryPolicy, method: str, path: str, content: bytes
) -> Any:
    """Send a JSON request, retrying connection failures and 5xx answers as ``retry`` says.

    Returns the decoded body of a 2xx answer; raises the typed error of any other answer.
    """
    retries = 0
    while True:
        error: RampartError
        try:
            response = http.request(method, path, content=content, headers=_JSON)
        except httpx.TransportError as exc:
            error = connection_error(exc)
        else:
            if response.status_code < 500:
                return json_body(response)
            error = error_for(response)
        delay = retry.delay_after(retries, error)
        if delay is None:
            raise error
        time.sleep(delay)
        retries += 1


async def acall_with_retries(
    http: httpx.AsyncClient, retry: RetryPolicy, method: str, path: str, content: bytes
) -> Any:
    """``call_with_retries`` for an asyncio program."""
    retries = 0
    while True:
        error: RampartError
        try:
            response = await http.request(method, path, content=content, headers=_JSON)
        except httpx.TransportError as exc:
            error = connection_error(exc)
        else:
            if response.status_code < 500:
                return json_body(response)
            error = error_for(response)
        delay = retry.delay_after(retries, error)
        if delay is None:
            raise error
        await asyncio.sleep(delay)
        retries += 1


class BatchFlusher:
    """Calls ``flush`` from a daemon thread every ``interval_s`` seconds, and when woken.

    ``name`` names the thread, ``what`` what it sends (for the log). ``start`` is idempotent
    (the owner calls it when it first buffers something); ``stop`` ends the thread without a
    last flush, which the owner makes itself so that it can report a failure. A failed
    flush is logged and left to the next one: ``flush`` keeps what it could not send.
    """

    def __init__(
        self, flush: Callable[[], object], *, interval_s: float, name: str, what: str
    ) -> None:
        self.interval_s = interval_s
        self.name = name
        self.what = what
        self._flush = flush
        self._wakeup = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closing.is_set():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """Flush now rather than at the end of the interval."""
        self._wakeup.set()

    def stop(self) -> None:
        """Stop the thread (waiting for a flush in progress); it cannot be started again."""
        self._closing.set()
        self._wakeup.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wakeup.wait(self.interval_s)
            self._wakeup.clear()
            if self._closing.is_set():
                return
            try:
                self._flush()
            except RampartError as error:
                logger.warning("rampart: sending %s failed: %s", self.what, error)


class AsyncBatchFlusher:
    """``BatchFlusher`` as an asyncio task of the loop that calls ``start``.

    ``wake`` may be called from any thread.
    """

    def __init__(
        self, flush: Callable[[], Awaitable[object]], *, interval_s: float, name: str, what: str
    ) -> None:
        self.interval_s = interval_s
        self.name = name
        self.what = what
        self._flush = flush
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the task in the running loop; outside a loop nothing can run, so no-op."""
        if self._task is not None or self._stopped:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._task = loop.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Flush now rather than at the end of the interval."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._wakeup.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self) -> None:
        """Cancel the task (a flush in progress too) and wait; it cannot be started again."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.interval_s)
            self._wakeup.clear()
            try:
                await self._flush()
            except RampartError as error:
                logger.warning("rampart: sending %s failed: %s", self.what, error)
