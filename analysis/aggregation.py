"""SQL aggregation of exposures, proxy observations and events into sufficient statistics.

Everything here is GROUP BY in the database (SQLite and PostgreSQL alike); Python only ever
holds one small row per variant or per metric, plus one merged latency histogram per
variant, so memory stays flat however many events and buckets exist.

Incremental aggregation and its correctness conditions
    * Observations (`routing.models.ObservationBucket`, append-only, `id` is the cursor) are
      folded into `ObservationRollup` (one row per experiment and variant). A run folds the
      rows with `cursor < id <= horizon`, where `horizon` is the largest id it saw at the
      previous run, then reads the rows past the new cursor as an unsaved tail and adds them
      to this run's totals. The lag matters on PostgreSQL: ids come from a sequence at insert
      time, so a transaction holding a smaller id may commit after one holding a larger id;
      folding right up to the largest visible id would skip the late row forever. With the
      lag, a row is lost only if its insert transaction stays open for a whole analysis
      interval (the recorder's flushes are single short INSERTs). SQLite has one writer at a
      time, so there the condition always holds. Every row is read at most twice.
    * Business events (`routing.models.Event`) are summed per (experiment, unit, event name,
      exposure window) in `UnitEventRollup`: the sum and count of the unit's events within
      the window after its first exposure (the SQL lives in `analysis.unit_metrics`). A read
      is one GROUP BY over the rollup UNION ALL the raw events past the
      cursor (the "tail"), so results are always current, however far the fold lags. The
      fold is INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE (SQLite >= 3.24 and
      PostgreSQL both have it) over a bounded id range, in the same transaction as the
      cursor; it takes only events that were already visible at the previous run (the
      same one-run lag as above, for the same reason). Small backlogs are folded by the
      analysis run itself, large ones (a first look at millions of events) by a separate
      task, one chunk per run, so no analysis run ever waits for a big fold.
      An event counts only if its unit's exposure row exists when the event is folded (or
      read, for the tail). Exposures are flushed within RECORDER_FLUSH_S, so the condition
      is that the recorder flushes faster than one analysis interval (defaults: 1 s against
      10 s). An event of a unit whose exposure row arrives later still ("late exposure")
      is not counted once folded, which is also right in principle when the event happened
      before the exposure; units are never double counted.
    * Exposures are re-grouped at every run (a GROUP BY per unit, then per variant). That
      is what makes the exclusion of units exposed to several variants exact even when the
      second exposure arrives late: the exclusion happens when the metrics are read, not
      when the events are summed.

Units exposed to more than one variant are excluded from every unit-level metric and
counted. In a canary, a unit whose control exposure precedes its canary exposure was moved
by a ramp step (ramps only move units from control to the canary); it is excluded from the
metrics like the others but is not a health problem, so it is reported separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Max, Sum
from django.utils import timezone

from analysis.cohorts import unit_metric_aggregates
from analysis.latency_windows import latency_windows
from analysis.llm_metrics import LLMTotals, llm_aggregates
from analysis.models import AnalysisState, ObservationRollup
from analysis.sql import db_datetime, fetch, table
from analysis.stats.moments import MeanStats, MetricStats, ProportionStats
from analysis.stats.strata import Standardized
from analysis.unit_metrics import (
    BUILTIN_ERROR,
    BUILTIN_LATENCY,
    business_stats,
    events_to_fold,
    fold_unit_events,
    metric_event_windows,
)
from experiments.contracts import ExperimentView
from routing.models import Event, Exposure, ObservationBucket
from routing.observe.histogram import LogHistogram

__all__ = [
    "BUILTIN_ERROR",
    "BUILTIN_LATENCY",
    "Aggregates",
    "ExposureCounts",
    "ObservationTotals",
    "aggregate",
    "business_stats",
    "events_to_fold",
    "exposure_counts",
    "fold_unit_events",
    "metric_event_windows",
    "note_event_horizon",
    "refresh_observations",
]
_HISTOGRAM_CHUNK = 2000


@dataclass
class ObservationTotals:
    """One variant's proxied requests: counts, latency sums and the merged histogram."""

    count: int = 0
    error_count: int = 0
    latency_sum: float = 0.0
    latency_sum_sq: float = 0.0
    histogram: LogHistogram = field(default_factory=LogHistogram)

    def add(self, count: int, errors: int, total: float, squares: float) -> None:
        self.count += int(count or 0)
        self.error_count += int(errors or 0)
        self.latency_sum += float(total or 0.0)
        self.latency_sum_sq += float(squares or 0.0)

    @property
    def errors(self) -> ProportionStats:
        return ProportionStats(n=self.count, sum=float(min(self.error_count, self.count)))

    @property
    def latency(self) -> MeanStats:
        """Mean latency from the histogram's own count and sums (the values it recorded)."""
        histogram = self.histogram
        if histogram.count == 0:
            return MeanStats(n=0, sum=0.0, sum_squares=0.0)
        return MeanStats(
            n=int(histogram.count), sum=histogram.sum, sum_squares=histogram.sum_of_squares
        )


@dataclass(frozen=True)
class ExposureCounts:
    """Units per variant and the multiple-exposure counts.

    `per_variant` counts units exposed to exactly one variant (the n of unit-level metrics);
    `new_in_step` counts those first seen at or after `since` (a canary's SRM check compares
    them with the step's split); `multiple` is every unit seen in several variants,
    `unexpected_multiple` those a ramp step does not explain.
    """

    per_variant: Mapping[str, int]
    new_in_step: Mapping[str, int]
    total_units: int
    multiple: int
    unexpected_multiple: int


@dataclass(frozen=True)
class Aggregates:
    """What one look reads. `business[metric][arm]` is the statistic each arm is compared on
    (cohorts by ramp step combined, `analysis.cohorts`); `business_construction[metric]` says
    how it was built."""

    exposures: ExposureCounts
    observations: Mapping[str, ObservationTotals]
    business: Mapping[str, Mapping[str, MetricStats]]
    business_construction: Mapping[str, Standardized] = field(default_factory=dict)
    # Closed per-bucket latency histograms per variant, read only for quantile metrics
    # (analysis.latency_windows).
    latency_windows: Mapping[str, Mapping[datetime, LogHistogram]] = field(default_factory=dict)
    # Generative answers' statistics per variant (analysis.llm_metrics).
    llm: Mapping[str, LLMTotals] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _merge_histograms(
    totals: dict[str, ObservationTotals], experiment_id: int, low: int, high: int | None
) -> None:
    """Stream the histograms of buckets with low < id (<= high) and merge them per variant."""
    rows = ObservationBucket.objects.filter(
        experiment_id=experiment_id, is_shadow=False, id__gt=low
    ).exclude(latency_histogram="")
    if high is not None:
        rows = rows.filter(id__lte=high)
    for variant, text in rows.values_list("variant_key", "latency_histogram").iterator(
        chunk_size=_HISTOGRAM_CHUNK
    ):
        totals.setdefault(variant, ObservationTotals()).histogram.merge(
            LogHistogram.from_json(text)
        )


def _bucket_sums(
    totals: dict[str, ObservationTotals], experiment_id: int, low: int, high: int | None
) -> int:
    """Add the GROUP BY sums of buckets with low < id (<= high); returns the largest id."""
    rows = ObservationBucket.objects.filter(
        experiment_id=experiment_id, is_shadow=False, id__gt=low
    )
    if high is not None:
        rows = rows.filter(id__lte=high)
    largest = low
    grouped = (
        rows.values("variant_key")
        .order_by()
        .annotate(
            n=Sum("count"),
            errors=Sum("error_count"),
            total=Sum("latency_sum"),
            squares=Sum("latency_sum_sq"),
            top=Max("id"),
        )
    )
    for row in grouped:
        totals.setdefault(row["variant_key"], ObservationTotals()).add(
            row["n"], row["errors"], row["total"], row["squares"]
        )
        largest = max(largest, int(row["top"]))
    return largest


# --------------------------------------------------------------------------- observations


def refresh_observations(*, state: AnalysisState) -> dict[str, ObservationTotals]:
    """Fold settled observation buckets into the rollup; return the totals including the tail.

    Call inside the transaction that holds `state` FOR UPDATE (the caller saves `state`).
    """
    experiment_id = state.experiment_id
    rollups = {
        r.variant_key: r for r in ObservationRollup.objects.filter(experiment_id=experiment_id)
    }
    if state.observation_horizon > state.observation_cursor:
        settled: dict[str, ObservationTotals] = {}
        _bucket_sums(settled, experiment_id, state.observation_cursor, state.observation_horizon)
        _merge_histograms(
            settled, experiment_id, state.observation_cursor, state.observation_horizon
        )
        for variant, part in settled.items():
            rollup = rollups.get(variant) or ObservationRollup(
                experiment_id=experiment_id, variant_key=variant
            )
            merged = (
                LogHistogram.from_json(rollup.latency_histogram)
                if rollup.latency_histogram
                else LogHistogram()
            )
            merged.merge(part.histogram)
            rollup.count += part.count
            rollup.error_count += part.error_count
            rollup.latency_sum += part.latency_sum
            rollup.latency_sum_sq += part.latency_sum_sq
            rollup.latency_histogram = merged.to_json() if merged.count else ""
            rollup.save()
            rollups[variant] = rollup
        state.observation_cursor = state.observation_horizon
    totals: dict[str, ObservationTotals] = {}
    for variant, rollup in rollups.items():
        total = totals.setdefault(variant, ObservationTotals())
        total.add(rollup.count, rollup.error_count, rollup.latency_sum, rollup.latency_sum_sq)
        if rollup.latency_histogram:
            total.histogram = LogHistogram.from_json(rollup.latency_histogram)
    state.observation_horizon = _bucket_sums(totals, experiment_id, state.observation_cursor, None)
    _merge_histograms(totals, experiment_id, state.observation_cursor, None)
    return totals


# --------------------------------------------------------------------------- events


def note_event_horizon(*, state: AnalysisState) -> None:
    """Once per run: what the previous run saw is settled; remember what is visible now."""
    state.event_settled = max(state.event_settled, state.event_horizon, state.event_cursor)
    newest = Event.objects.aggregate(top=Max("id"))["top"]
    state.event_horizon = max(int(newest or 0), state.event_cursor)


# --------------------------------------------------------------------------- exposures


def _units_subquery(control_key: str, canary: bool) -> tuple[str, list[Any]]:
    """One row per exposed unit: its variant ('' if several), first time and move flags."""
    # A ramp move: exactly two rows, control first, then a canary (never the other way).
    expected_move = (
        "(COUNT(*) = 2 AND MAX(CASE WHEN variant_key = %s THEN first_seen_at END) IS NOT NULL "
        "AND MAX(CASE WHEN variant_key = %s THEN first_seen_at END) <= "
        "MIN(CASE WHEN variant_key <> %s THEN first_seen_at END))"
        if canary
        else "(1 = 0)"
    )
    sql = f"""
        SELECT unit_id,
               CASE WHEN COUNT(*) = 1 THEN MIN(variant_key) ELSE '' END AS variant,
               MIN(first_seen_at) AS first_at,
               CASE WHEN COUNT(*) > 1 AND NOT {expected_move} THEN 1 ELSE 0 END AS unexpected
        FROM {table(Exposure)}
        WHERE experiment_id = %s
        GROUP BY unit_id
    """
    params: list[Any] = [control_key] * 3 if canary else []
    return sql, params


def exposure_counts(
    *, experiment_id: int, control_key: str, canary: bool, since: datetime | None
) -> ExposureCounts:
    units_sql, units_params = _units_subquery(control_key, canary)
    new_condition = "u.first_at >= %s" if since is not None else "1 = 1"
    since_params = [db_datetime(since)] if since is not None else []
    sql = f"""
        SELECT u.variant, COUNT(*),
               SUM(CASE WHEN {new_condition} THEN 1 ELSE 0 END),
               SUM(u.unexpected)
        FROM ({units_sql}) u
        GROUP BY u.variant
    """
    params = [*since_params, *units_params, experiment_id]
    per_variant: dict[str, int] = {}
    new_in_step: dict[str, int] = {}
    total = multiple = unexpected = 0
    for variant, units, new, odd in fetch(sql, params):
        total += int(units)
        if variant:
            per_variant[variant] = int(units)
            new_in_step[variant] = int(new or 0)
        else:
            multiple = int(units)
            unexpected = int(odd or 0)
    return ExposureCounts(
        per_variant=per_variant,
        new_in_step=new_in_step,
        total_units=total,
        multiple=multiple,
        unexpected_multiple=unexpected,
    )


# --------------------------------------------------------------------------- entry point


def aggregate(
    *, experiment: ExperimentView, state: AnalysisState, now: datetime | None = None
) -> Aggregates:
    """Bring the observation rollup up to date and read every statistic the analysis needs.

    Runs inside the caller's transaction, which holds `state` FOR UPDATE; the caller saves
    `state` (its cursors moved). Events are read as rollup plus tail; folding them is the
    caller's choice (`fold_unit_events`). `now` (default: the current time) decides whose
    exposure windows have closed.
    """
    canary = experiment.kind == "canary"
    since = experiment.step_started_at if canary else None
    business, constructions = unit_metric_aggregates(
        experiment=experiment,
        tail_after=state.event_cursor,
        now=now if now is not None else timezone.now(),
    )
    return Aggregates(
        exposures=exposure_counts(
            experiment_id=experiment.id,
            control_key=experiment.control.key,
            canary=canary,
            since=since,
        ),
        observations=refresh_observations(state=state),
        business=business,
        business_construction=constructions,
        latency_windows=latency_windows(experiment=experiment, now=now),
        llm=llm_aggregates(experiment=experiment, now=now),
    )
