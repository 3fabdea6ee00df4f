"""Per-user sums of generative answers (TTFT, tokens, rate, cost) within the users' windows.

The LLM guardrails take the user as the unit, like latency (STATS.md 12.1, Rampart issue 17):
a user's answers share its prompts, its client and its region, so they are not independent.
This book folds, per user, what the proxy measured of each generative answer
(``routing.observe.llm_stats.LLMRecord``) into the same windows as the user's requests
(``routing.observe.unit_outcomes.UnitTally``: its ``first_seen``, RATE_WINDOW_FAST_S and
RATE_WINDOW_SLOW_S), and the observation flusher upserts them into
``routing.models.UnitLLMOutcome`` with the earliest-start rule of ``UnitOutcome``.

Per user and window
    * ``answers_fast`` / ``answers_slow``: generative answers recorded in the window;
    * the slow window's TTFT, output-token, rate and cost sums with their counts (the mean
      guardrails compare sum over count per user with the delta method,
      ``analysis.stats.latency_mean``; sums of squares are computed from these in SQL);
    * per window, the TTFTs per ``routing.observe.histogram`` bucket (``"index:count,..."``,
      written once, when the window closes), for the p95 TTFT guardrail
      (``analysis.quantile_guardrails``).

Cost: nothing for plain requests (the book is only called from ``observe_llm``, for answers the
proxy already measures as generative); per generative answer one dict lookup, a few additions
and, with a TTFT, one logarithm. A user's tally is made at its first generative answer and
written at most twice (once each window closes), found by two heaps keyed by the closing time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence

from routing.observe.histogram import DEFAULT_RELATIVE_ACCURACY, MAX_VALUE_MS, MIN_VALUE_MS
from routing.observe.llm_stats import LLMRecord
from routing.observe.unit_outcomes import UnitTally, encode_buckets, upsert_unit_rows

# (experiment id, unit, variant, first_seen, share, control_share, answers_fast, answers_slow,
# ttft_sum, ttft_count, output_tokens_sum, output_tokens_count, rate_sum, rate_count,
# cost_sum, cost_count, ttft_buckets_fast, ttft_buckets_slow)
LLMUnitRow = tuple[
    int, str, str, float, float, float, int, int, float, int, float, int, float, int, float, int,
    str, str,
]  # fmt: skip

COLUMNS = (
    "experiment_id",
    "unit_id",
    "variant_key",
    "first_seen",
    "share",
    "control_share",
    "answers_fast",
    "answers_slow",
    "ttft_sum",
    "ttft_count",
    "output_tokens_sum",
    "output_tokens_count",
    "rate_sum",
    "rate_count",
    "cost_sum",
    "cost_count",
    "ttft_buckets_fast",
    "ttft_buckets_slow",
)
_COUNTS = COLUMNS[6:16]
_WRITTEN_ONCE = COLUMNS[16:]
# routing.observe.histogram's bucket rule (i = ceil(log(x) / log(gamma))) at its default accuracy.
_INVERSE_LOG_GAMMA = 1.0 / math.log(
    (1.0 + DEFAULT_RELATIVE_ACCURACY) / (1.0 - DEFAULT_RELATIVE_ACCURACY)
)
_log, _ceil = math.log, math.ceil


def ttft_bucket(ttft_ms: float) -> int:
    """The ``routing.observe.histogram`` bucket of a TTFT (clamped to the recordable range)."""
    if not MIN_VALUE_MS <= ttft_ms <= MAX_VALUE_MS:
        ttft_ms = min(max(ttft_ms, MIN_VALUE_MS), MAX_VALUE_MS)
    return _ceil(_log(ttft_ms) * _INVERSE_LOG_GAMMA)


class LLMUnitTally:
    """One user's generative answers not yet written."""

    __slots__ = (
        "answers_fast",
        "answers_slow",
        "buckets_fast",
        "buckets_slow",
        "cost_count",
        "cost_sum",
        "rate_count",
        "rate_sum",
        "tally",
        "tokens_count",
        "tokens_sum",
        "ttft_count",
        "ttft_sum",
    )

    def __init__(self, tally: UnitTally) -> None:
        self.tally = tally
        self.buckets_fast: dict[int, int] | None = {}
        self.buckets_slow: dict[int, int] | None = {}
        self._zero()

    def _zero(self) -> None:
        self.answers_fast = self.answers_slow = 0
        self.ttft_sum = self.tokens_sum = self.rate_sum = self.cost_sum = 0.0
        self.ttft_count = self.tokens_count = self.rate_count = self.cost_count = 0

    def add(self, age: float, record: LLMRecord) -> None:
        """Count one answer completed ``age`` seconds after the user's first request."""
        tally = self.tally
        if age > tally.slow_s:
            return
        fast = age <= tally.fast_s
        self.answers_slow += 1
        if fast:
            self.answers_fast += 1
        ttft = record.ttft_ms
        if ttft is not None:
            self.ttft_sum += ttft
            self.ttft_count += 1
            index = ttft_bucket(ttft)
            buckets = self.buckets_slow
            if buckets is not None:
                buckets[index] = buckets.get(index, 0) + 1
            if fast:
                buckets = self.buckets_fast
                if buckets is not None:
                    buckets[index] = buckets.get(index, 0) + 1
        output = record.output_tokens
        if output is None:
            return
        self.tokens_sum += output
        self.tokens_count += 1
        if record.duration_ms > 0:
            # The same per-request rate as routing.observe.llm_stats.LLMCell.
            self.rate_sum += output * 1000.0 / record.duration_ms
            self.rate_count += 1
        cost = record.cost
        if cost is not None and math.isfinite(cost):
            self.cost_sum += cost
            self.cost_count += 1

    def take(self, *, fast_closed: bool, slow_closed: bool) -> LLMUnitRow:
        """The counts not yet written, with the bucket counts of the windows closing now."""
        fast_text = slow_text = ""
        if fast_closed and self.buckets_fast is not None:
            fast_text, self.buckets_fast = encode_buckets(self.buckets_fast), None
        if slow_closed and self.buckets_slow is not None:
            slow_text, self.buckets_slow = encode_buckets(self.buckets_slow), None
        tally = self.tally
        row = (
            tally.experiment_id,
            tally.unit,
            tally.variant_key,
            tally.first_seen,
            tally.share,
            tally.control_share,
            self.answers_fast,
            self.answers_slow,
            self.ttft_sum,
            self.ttft_count,
            self.tokens_sum,
            self.tokens_count,
            self.rate_sum,
            self.rate_count,
            self.cost_sum,
            self.cost_count,
            fast_text,
            slow_text,
        )
        self._zero()
        return row


class UnitLLMBook:
    """The per-user LLM tallies of one edge process, drained with the observations."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tallies: dict[UnitTally, LLMUnitTally] = {}
        self._order = itertools.count()
        # (closing time, order, tally): the fast windows, then the slow ones.
        self._fast: list[tuple[float, int, LLMUnitTally]] = []
        self._slow: list[tuple[float, int, LLMUnitTally]] = []
        self._retry: list[LLMUnitRow] = []

    def __len__(self) -> int:
        return len(self._tallies)

    def add(self, tally: UnitTally, record: LLMRecord, now: float) -> None:
        """Count one generative answer of a tracked user (called from ``observe_llm``)."""
        first = tally.first_seen
        if first < 0 or now - first > tally.slow_s:
            # No completed request yet (a client that left first), or past the slow window.
            return
        entry = self._tallies.get(tally)
        if entry is None:
            entry = self._tallies[tally] = LLMUnitTally(tally)
            heapq.heappush(self._fast, (first + tally.fast_s, next(self._order), entry))
        entry.add(now - first, record)

    def drain(self, *, everything: bool = False) -> list[LLMUnitRow]:
        """Rows of the users whose fast or slow window closed since the last drain (all of
        them with ``everything``), plus rows whose write failed before."""
        now = self._clock()
        rows, self._retry = self._retry, []
        fast, slow = self._fast, self._slow
        while fast and (everything or fast[0][0] < now):
            _, order, entry = heapq.heappop(fast)
            tally = entry.tally
            both = everything or tally.first_seen + tally.slow_s < now
            rows.append(entry.take(fast_closed=True, slow_closed=both))
            if both:
                del self._tallies[tally]
            else:
                heapq.heappush(slow, (tally.first_seen + tally.slow_s, order, entry))
        while slow and (everything or slow[0][0] < now):
            _, _, entry = heapq.heappop(slow)
            del self._tallies[entry.tally]
            rows.append(entry.take(fast_closed=False, slow_closed=True))
        return rows

    def restore(self, rows: Sequence[LLMUnitRow]) -> None:
        """Keep rows that were not written for the next drain (sums and written-once texts:
        writing them later gives the same table)."""
        self._retry.extend(rows)


def write_llm_unit_rows(rows: Sequence[LLMUnitRow], *, batch_rows: int = 1000) -> int:
    """Upsert drained LLM tallies into UnitLLMOutcome (earliest start wins, as UnitOutcome)."""
    from routing.models import UnitLLMOutcome

    return upsert_unit_rows(
        UnitLLMOutcome,
        rows,
        columns=COLUMNS,
        counts=_COUNTS,
        written_once=_WRITTEN_ONCE,
        batch_rows=batch_rows,
    )
