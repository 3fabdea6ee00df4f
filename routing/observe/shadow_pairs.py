"""Paired latencies of a shadow and control on the same requests: one mergeable cell per bucket.

A shadow's answer and control's answer to the same request form a pair (same request, so the
same user, payload and moment). The user is the unit (STATS.md 12.1): a user's requests are not
independent (its inputs, payload sizes and region repeat), so each user contributes one pair,
that of its first mirrored request in the edge process whose claim on the user is stored first
(``routing.proxy.shadow`` decides which request, before any answer exists, and
``routing.observe.pair_claims`` which process, so neither rule looks at the outcome). Per
(experiment, shadow, time bucket) the proxy keeps, off the hot path (in the shadow's
background task, after control's answer was sent):

* ``n`` pairs, ``d`` of them with answers that differ, and for numeric answers the sum ``a``
  and sum of squares ``aa`` of the absolute difference;
* the moments of control's latency ``C`` and the shadow's ``S`` on them:
  sums ``c``, ``s``, sums of squares ``cc``, ``ss`` and the cross-product ``x`` (sum of ``C*S``).
  For any margin ``m`` the paired difference ``D = S - (1 + m) C`` has
  ``sum D = s - (1+m) c`` and ``sum D^2 = ss - 2 (1+m) x + (1+m)^2 cc``, so the mean test
  (``analysis.stats.shadow_pairs``) can take the margin chosen at analysis time.
* Both latencies per log bucket (``routing.observe.histogram``), on the same requests (the
  per-arm p95s, for context), and the per-pair latency ratio ``S / C`` per log bucket, for the
  paired p95 (``analysis.stats.paired_quantile``: the 95th percentile of ``S / C``). Both
  latencies are floored at ``MIN_VALUE_MS`` (1 microsecond) before dividing.

Stored as JSON text in ``ObservationBucket.pairs`` (format below); merging adds everything.
``{"n": 3, "d": 1, "a": 0.2, "aa": 0.04, "c": 30.1, "s": 33.0, "cc": 302.1, "ss": 363.2,
"x": 331.0, "hc": {...}, "hs": {...}, "hr": {...}}``
where ``hc`` / ``hs`` / ``hr`` are ``LogHistogram.to_dict()`` of control's latencies, the
shadow's and their ratio ``S / C``. Rows written before the ratio existed have no ``hr``: they
read as an empty ratio histogram, so the paired p95 counts only the pairs that have a ratio
(its sample size is ``ratio.count``, which may be below ``n``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from routing.observe.histogram import MIN_VALUE_MS, LogHistogram


class PairCell:
    """Sums over the pairs of one (experiment, shadow, bucket)."""

    __slots__ = ("a", "aa", "c", "cc", "control", "d", "n", "ratio", "s", "shadow", "ss", "x")

    def __init__(self) -> None:
        self.n = 0
        self.d = 0
        self.a = 0.0
        self.aa = 0.0
        self.c = 0.0
        self.s = 0.0
        self.cc = 0.0
        self.ss = 0.0
        self.x = 0.0
        self.control = LogHistogram()
        self.shadow = LogHistogram()
        self.ratio = LogHistogram()

    def add(
        self, control_ms: float, shadow_ms: float, *, disagreed: bool, abs_diff: float | None
    ) -> None:
        self.n += 1
        if disagreed:
            self.d += 1
        if abs_diff is not None:
            self.a += abs_diff
            self.aa += abs_diff * abs_diff
        self.c += control_ms
        self.s += shadow_ms
        self.cc += control_ms * control_ms
        self.ss += shadow_ms * shadow_ms
        self.x += control_ms * shadow_ms
        self.control.add(control_ms)
        self.shadow.add(shadow_ms)
        self.ratio.add(max(shadow_ms, MIN_VALUE_MS) / max(control_ms, MIN_VALUE_MS))

    def merge(self, other: PairCell) -> None:
        self.n += other.n
        self.d += other.d
        self.a += other.a
        self.aa += other.aa
        self.c += other.c
        self.s += other.s
        self.cc += other.cc
        self.ss += other.ss
        self.x += other.x
        self.control.merge(other.control)
        self.shadow.merge(other.shadow)
        self.ratio.merge(other.ratio)

    def to_json(self) -> str:
        return json.dumps(
            {
                "n": self.n,
                "d": self.d,
                "a": self.a,
                "aa": self.aa,
                "c": self.c,
                "s": self.s,
                "cc": self.cc,
                "ss": self.ss,
                "x": self.x,
                "hc": self.control.to_dict(),
                "hs": self.shadow.to_dict(),
                "hr": self.ratio.to_dict(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairCell:
        cell = cls()
        cell.n = int(data["n"])
        cell.d = int(data["d"])
        cell.a = float(data["a"])
        cell.aa = float(data["aa"])
        cell.c = float(data["c"])
        cell.s = float(data["s"])
        cell.cc = float(data["cc"])
        cell.ss = float(data["ss"])
        cell.x = float(data["x"])
        cell.control = LogHistogram.from_dict(data["hc"])
        cell.shadow = LogHistogram.from_dict(data["hs"])
        if "hr" in data:
            cell.ratio = LogHistogram.from_dict(data["hr"])
        return cell

    @classmethod
    def from_json(cls, text: str) -> PairCell:
        return cls.from_dict(json.loads(text))
