"""Per-user request and failure counts within fixed windows after the user's first request.

Rate guardrails take the user as the unit (STATS.md 12.1): a user's requests are not
independent, so each user contributes one outcome, the share of its requests that failed
within a window after its first request. The proxy counts them here, per edge process:

* A user's `UnitTally` starts at the first request of the user this process sees complete
  (``first_seen``), with the probability of the user's arm and of control under the routing
  snapshot that served it (the ramp step then). Requests completing within
  ``fast_s`` / ``slow_s`` of ``first_seen`` count in the fast / slow window; later ones are
  not counted. The rule never looks at the outcome.
* The hot path is one dict lookup per request, a few additions and, for the latency
  buckets, one logarithm and one or two dict increments (``UnitTally.add``).
  The observation flusher (``routing.observe.observations``) drains the users whose fast or slow
  window has closed with its own rows and upserts them into ``routing.models.UnitOutcome``
  off the event loop: two writes per user at most, each within one flush of the window's end.
* Several processes may serve one user. The upsert keeps the counts of the process with the
  earliest ``first_seen``: a contribution with an earlier start replaces the row's counts,
  one with the same start (the same process, a later flush) adds to them, a later one is
  ignored. So a user's outcome is "the requests the process that served its first request
  saw within the window", exact and independent of the outcomes.
* Per window, the user's latencies are also counted per log bucket (the bucket index of
  ``routing.observe.histogram``, a dict increment per request), so the quantile guardrail can ask
  how many of the user's requests were slower than a threshold chosen later
  (``analysis.quantile_guardrails``). Each window's counts are written once per process, when
  the window closes, as ``"index:count,..."`` text; the upsert replaces rather than adds them.
* A tally whose slow window has closed stays as a tombstone (so the user's later requests
  open no new window in this process) until the book holds ``max_units`` users; then the
  tombstones go. Past the cap with open windows only, new users are not tracked (counted in
  ``untracked``): they are left out of the rate guardrail, which stays valid (which users
  are bet on does not depend on their outcomes).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from routing.observe.histogram import DEFAULT_RELATIVE_ACCURACY, MAX_VALUE_MS, MIN_VALUE_MS

# (experiment id, unit, variant, first_seen, share, control_share, requests_fast,
# errors_fast, requests_slow, errors_slow, latency_sum, latency_sum_sq, latency_count,
# latency_buckets_fast, latency_buckets_slow)
UnitRow = tuple[int, str, str, float, float, float, int, int, int, int, float, float, int, str, str]

# routing.observe.histogram's bucket rule (i = ceil(log(x) / log(gamma))) at its default accuracy.
_INVERSE_LOG_GAMMA = 1.0 / math.log(
    (1.0 + DEFAULT_RELATIVE_ACCURACY) / (1.0 - DEFAULT_RELATIVE_ACCURACY)
)
_log, _ceil = math.log, math.ceil
# take(closing=...): the windows that close with this write (their bucket counts go with it).
NO_WINDOW, FAST_WINDOW, SLOW_WINDOW = 0, 1, 2


def encode_buckets(counts: Mapping[int, int]) -> str:
    """``{index: count}`` as ``"index:count,..."`` in index order ("" when empty)."""
    return ",".join(f"{index}:{counts[index]}" for index in sorted(counts))


def decode_buckets(text: str) -> dict[int, int]:
    """The inverse of `encode_buckets`."""
    if not text:
        return {}
    pairs = (item.split(":") for item in text.split(","))
    return {int(index): int(count) for index, count in pairs}


class UnitTally:
    """One user's counts not yet written, and where its windows start."""

    __slots__ = (
        "buckets_fast",
        "buckets_slow",
        "control_share",
        "created",
        "errors_fast",
        "errors_slow",
        "experiment_id",
        "fast_s",
        "fast_text",
        "first_seen",
        "latency_count",
        "latency_sum",
        "latency_sum_sq",
        "requests_fast",
        "requests_slow",
        "retry",
        "share",
        "slow_s",
        "slow_text",
        "stage",
        "unit",
        "variant_key",
    )

    def __init__(
        self,
        experiment_id: int,
        unit: str,
        variant_key: str,
        share: float,
        control_share: float,
        *,
        fast_s: float,
        slow_s: float,
        created: float,
    ) -> None:
        self.experiment_id = experiment_id
        self.unit = unit
        self.variant_key = variant_key
        self.share = share
        self.control_share = control_share
        self.fast_s = fast_s
        self.slow_s = slow_s
        self.created = created
        # 0: waiting for the fast window, 1: for the slow one, 2: done; retry: counts put
        # back after a failed write, written at the next drain.
        self.stage = 0
        self.retry = False
        self.first_seen = -1.0
        self.requests_fast = self.errors_fast = 0
        self.requests_slow = self.errors_slow = 0
        self.latency_sum = self.latency_sum_sq = 0.0
        self.latency_count = 0
        # Latency bucket counts per window (None once written), and written ones put back
        # after a failed write.
        self.buckets_fast: dict[int, int] | None = {}
        self.buckets_slow: dict[int, int] | None = {}
        self.fast_text = self.slow_text = ""

    def add(self, now: float, error: bool, latency_ms: float | None) -> None:
        """Count one completed request of this user (hot path)."""
        first = self.first_seen
        if first < 0:
            first = self.first_seen = now
        age = now - first
        if age > self.slow_s:
            return
        self.requests_slow += 1
        if error:
            self.errors_slow += 1
        if latency_ms is None:
            if age <= self.fast_s:
                self.requests_fast += 1
                if error:
                    self.errors_fast += 1
            return
        self.latency_sum += latency_ms
        self.latency_sum_sq += latency_ms * latency_ms
        self.latency_count += 1
        if not MIN_VALUE_MS <= latency_ms <= MAX_VALUE_MS:
            latency_ms = min(max(latency_ms, MIN_VALUE_MS), MAX_VALUE_MS)
        index = _ceil(_log(latency_ms) * _INVERSE_LOG_GAMMA)
        buckets = self.buckets_slow
        if buckets is not None:
            buckets[index] = buckets.get(index, 0) + 1
        if age <= self.fast_s:
            self.requests_fast += 1
            if error:
                self.errors_fast += 1
            buckets = self.buckets_fast
            if buckets is not None:
                buckets[index] = buckets.get(index, 0) + 1

    def take(self, closing: int = NO_WINDOW) -> UnitRow:
        """This tally's counts not yet written, as a row; the counts start again at 0.

        ``closing`` names the windows that have just closed (`FAST_WINDOW` | `SLOW_WINDOW`):
        their latency bucket counts are written with this row, once.
        """
        fast_text, slow_text = self.fast_text, self.slow_text
        self.fast_text = self.slow_text = ""
        if closing & FAST_WINDOW and self.buckets_fast is not None:
            fast_text = encode_buckets(self.buckets_fast)
            self.buckets_fast = None
        if closing & SLOW_WINDOW and self.buckets_slow is not None:
            slow_text = encode_buckets(self.buckets_slow)
            self.buckets_slow = None
        row = (
            self.experiment_id,
            self.unit,
            self.variant_key,
            self.first_seen,
            self.share,
            self.control_share,
            self.requests_fast,
            self.errors_fast,
            self.requests_slow,
            self.errors_slow,
            self.latency_sum,
            self.latency_sum_sq,
            self.latency_count,
            fast_text,
            slow_text,
        )
        self.requests_fast = self.errors_fast = 0
        self.requests_slow = self.errors_slow = 0
        self.latency_sum = self.latency_sum_sq = 0.0
        self.latency_count = 0
        return row


class UnitOutcomeBook:
    """The tallies of one edge process, by experiment and unit.

    A user's counts are written twice at most: once its fast window has closed (everything
    counted so far) and once its slow window has closed (what came after), so the database
    sees two upserts per user however many requests it sends. `drain` finds the users due:
    those waiting for the fast window are scanned (few: the last `fast_s` seconds' new users),
    those waiting for the slow one sit in a deque ordered by first request.
    """

    def __init__(
        self,
        *,
        fast_s: float,
        slow_s: float,
        max_units: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= fast_s <= slow_s:
            raise ValueError(f"need 0 <= fast_s <= slow_s, got {fast_s} and {slow_s}")
        self.fast_s = fast_s
        self.slow_s = slow_s
        self.max_units = max_units
        self._clock = clock
        self._tallies: dict[int, dict[str, UnitTally]] = {}
        self._size = 0
        self._fast: list[UnitTally] = []
        self._slow: deque[UnitTally] = deque()
        self._retry: list[UnitTally] = []
        self.untracked = 0

    def tally(
        self, experiment_id: int, unit: str, variant_key: str, shares: Mapping[str, float]
    ) -> UnitTally | None:
        """The user's tally (created at its first request here), or None when not tracked.

        ``shares`` maps each routed variant to its assignment probability now; control's
        is under the key ``""``.
        """
        units = self._tallies.get(experiment_id)
        if units is None:
            units = self._tallies[experiment_id] = {}
        tally = units.get(unit)
        if tally is not None:
            return tally
        if self._size >= self.max_units and not self._evict():
            self.untracked += 1
            return None
        tally = units[unit] = UnitTally(
            experiment_id,
            unit,
            variant_key,
            shares[variant_key],
            shares[""],
            fast_s=self.fast_s,
            slow_s=self.slow_s,
            created=self._clock(),
        )
        self._fast.append(tally)
        self._size += 1
        return tally

    def _evict(self) -> bool:
        """Drop every tally whose slow window has closed and which has nothing to write."""
        closed_before = self._clock() - self.slow_s
        for units in self._tallies.values():
            for unit in [
                u
                for u, t in units.items()
                if t.stage == 2 and not t.retry and t.first_seen < closed_before
            ]:
                del units[unit]
        self._size = sum(len(units) for units in self._tallies.values())
        return self._size < self.max_units

    @property
    def size(self) -> int:
        return self._size

    def drain(self, *, everything: bool = False) -> list[UnitRow]:
        """The counts of the users whose fast or slow window has closed since the last drain.

        ``everything`` (on shutdown) writes every user's counts so far, windows open or not.
        """
        now = self._clock()
        rows = [tally.take() for tally in self._retry]
        for tally in self._retry:
            tally.retry = False
        self._retry = []
        waiting: list[UnitTally] = []
        closed: list[UnitTally] = []
        for tally in self._fast:
            first = tally.first_seen
            if first < 0:
                # The first request has not completed; forget one that never will.
                if now - tally.created <= self.slow_s:
                    waiting.append(tally)
                else:
                    tally.stage = 2
            elif everything or first + self.fast_s < now:
                # Both windows may close at once (a late drain, shutdown): one write.
                both = everything or first + self.slow_s < now
                rows.append(tally.take(FAST_WINDOW | SLOW_WINDOW if both else FAST_WINDOW))
                tally.stage = 1
                closed.append(tally)
            else:
                waiting.append(tally)
        self._fast = waiting
        closed.sort(key=lambda t: t.first_seen)
        self._slow.extend(closed)
        slow = self._slow
        while slow and (everything or slow[0].first_seen + self.slow_s < now):
            tally = slow.popleft()
            tally.stage = 2
            if tally.requests_slow or tally.buckets_slow:
                rows.append(tally.take(SLOW_WINDOW))
        return rows

    def restore(self, rows: Sequence[UnitRow]) -> None:
        """Put drained counts back after a failed write (sums, so merging is exact)."""
        for row in rows:
            tally = self._tallies.get(row[0], {}).get(row[1])
            if tally is None or tally.first_seen != row[3]:
                continue
            tally.requests_fast += row[6]
            tally.errors_fast += row[7]
            tally.requests_slow += row[8]
            tally.errors_slow += row[9]
            tally.latency_sum += row[10]
            tally.latency_sum_sq += row[11]
            tally.latency_count += row[12]
            tally.fast_text = row[13] or tally.fast_text
            tally.slow_text = row[14] or tally.slow_text
            if not tally.retry:
                tally.retry = True
                self._retry.append(tally)


_COLUMNS = (
    "experiment_id",
    "unit_id",
    "variant_key",
    "first_seen",
    "share",
    "control_share",
    "requests_fast",
    "errors_fast",
    "requests_slow",
    "errors_slow",
    "latency_sum",
    "latency_sum_sq",
    "latency_count",
    "latency_buckets_fast",
    "latency_buckets_slow",
)
_KEPT = ("variant_key", "share", "control_share")
_COUNTS = _COLUMNS[6:13]
# Written once per process and window: replaced, not added (an empty value keeps the row's).
_WRITTEN_ONCE = _COLUMNS[13:]


def _upsert_sql(
    table: str,
    columns: Sequence[str] = _COLUMNS,
    counts: Sequence[str] = _COUNTS,
    written_once: Sequence[str] = _WRITTEN_ONCE,
) -> str:
    """INSERT ... ON CONFLICT DO UPDATE keeping the earliest start (SQLite >= 3.24 and PG)."""
    earlier = f"excluded.first_seen < {table}.first_seen"
    same = f"excluded.first_seen = {table}.first_seen"
    updates = [
        f"first_seen = CASE WHEN {earlier} THEN excluded.first_seen ELSE {table}.first_seen END"
    ]
    updates += [
        f"{column} = CASE WHEN {earlier} THEN excluded.{column} ELSE {table}.{column} END"
        for column in _KEPT
    ]
    updates += [
        f"{column} = CASE WHEN {earlier} THEN excluded.{column} "
        f"WHEN {same} THEN {table}.{column} + excluded.{column} ELSE {table}.{column} END"
        for column in counts
    ]
    updates += [
        f"{column} = CASE WHEN {earlier} THEN excluded.{column} "
        f"WHEN {same} AND excluded.{column} <> '' THEN excluded.{column} "
        f"ELSE {table}.{column} END"
        for column in written_once
    ]
    placeholders = ", ".join(["%s"] * len(columns))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "
        f"ON CONFLICT (experiment_id, unit_id) DO UPDATE SET {', '.join(updates)}"
    )


def write_unit_rows(rows: Sequence[UnitRow], *, batch_rows: int = 1000) -> int:
    """Upsert drained tallies into UnitOutcome; rows of deleted experiments are skipped."""
    from routing.models import UnitOutcome

    return upsert_unit_rows(UnitOutcome, rows, batch_rows=batch_rows)


def upsert_unit_rows(
    model: type,
    rows: Sequence[tuple[Any, ...]],
    *,
    columns: Sequence[str] = _COLUMNS,
    counts: Sequence[str] = _COUNTS,
    written_once: Sequence[str] = _WRITTEN_ONCE,
    batch_rows: int = 1000,
) -> int:
    """Upsert per-user rows (``columns`` in order: experiment, unit, variant, first_seen,
    share, control_share, then ``counts`` added and ``written_once`` texts) into ``model``'s
    table with the earliest-start rule; rows of deleted experiments are skipped."""
    from django.db import IntegrityError, connection, transaction

    from experiments.selectors import experiment_view_by_id

    if not rows:
        return 0
    table = connection.ops.quote_name(model._meta.db_table)  # type: ignore[attr-defined]
    sql = _upsert_sql(table, columns, counts, written_once)

    def write(batch: Sequence[tuple[Any, ...]]) -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            for start in range(0, len(batch), batch_rows):
                cursor.executemany(sql, list(batch[start : start + batch_rows]))

    try:
        write(rows)
    except IntegrityError:
        existing = {
            experiment_id
            for experiment_id in {row[0] for row in rows}
            if experiment_view_by_id(experiment_id=experiment_id) is not None
        }
        rows = [row for row in rows if row[0] in existing]
        write(rows)
    return len(rows)
