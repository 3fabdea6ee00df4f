"""Input drift's windows and users (pure): which sampled user counts in which window.

Shared by the proxy, which counts (``routing.proxy.inputs``), and the analysis, which sums the
counts per window (``analysis.input_drift``); both place a count by its bucket's start, so they
agree on every bucket. The user is the unit (``analysis.stats.input_drift``):

* a user is sampled when its hash share ``unit_share`` is below the sample rate, so sampling
  selects users, not requests; a sampled user counts at most once per window (its first
  request there), which the proxy enforces;
* time is cut into windows of one length L: with a pinned reference window [start, end), L is
  min(INPUT_DRIFT_WINDOW_S, end - start), the reference holds K = floor((end - start) / L)
  whole windows from its start (a last partial one is left out) and the monitoring windows
  k = 1, 2, ... follow from its end; with a training reference the monitoring windows start
  at the experiment's start;
* with a pinned reference the sampled users split by hash into disjoint halves: the first
  half is the reference's, and each of its users counts in one reference window only (the
  one its hash picks), so the reference has the law of one window and shares no user with
  the monitoring; the other half is monitored, once per window. With a training reference
  every sampled user is monitored.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

# Fibonacci hashing constant: spreads CRC-32's bits over the high ones (Knuth, TAOCP 6.4).
MIX: Final = 0x9E3779B1
_MASK: Final = 0xFFFFFFFF
SCALE: Final = 2.0**32


def unit_hash(unit: str) -> int:
    """A stable 32-bit hash of a unit, the same in every process (CRC-32, then mixed)."""
    return (zlib.crc32(unit.encode()) * MIX) & _MASK


def sample_cut(rate: float) -> int:
    """Users with ``unit_hash`` below this are sampled (a share ``rate`` of them)."""
    return min(int(rate * SCALE), int(SCALE))


class InputWindows:
    """The windows of one experiment's input drift (see the module's docstring)."""

    __slots__ = ("length", "origin", "reference_end", "reference_start", "reference_windows")

    def __init__(self, *, reference: tuple[float, float] | None, started: float, window_s: float):
        if reference is None:
            self.reference_start = self.reference_end = None
            self.length = float(window_s)
            self.reference_windows = 0
            self.origin = float(started)
        else:
            start, end = reference
            span = end - start
            if span <= 0:
                raise ValueError("the reference window must end after it starts")
            self.reference_start, self.reference_end = float(start), float(end)
            self.length = min(float(window_s), span)
            self.reference_windows = max(1, math.floor(span / self.length + 1e-9))
            self.origin = float(end)

    @property
    def key(self) -> tuple[float | None, float, float]:
        """What identifies these windows (the proxy's seen users reset when it changes)."""
        return (self.reference_start, self.origin, self.length)

    def slot(self, bucket: float) -> int | None:
        """The window of a bucket starting at `bucket`: reference windows -K .. -1, monitoring
        windows 1, 2, ...; None outside them (before, or the reference's partial tail)."""
        if bucket >= self.origin:
            return int((bucket - self.origin) // self.length) + 1
        start = self.reference_start
        if start is None or bucket < start:
            return None
        index = int((bucket - start) // self.length)
        if index >= self.reference_windows:
            return None
        return index - self.reference_windows

    def counts(self, slot: int, share: float) -> bool:
        """Whether a sampled user with hash share `share` (uniform in [0, 1)) counts in `slot`."""
        if self.reference_start is None:
            return True
        if slot > 0:
            return share >= 0.5
        return share < 0.5 and int(share * 2 * self.reference_windows) == (
            slot + self.reference_windows
        )

    def bounds(self, slot: int) -> tuple[float, float]:
        """[start, end) of a window, in epoch seconds."""
        if slot > 0:
            start = self.origin + (slot - 1) * self.length
        else:
            assert self.reference_start is not None
            start = self.reference_start + (slot + self.reference_windows) * self.length
        return start, start + self.length

    def last_closed(self, now: float) -> int:
        """The last monitoring window ended by `now` (0 when none has)."""
        return max(0, math.floor((now - self.origin) / self.length + 1e-9))


def reference_span(
    reference: Mapping[str, Any] | None, started: datetime | None, reference_s: float
) -> tuple[float, float] | None:
    """The pinned reference window [start, end) in epoch seconds: the configured one, else the
    experiment's first `reference_s` seconds (None before it starts); None for a training one."""
    if reference is not None and reference.get("type") == "training":
        return None
    if reference is not None and reference.get("type") == "window":
        start = datetime.fromisoformat(str(reference["start"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(reference["end"]).replace("Z", "+00:00"))
        return start.timestamp(), end.timestamp()
    if started is None:
        return None
    return started.timestamp(), started.timestamp() + reference_s


def windows_for(
    reference: Mapping[str, Any] | None,
    started: datetime | None,
    *,
    reference_s: float,
    window_s: float,
) -> InputWindows | None:
    """An experiment's windows; None when they are not fixed yet (not started, no window)."""
    span = reference_span(reference, started, reference_s)
    training = reference is not None and reference.get("type") == "training"
    if span is None and not training:
        return None
    if span is None:
        if started is None:
            return None
        return InputWindows(reference=None, started=started.timestamp(), window_s=window_s)
    return InputWindows(reference=span, started=span[1], window_s=window_s)
