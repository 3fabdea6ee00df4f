"""Calm behaviour during outages: capped exponential backoff with jitter, and failure logs
limited to one line per interval.

The edge's buffered writers (``routing.observe.recorder``, ``routing.observe.observations``)
retry a failed flush later, and the events API answers 503 to every batch while the database
is down. Left alone, a 20-second outage made hundreds of failed flushes per second and a
traceback for each.

``Backoff`` spaces attempts: after the n-th consecutive failure it waits
``d/2 + U(0, d/2)`` with ``d = min(max_s, base_s * 2**(n-1))`` ("equal jitter", Brooker,
"Exponential Backoff And Jitter", AWS Architecture Blog, 2015): at least half of the
exponential delay, so the attempts during an outage are bounded, and a random other half, so
the workers of many edge processes do not retry in step when the database returns.

``FailureLog`` reports the failures of one repeated operation: the first failure of an outage
with its traceback, then at most one line per ``interval_s`` with the counts since the last
line, and one line when the operation succeeds again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable


class Backoff:
    """The delay before the next attempt after consecutive failures (0 while healthy)."""

    __slots__ = ("_random", "base_s", "current_s", "failures", "max_s")

    def __init__(
        self, *, base_s: float, max_s: float, rng: Callable[[], float] = random.random
    ) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._random = rng
        self.failures = 0
        self.current_s = 0.0

    def failed(self) -> float:
        """Count a failure; returns the seconds to wait before the next attempt."""
        self.failures += 1
        # The exponent is capped too: 2**n of a long outage would overflow a float.
        exponential = min(self.max_s, self.base_s * 2.0 ** min(self.failures - 1, 60))
        self.current_s = exponential / 2.0 + self._random() * exponential / 2.0
        return self.current_s

    def succeeded(self) -> None:
        self.failures = 0
        self.current_s = 0.0


class FailureLog:
    """Logs an operation's failures: first one with traceback, then counts per interval."""

    __slots__ = (
        "_clock",
        "_last_line",
        "_logger",
        "_outage_started",
        "_since_line",
        "interval_s",
        "lines",
        "outage_failures",
        "what",
    )

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.what = what
        self.interval_s = interval_s
        self._clock = clock
        self.outage_failures = 0
        self._since_line = 0
        self._outage_started = 0.0
        self._last_line = 0.0
        self.lines = 0

    @property
    def failing(self) -> bool:
        return self.outage_failures > 0

    def failed(self, error: BaseException, detail: str = "") -> None:
        """Count a failure; log it if it starts an outage or an interval has passed."""
        now = self._clock()
        self.outage_failures += 1
        self._since_line += 1
        suffix = f"; {detail}" if detail else ""
        if self.outage_failures == 1:
            self._outage_started = self._last_line = now
            self._since_line = 0
            self.lines += 1
            self._logger.error(
                "%s failed (%s: %s)%s; further failures are reported every %.0f s",
                self.what,
                type(error).__name__,
                error,
                suffix,
                self.interval_s,
                exc_info=error,
            )
            return
        if now - self._last_line < self.interval_s:
            return
        self.lines += 1
        self._logger.error(
            "%s still failing after %.1f s: %d failure(s) in the last %.1f s, %d in all "
            "(last: %s: %s)%s",
            self.what,
            now - self._outage_started,
            self._since_line,
            now - self._last_line,
            self.outage_failures,
            type(error).__name__,
            error,
            suffix,
        )
        self._last_line = now
        self._since_line = 0

    def succeeded(self, detail: str = "") -> None:
        """End an outage, if one is on, with one line."""
        if not self.outage_failures:
            return
        self.lines += 1
        self._logger.warning(
            "%s works again after %.1f s and %d failure(s)%s",
            self.what,
            self._clock() - self._outage_started,
            self.outage_failures,
            f"; {detail}" if detail else "",
        )
        self.outage_failures = 0
        self._since_line = 0
