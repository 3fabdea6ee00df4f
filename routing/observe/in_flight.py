"""A background flush that stopping waits for instead of cancelling.

Each writer's flush takes its rows first and then queues their write on its writer thread.
Cancelling the flush between the two (``stop()`` cancelling the periodic task) would cancel a
write not yet begun and lose the rows it took. So the periodic task runs each flush through
``InFlight.run`` (shielded from the task's cancel) and ``stop()`` calls ``InFlight.wait``
before its own last flush.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class InFlight(Generic[T]):
    """The flush in flight, if any."""

    def __init__(self) -> None:
        self._flush: asyncio.Future[T] | None = None

    async def run(self, flush: Coroutine[Any, Any, T]) -> T:
        """Run ``flush`` to its end even if the caller is cancelled meanwhile."""
        future = self._flush = asyncio.ensure_future(flush)
        return await asyncio.shield(future)

    async def wait(self) -> None:
        """Wait for the flush in flight to end.

        Its failures are kept and logged by the flush itself; anything else it raised was
        raised in the periodic task already.
        """
        future, self._flush = self._flush, None
        if future is not None:
            with contextlib.suppress(Exception):
                await future
