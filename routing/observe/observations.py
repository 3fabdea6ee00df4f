"""In-memory pre-aggregation of proxied requests into mergeable per-bucket statistics.

The proxy reports every forwarded request here. Nothing is stored per request: observations
are summed into one cell per (experiment, variant, shadow or not, time bucket of
OBSERVATION_BUCKET_S seconds), and the cells are appended as ``routing.models.ObservationBucket``
rows by a background flusher at least every RECORDER_FLUSH_S seconds (and on shutdown). So
storage grows with time and arms, not with request volume.

What a cell's fields mean (the contract analysis reads):

* ``count``: requests the arm was responsible for: every upstream attempt, plus every request
  of a non-control arm that an open circuit breaker sent straight to control. Cache hits are
  not in ``count``.
* ``error_count``: those of ``count`` that failed: a 5xx answer, a timeout, a connection
  failure, or a breaker short-circuit. The error rate is ``error_count / count``.
* ``latency_histogram`` (a ``routing.observe.histogram.LogHistogram``), ``latency_sum`` and
  ``latency_sum_sq``: the upstream latency in ms of every upstream attempt, failed ones
  included (a timeout is recorded at the time it took to time out). Breaker short-circuits
  have no latency, so the latency sample size is the histogram's count, which is at most
  ``count``; mean latency is ``latency_sum / histogram.count``.
* A request whose client disconnected before the answer (the upstream call is then
  cancelled) is in ``count``, not an error, with the time until the proxy noticed the
  departure as its latency (at once, or 50-100 ms into the request for a client that left
  earlier; see ``routing.proxy``): a lower bound, as the upstream had not answered yet, kept
  because clients give up on slow answers and dropping those requests would flatter a slow
  arm.
* ``fallback_count``: those of ``count`` that control answered instead of the arm.
* ``cache_hits``: requests answered from the prediction cache (no upstream call, in no other
  field).
* Shadow rows (``is_shadow``) describe the mirrored copies sent to a shadow variant, plus the
  paired comparison with control's answer to the same request: ``compared_count`` pairs were
  compared, ``disagreement_count`` of them differed, and for a numeric comparison field
  ``abs_diff_sum`` / ``abs_diff_sum_sq`` sum |shadow - control| and its square.
* ``llm``: for answers the proxy measured further (streamed answers, completion endpoints),
  their TTFB, TTFT, chunks, tokens, rates and cost (``routing.observe.llm_stats`` says what each
  counts); recorded for the assigned arm's own answers, like latency (not for fallbacks).

A flush that fails keeps its cells: they are merged back into the buffer (the statistics are
sums, so merging is exact) and written by the next flush. The buffer is capped at
RECORDER_MAX_BUFFER cells; past it the oldest cells are dropped and counted. While flushes
fail, the next waits a capped exponential backoff with jitter instead of the flush interval,
and the failures are logged once per interval with counts (``routing.observe.backoff``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from routing.observe import metrics
from routing.observe.backoff import Backoff, FailureLog
from routing.observe.histogram import LogHistogram
from routing.observe.in_flight import InFlight
from routing.observe.llm_costs import UnitCosts
from routing.observe.llm_stats import LLMCell, LLMRecord
from routing.observe.observation_store import (
    CostsUnwritten,
    LLMUnitsUnwritten,
    UnitsUnwritten,
    close_connections,
    write_all,
)
from routing.observe.pair_claims import PairClaims
from routing.observe.pair_recording import PairRecording
from routing.observe.shadow_pairs import PairCell
from routing.observe.unit_llm import UnitLLMBook
from routing.observe.unit_outcomes import UnitOutcomeBook, UnitTally

logger = logging.getLogger(__name__)

# (experiment id, variant key, is_shadow, bucket number = floor(epoch seconds / bucket width))
CellKey = tuple[int, str, bool, int]


class ObservationCell:
    """Mergeable statistics of one (experiment, variant, shadow flag, time bucket)."""

    __slots__ = (
        "abs_diff_sum",
        "abs_diff_sum_sq",
        "cache_hits",
        "compared_count",
        "count",
        "disagreement_count",
        "error_count",
        "fallback_count",
        "histogram",
        "llm",
        "pairs",
    )

    def __init__(self) -> None:
        self.count = 0
        self.error_count = 0
        self.fallback_count = 0
        self.cache_hits = 0
        self.compared_count = 0
        self.disagreement_count = 0
        self.abs_diff_sum = 0.0
        self.abs_diff_sum_sq = 0.0
        self.histogram = LogHistogram()
        # Generative answers' statistics (routing.observe.llm_stats), made on the first such answer.
        self.llm: LLMCell | None = None
        # A shadow's latencies paired with control's (routing.observe.shadow_pairs), made on the
        # first pair.
        self.pairs: PairCell | None = None

    def merge(self, other: ObservationCell) -> None:
        self.count += other.count
        self.error_count += other.error_count
        self.fallback_count += other.fallback_count
        self.cache_hits += other.cache_hits
        self.compared_count += other.compared_count
        self.disagreement_count += other.disagreement_count
        self.abs_diff_sum += other.abs_diff_sum
        self.abs_diff_sum_sq += other.abs_diff_sum_sq
        self.histogram.merge(other.histogram)
        if other.llm is not None:
            if self.llm is None:
                self.llm = LLMCell()
            self.llm.merge(other.llm)
        if other.pairs is not None:
            if self.pairs is None:
                self.pairs = PairCell()
            self.pairs.merge(other.pairs)


@dataclass(frozen=True, slots=True)
class ObservationStats:
    """Counters of one aggregator since it was created."""

    observed: int
    cache_hits: int
    buffered_cells: int
    rows_written: int
    flushes: int
    failed_flushes: int
    dropped_cells: int


class ObservationAggregator(PairRecording):
    """Sums observations per cell in memory and writes them as ObservationBucket rows.

    The ``observe``/``count_*``/``compare`` methods are the hot path: a dict lookup and a few
    additions, called from the event loop thread only. ``drain`` swaps the whole buffer out
    in one step, so nothing recorded during a flush is lost or counted twice.
    """

    def __init__(
        self,
        *,
        bucket_s: int,
        flush_interval_s: float,
        max_cells: int,
        batch_rows: int = 5000,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 10.0,
        failure_log_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        units: UnitOutcomeBook | None = None,
    ) -> None:
        if bucket_s < 1:
            raise ValueError(f"bucket_s must be >= 1, got {bucket_s}")
        self._bucket_s = bucket_s
        self._flush_interval_s = flush_interval_s
        self._max_cells = max_cells
        self._batch_rows = batch_rows
        self._clock = clock
        # Per-user windows for the rate guardrails, flushed with the cells.
        self.units = units
        # Users' cost of generative answers, written as llm_cost events (routing.observe.llm_costs).
        self.costs = UnitCosts()
        # Users' generative answers in their windows (routing.observe.unit_llm), with ``units``.
        self.llm_units = UnitLLMBook(clock=clock)
        # Users' shadow pairs, one per user across processes (routing.observe.pair_claims).
        self.pair_claims = PairClaims(clock=clock)
        self._cells: dict[CellKey, ObservationCell] = {}
        self._observed = 0
        self._cache_hits = 0
        self._rows_written = 0
        self._flushes = 0
        self._failed_flushes = 0
        self._dropped_cells = 0
        self._backoff = Backoff(base_s=backoff_base_s, max_s=backoff_max_s)
        self._failure_log = FailureLog(logger, "writing observations", interval_s=failure_log_s)
        self._backoff_gauge = metrics.FLUSH_BACKOFF.labels("observations")
        self._task: asyncio.Task[None] | None = None
        self._in_flight: InFlight[int] = InFlight()
        self._stopping = False
        # One writer thread: flushes never overlap, and its database connection is reused
        # between flushes and closed on stop (a lingering connection blocks DROP DATABASE).
        self._executor: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------- recording (hot path)

    def _cell(self, experiment_id: int, variant_key: str, is_shadow: bool) -> ObservationCell:
        key = (experiment_id, variant_key, is_shadow, int(self._clock() // self._bucket_s))
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = ObservationCell()
        return cell

    def observe(
        self,
        experiment_id: int,
        variant_key: str,
        latency_ms: float | None,
        *,
        error: bool,
        fallback: bool = False,
        is_shadow: bool = False,
        unit: UnitTally | None = None,
    ) -> None:
        """Record one request of an arm; ``latency_ms`` None means no upstream call was made.

        ``unit`` is the user's tally (``routing.observe.unit_outcomes``) when the user is tracked.
        """
        # _cell inlined: this runs for every proxied request.
        now = self._clock()
        if unit is not None:
            unit.add(now, error, latency_ms)
        key = (experiment_id, variant_key, is_shadow, int(now // self._bucket_s))
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = ObservationCell()
        cell.count += 1
        if error:
            cell.error_count += 1
        if fallback:
            cell.fallback_count += 1
        if latency_ms is not None:
            cell.histogram.add(latency_ms)
        self._observed += 1

    def observe_llm(
        self,
        experiment_id: int,
        variant_key: str,
        record: LLMRecord,
        unit: UnitTally | None = None,
    ) -> None:
        """Add what was measured of one answer (``routing.proxy.streaming``) to its cell, to
        its user's windows (``unit``: the user's tally, for the per-user LLM guardrails) and
        its cost to the user's cost events (cost per conversion)."""
        cell = self._cell(experiment_id, variant_key, False)
        if cell.llm is None:
            cell.llm = LLMCell()
        cell.llm.add(record)
        if unit is not None:
            now = self._clock()
            self.llm_units.add(unit, record, now)
            if record.cost is not None:
                self.costs.add(unit.unit, record.cost, now)

    def count_cache_hit(self, experiment_id: int, variant_key: str) -> None:
        """Record a request answered from the prediction cache (kept out of latency stats)."""
        self._cell(experiment_id, variant_key, False).cache_hits += 1
        self._cache_hits += 1

    def compare(
        self,
        experiment_id: int,
        variant_key: str,
        *,
        disagreed: bool,
        abs_diff: float | None = None,
        control_ms: float | None = None,
        shadow_ms: float | None = None,
        pair_unit: str | None = None,
    ) -> None:
        """Record one paired comparison of a shadow's answer with control's.

        ``pair_unit``: the request is the pair of this user (``routing.observe.shadow_pairs``),
        claimed with :meth:`claim_pair`; with both latencies given it goes into the cell's
        ``pairs`` once the claim is won (``routing.observe.pair_claims``).
        """
        cell = self._cell(experiment_id, variant_key, True)
        finite = abs_diff if abs_diff is not None and math.isfinite(abs_diff) else None
        if pair_unit is not None and control_ms is not None and shadow_ms is not None:
            self._offer_pair(
                experiment_id, pair_unit, variant_key, control_ms, shadow_ms, disagreed, finite
            )
        cell.compared_count += 1
        if disagreed:
            cell.disagreement_count += 1
        if finite is not None:
            cell.abs_diff_sum += finite
            cell.abs_diff_sum_sq += finite * finite

    def pair_failure(
        self,
        experiment_id: int,
        variant_key: str,
        *,
        control_ms: float | None,
        shadow_ms: float | None,
        pair_unit: str,
    ) -> None:
        """A user's pair whose shadow failed (5xx, timeout) where control answered: it counts
        as an answer that differs, with the time the shadow took to fail."""
        if control_ms is None or shadow_ms is None:
            return
        self._offer_pair(experiment_id, pair_unit, variant_key, control_ms, shadow_ms, True, None)

    def _pair_cells(self, experiment_id: int, variant_key: str, bucket: int) -> PairCell:
        """The pair sums of a shadow's cell in the given bucket (``PairRecording``)."""
        key = (experiment_id, variant_key, True, bucket)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = ObservationCell()
        if cell.pairs is None:
            cell.pairs = PairCell()
        return cell.pairs

    # ----------------------------------------------------------------- reading and flushing

    @property
    def stats(self) -> ObservationStats:
        return ObservationStats(
            observed=self._observed,
            cache_hits=self._cache_hits,
            buffered_cells=len(self._cells),
            rows_written=self._rows_written,
            flushes=self._flushes,
            failed_flushes=self._failed_flushes,
            dropped_cells=self._dropped_cells,
        )

    def drain(self) -> dict[CellKey, ObservationCell]:
        """Take every buffered cell out of the aggregator."""
        cells, self._cells = self._cells, {}
        return cells

    def restore(self, cells: dict[CellKey, ObservationCell]) -> None:
        """Merge cells back (after a failed write), dropping the oldest beyond the cap."""
        for key, cell in cells.items():
            current = self._cells.get(key)
            if current is None:
                self._cells[key] = cell
            else:
                current.merge(cell)
        overflow = len(self._cells) - self._max_cells
        if overflow > 0:
            for key in sorted(self._cells, key=lambda k: k[3])[:overflow]:
                del self._cells[key]
            self._dropped_cells += overflow
            metrics.OBSERVATION_CELLS_DROPPED.inc(overflow)

    def rows(self, cells: dict[CellKey, ObservationCell]) -> list[dict[str, object]]:
        """The ObservationBucket field values of drained cells (empty cells are skipped)."""
        rows: list[dict[str, object]] = []
        for (experiment_id, variant_key, is_shadow, bucket), cell in cells.items():
            if not (
                cell.count
                or cell.cache_hits
                or cell.compared_count
                or cell.llm is not None
                or cell.pairs is not None
            ):
                continue
            histogram = cell.histogram
            rows.append(
                {
                    "experiment_id": experiment_id,
                    "variant_key": variant_key,
                    "bucket_start": datetime.fromtimestamp(bucket * self._bucket_s, tz=UTC),
                    "is_shadow": is_shadow,
                    "count": cell.count,
                    "error_count": cell.error_count,
                    "latency_sum": histogram.sum,
                    "latency_sum_sq": histogram.sum_of_squares,
                    "latency_histogram": histogram.to_json() if histogram.count else "",
                    "cache_hits": cell.cache_hits,
                    "fallback_count": cell.fallback_count,
                    "compared_count": cell.compared_count,
                    "disagreement_count": cell.disagreement_count,
                    "abs_diff_sum": cell.abs_diff_sum,
                    "abs_diff_sum_sq": cell.abs_diff_sum_sq,
                    "llm": cell.llm.to_json() if cell.llm is not None else "",
                    "pairs": cell.pairs.to_json() if cell.pairs is not None else "",
                }
            )
        return rows

    def flush_now(self) -> int:
        """Write everything buffered, synchronously, in the calling thread; returns rows written.

        On failure the cells go back into the buffer and the exception propagates.
        """
        self.settle_claims_now()
        cells = self.drain()
        unit_rows = self.units.drain(everything=True) if self.units is not None else []
        cost_rows = self.costs.drain()
        llm_rows = self.llm_units.drain(everything=True)
        if not cells and not unit_rows and not cost_rows and not llm_rows:
            return 0
        try:
            written = write_all(
                self.rows(cells),
                unit_rows,
                batch_rows=self._batch_rows,
                cost_rows=cost_rows,
                llm_rows=llm_rows,
            )
        except Exception as exc:
            self.restore(cells)
            if isinstance(exc, LLMUnitsUnwritten):
                self.llm_units.restore(llm_rows)
            if self.units is not None and isinstance(exc, UnitsUnwritten):
                self.units.restore(unit_rows)
            if isinstance(exc, CostsUnwritten):
                self.costs.restore(cost_rows)
            self._failed_flushes += 1
            metrics.OBSERVATION_FLUSHES.labels("failed").inc()
            raise
        self._flushes += 1
        self._rows_written += written
        metrics.OBSERVATION_FLUSHES.labels("ok").inc()
        metrics.OBSERVATION_ROWS_WRITTEN.inc(written)
        metrics.OBSERVATION_BUFFERED_CELLS.set(len(self._cells))
        return written

    async def flush(self, *, final: bool = False) -> int:
        """Write everything buffered from a worker thread; failures are logged and retried.

        Users' counts are written once their window closes, or all of them when ``final``.
        """
        await self.settle_claims()
        cells = self.drain()
        unit_rows = self.units.drain(everything=final) if self.units is not None else []
        cost_rows = self.costs.drain()
        llm_rows = self.llm_units.drain(everything=final)
        if not cells and not unit_rows and not cost_rows and not llm_rows:
            return 0
        rows = self.rows(cells)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="rampart-observations")
        loop = asyncio.get_running_loop()
        try:
            written = await loop.run_in_executor(
                self._executor,
                functools.partial(
                    write_all,
                    rows,
                    unit_rows,
                    batch_rows=self._batch_rows,
                    cost_rows=cost_rows,
                    llm_rows=llm_rows,
                ),
            )
        except Exception as error:
            self.restore(cells)
            if isinstance(error, LLMUnitsUnwritten):
                self.llm_units.restore(llm_rows)
            if self.units is not None and isinstance(error, UnitsUnwritten):
                self.units.restore(unit_rows)
            if isinstance(error, CostsUnwritten):
                self.costs.restore(cost_rows)
            self._failed_flushes += 1
            metrics.OBSERVATION_FLUSHES.labels("failed").inc()
            metrics.OBSERVATION_BUFFERED_CELLS.set(len(self._cells))
            delay = self._backoff.failed()
            self._backoff_gauge.set(delay)
            self._failure_log.failed(
                error, f"{len(self._cells)} cell(s) kept for the next attempt, in {delay:.1f} s"
            )
            return 0
        if self._backoff.failures:
            self._backoff.succeeded()
            self._backoff_gauge.set(0.0)
            self._failure_log.succeeded()
        self._flushes += 1
        self._rows_written += written
        metrics.OBSERVATION_FLUSHES.labels("ok").inc()
        metrics.OBSERVATION_ROWS_WRITTEN.inc(written)
        metrics.OBSERVATION_BUFFERED_CELLS.set(len(self._cells))
        return written

    async def start(self) -> None:
        """Start the periodic background flusher."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="rampart-observation-flusher"
            )

    async def stop(self) -> None:
        """Stop the flusher, wait for a flush in flight, and write what is left."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._in_flight.wait()
        await self.flush(final=True)
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, close_connections)
            executor.shutdown(wait=True)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._backoff.current_s or self._flush_interval_s)
            await self._in_flight.run(self.flush())
