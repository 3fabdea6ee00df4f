"""Per-upstream circuit breaker for the routing proxy: stop calling a model that keeps failing.

States (the classic closed / open / half-open machine, Nygard, "Release It!", 2nd ed., ch. 5):

* closed: every request goes through; ``failure_threshold`` consecutive failures open it.
* open: no request goes through until ``cooldown_s`` seconds have passed since it opened.
* half-open: after the cooldown exactly one probe request goes through. Its success closes the
  breaker; its failure opens it again for another cooldown. Other requests arriving while the
  probe is in flight are refused, so a dead model sees one request per cooldown, not a burst.

A probe whose outcome is never reported (the client disconnected and the call was cancelled)
does not wedge the breaker: the next probe is allowed one cooldown after the previous one.

The breaker is pure bookkeeping: no I/O, no clock of its own beyond ``time.monotonic`` (which a
test can replace through ``clock``), and no locks, because the proxy calls it only from its
event loop thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, Literal

BreakerState = Literal["closed", "open", "half_open"]

# Numeric encoding for a Prometheus gauge: larger is worse.
STATE_VALUES: Final[dict[BreakerState, int]] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    """Consecutive-failure circuit breaker for one upstream."""

    __slots__ = (
        "_clock",
        "_consecutive_failures",
        "_cooldown_s",
        "_failure_threshold",
        "_next_probe_at",
        "_on_change",
        "_state",
        "name",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.name = name
        self._failure_threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._consecutive_failures = 0
        self._next_probe_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose cooldown elapsed still reads "open")."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def allow(self) -> bool:
        """Whether a request may be sent now; in half-open, True admits the single probe."""
        if self._state == "closed":
            return True
        now = self._clock()
        if now < self._next_probe_at:
            return False
        # Cooldown over: admit one probe and refuse everyone else for another cooldown.
        self._next_probe_at = now + self._cooldown_s
        self._set_state("half_open")
        return True

    def record_success(self) -> None:
        """Report a successful call: closes a half-open (or open) breaker."""
        self._consecutive_failures = 0
        if self._state != "closed":
            self._set_state("closed")

    def record_failure(self) -> None:
        """Report a failed call (5xx, timeout or connection failure)."""
        self._consecutive_failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self._consecutive_failures >= self._failure_threshold
        ):
            self._next_probe_at = self._clock() + self._cooldown_s
            self._set_state("open")

    def _set_state(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(self.name, state)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.name!r}, state={self._state}, "
            f"failures={self._consecutive_failures})"
        )
