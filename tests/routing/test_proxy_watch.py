"""The proxy's disconnect watch: only requests still waiting after a period listen."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from routing.proxy.watch import DisconnectWatch, WatchSweep

PERIOD_S = 0.01


async def wait_until(condition: Any, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(PERIOD_S / 2)
    return True


def test_an_answered_request_never_listens_and_a_waiting_one_does() -> None:
    async def scenario() -> tuple[int, bool, bool, bool]:
        receives = 0

        async def receive() -> dict[str, Any]:
            nonlocal receives
            receives += 1
            await asyncio.sleep(60)  # the client stays
            return {"type": "http.disconnect"}

        sweep = WatchSweep(PERIOD_S)
        task = asyncio.current_task()
        answered = DisconnectWatch(receive, task)
        waiting = DisconnectWatch(receive, task)
        sweep.add(answered)
        sweep.add(waiting)
        answered.stop()  # answered within the period
        listening = await wait_until(lambda: waiting.listener is not None)
        # Several more periods: the answered request still has no listener.
        await asyncio.sleep(5 * PERIOD_S)
        waiting.stop()
        cancelled = waiting.listener is not None and await wait_until(waiting.listener.cancelled)
        # Nothing left to watch: the timer stops instead of waking the idle process.
        idle = await wait_until(lambda: sweep._handle is None)
        sweep.close()
        return receives, listening and answered.listener is None, cancelled, idle

    receives, only_the_waiting_one_listened, cancelled, idle = asyncio.run(scenario())
    assert receives == 1
    assert only_the_waiting_one_listened
    assert cancelled
    assert idle


def test_a_client_that_leaves_cancels_its_waiting_request() -> None:
    async def scenario() -> tuple[bool, bool]:
        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        sweep = WatchSweep(PERIOD_S)
        upstream_call = asyncio.get_running_loop().create_future()

        async def request() -> None:
            watch = DisconnectWatch(receive, asyncio.current_task())
            sweep.add(watch)
            try:
                await upstream_call  # never answers
            finally:
                watches.append(watch)

        watches: list[DisconnectWatch] = []
        task = asyncio.create_task(request())
        await asyncio.wait([task], timeout=2.0)
        sweep.close()
        return task.cancelled(), bool(watches) and watches[0].disconnected

    cancelled, disconnected = asyncio.run(scenario())
    assert cancelled
    assert disconnected
