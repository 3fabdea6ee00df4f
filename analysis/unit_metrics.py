"""SQL of per-unit business metrics: exposure windows, the windowed fold, and cohort statistics.

Exposure windows (STATS.md 12.3)
    A per-unit metric with window W counts a unit's events with timestamps in
    [first exposure, first exposure + W). Units whose window has not closed at analysis time
    (first exposure later than now - W) are left out of that metric until it closes, so every
    unit counted has had the same time to convert, whenever it arrived: GrowthBook's conversion
    window with in-progress conversions excluded. Events are folded into `UnitEventRollup`
    once per distinct (event name, window) pair the experiment's metrics use, so two metrics
    on the same event with different windows each get their own sums. A window is part of a
    metric's meaning and cannot change once a started experiment uses the metric.
    An event that arrives after its unit was already counted (a client that sends it late)
    still changes that unit's value at the next run; send events within an analysis interval.

Cohorts (STATS.md 12.2)
    `cohort_stats` groups the units by variant and by the period (ramp step, pause, ...) of
    their first exposure, given the periods' start times (`experiments.periods.step_periods`).
    `analysis.cohorts` combines the cohorts into one statistic per arm.

Everything is GROUP BY in the database and works on SQLite and PostgreSQL alike; the one
vendor-specific piece is "timestamp + W seconds" (`_within_window`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from analysis.models import AnalysisState, UnitEventRollup
from analysis.sql import db_datetime, fetch, table
from analysis.stats.moments import MeanStats, MetricStats, ProportionStats, RatioStats
from experiments.contracts import LLM_SOURCES, MetricView
from routing.models import Event, Exposure

BUILTIN_LATENCY = "latency_ms"
BUILTIN_ERROR = "error"
# Sources the proxy measures: never business events.
PROXY_SOURCES = (BUILTIN_LATENCY, BUILTIN_ERROR, *LLM_SOURCES)
# Larger than any id: the open end of the raw tail.
_MAX_ID = 2**62

# metric key -> variant -> cohort index -> statistic
CohortStats = dict[str, dict[str, dict[int, MetricStats]]]


def is_unit_metric(metric: MetricView) -> bool:
    """Whether a metric is computed per unit from business events (not by the proxy)."""
    return (
        metric.kind in ("binomial", "mean", "ratio")
        and (metric.kind == "ratio" or metric.source not in PROXY_SOURCES)
        and not metric.is_quality
    )


def _names(metric: MetricView) -> tuple[str, ...]:
    if metric.kind == "ratio":
        return (metric.numerator_event, metric.denominator_event)
    return (metric.source,)


def metric_event_windows(metrics: Sequence[MetricView]) -> list[tuple[str, int]]:
    """The (event name, window) pairs the per-unit metrics read, sorted."""
    pairs = {
        (name, int(metric.window_s))
        for metric in metrics
        if is_unit_metric(metric)
        for name in _names(metric)
        if name
    }
    return sorted(pairs)


def _within_window(event_time: str, first_seen: str, window: str) -> str:
    """SQL for event_time < first_seen + window seconds."""
    if connection.vendor == "postgresql":
        return f"{event_time} < {first_seen} + {window} * INTERVAL '1 second'"
    # SQLite stores datetimes as ISO text; julianday() reads them with their microseconds.
    return f"julianday({event_time}) < julianday({first_seen}) + {window} / 86400.0"


def _pairs_sql(pairs: Sequence[tuple[str, int]]) -> tuple[str, list[Any]]:
    """The pairs as a derived table w(name, win), written the same way for both backends."""
    rows = " UNION ALL ".join(
        ["SELECT CAST(%s AS VARCHAR(128)) AS name, CAST(%s AS INTEGER) AS win"] * len(pairs)
    )
    return rows, [value for pair in pairs for value in pair]


def _windowed_events_sql(
    pairs: Sequence[tuple[str, int]], experiment_id: int, low: int, high: int
) -> tuple[str, list[Any]]:
    """FROM ... WHERE of events low < id <= high inside their unit's window, once per pair.

    EXISTS counts each event once whatever the number of exposure rows of its unit; units
    with several exposure rows are excluded from the metrics anyway.
    """
    pairs_sql, params = _pairs_sql(pairs)
    window = _within_window("ev.timestamp", "ex.first_seen_at", "w.win")
    sql = f"""
        FROM {table(Event)} ev
        JOIN ({pairs_sql}) w ON w.name = ev.name
        WHERE ev.id > %s AND ev.id <= %s
          AND EXISTS (
            SELECT 1 FROM {table(Exposure)} ex
            WHERE ex.experiment_id = %s AND ex.unit_id = ev.unit_id
              AND ex.first_seen_at <= ev.timestamp AND {window}
          )
    """
    return sql, [*params, low, high, experiment_id]


def events_to_fold(state: AnalysisState) -> int:
    """How many event ids are settled but not yet folded into the rollup."""
    return max(state.event_settled - state.event_cursor, 0)


def fold_unit_events(
    *, state: AnalysisState, event_windows: Sequence[tuple[str, int]], limit: int
) -> int:
    """Upsert settled events (at most `limit` ids past the cursor) into the per-unit rollup.

    Returns how many settled event ids remain to fold. Call inside the transaction that holds
    `state` FOR UPDATE, and save `state` in it: the rollup and the cursor move together.
    """
    low = state.event_cursor
    high = min(state.event_settled, low + max(limit, 0))
    if high <= low:
        return events_to_fold(state)
    if event_windows:
        rollup = table(UnitEventRollup)
        source, source_params = _windowed_events_sql(event_windows, state.experiment_id, low, high)
        # SQLite's grammar needs the WHERE clause the source has before ON CONFLICT.
        sql = f"""
            INSERT INTO {rollup}
              (experiment_id, unit_id, event_name, window_s, value_sum, event_count)
            SELECT %s, ev.unit_id, ev.name, w.win, SUM(ev.value), COUNT(*)
            {source}
            GROUP BY ev.unit_id, ev.name, w.win
            ON CONFLICT (experiment_id, unit_id, event_name, window_s) DO UPDATE SET
              value_sum = {rollup}.value_sum + excluded.value_sum,
              event_count = {rollup}.event_count + excluded.event_count
        """
        with connection.cursor() as cursor:
            cursor.execute(sql, [state.experiment_id, *source_params])
    state.event_cursor = high
    return events_to_fold(state)


def _capped(expression: str, cap: float | None) -> str:
    """Winsorise a per-unit value at `cap` (a float from the database, inlined as a literal)."""
    if cap is None:
        return expression
    literal = repr(float(cap))
    return f"(CASE WHEN {expression} > {literal} THEN {literal} ELSE {expression} END)"


def _cohort_sql(cohort_starts: Sequence[datetime]) -> tuple[str, list[Any]]:
    """CASE giving a unit's cohort: the number of period starts at or before its first exposure."""
    if not cohort_starts:
        return "0", []
    cases = " ".join(f"WHEN uu.first_at < %s THEN {i}" for i in range(len(cohort_starts)))
    params = [db_datetime(start) for start in cohort_starts]
    return f"CASE {cases} ELSE {len(cohort_starts)} END", params


def cohort_stats(
    *,
    experiment_id: int,
    metrics: Sequence[MetricView],
    tail_after: int,
    tail_until: int | None = None,
    now: datetime | None = None,
    cohort_starts: Sequence[datetime] = (),
) -> CohortStats:
    """Per metric, variant and cohort, the unit-level sufficient statistics in one query.

    Reads the per-unit rollup plus the raw events with tail_after < id (<= tail_until) that
    are not folded yet (`tail_after` is the fold cursor: a smaller value double counts), so
    the result is current whatever the fold's progress. Only units exposed to exactly one
    variant count, and for each metric only those whose window closed by `now`; a unit with
    no events counts as 0 (binomial 0, mean 0, ratio 0/0). Cohort i holds the units first
    exposed in [cohort_starts[i-1], cohort_starts[i]) (cohort 0 before the first start, the
    last after the last one); with no starts every unit is in cohort 0.
    """
    unit_metrics = [m for m in metrics if is_unit_metric(m)]
    if not unit_metrics:
        return {}
    now = now if now is not None else timezone.now()
    pairs = metric_event_windows(unit_metrics)
    alias = {pair: index for index, pair in enumerate(pairs)}
    columns: list[str] = []
    inner_params: list[Any] = []
    for index, (name, window) in enumerate(pairs):
        match = f"event_name = %s AND window_s = {int(window)}"
        columns.append(
            f"SUM(CASE WHEN {match} THEN value_sum ELSE 0 END) AS v{index}, "
            f"SUM(CASE WHEN {match} THEN event_count ELSE 0 END) AS c{index}"
        )
        inner_params.extend([name, name])
    outer: list[str] = []
    outer_params: list[Any] = []
    for metric in unit_metrics:
        closed = "u.first_at <= %s"
        cutoff = db_datetime(now - timedelta(seconds=int(metric.window_s)))

        def closed_sum(expression: str, closed: str = closed) -> str:
            return f"SUM(CASE WHEN {closed} THEN {expression} ELSE 0 END)"

        window = int(metric.window_s)
        if metric.kind == "binomial":
            hit = (
                f"CASE WHEN COALESCE(r.c{alias[(metric.source, window)]}, 0) > 0 THEN 1 ELSE 0 END"
            )
            parts = [closed_sum("1"), closed_sum(hit)]
        elif metric.kind == "mean":
            value = _capped(
                f"COALESCE(r.v{alias[(metric.source, window)]}, 0)", metric.winsorize_cap
            )
            parts = [closed_sum("1"), closed_sum(value), closed_sum(f"{value} * {value}")]
        else:
            m = f"COALESCE(r.v{alias[(metric.numerator_event, window)]}, 0)"
            d = f"COALESCE(r.v{alias[(metric.denominator_event, window)]}, 0)"
            parts = [
                closed_sum("1"),
                closed_sum(m),
                closed_sum(f"{m} * {m}"),
                closed_sum(d),
                closed_sum(f"{d} * {d}"),
                closed_sum(f"{m} * {d}"),
            ]
        outer.extend(parts)
        outer_params.extend([cutoff] * len(parts))
    cohort, cohort_params = _cohort_sql(cohort_starts)
    until = tail_until if tail_until is not None else _MAX_ID
    tail, tail_params = _windowed_events_sql(pairs, experiment_id, tail_after, until)
    sql = f"""
        SELECT u.variant, u.cohort, {", ".join(outer)}
        FROM (
            SELECT uu.unit_id, uu.variant, uu.first_at, {cohort} AS cohort
            FROM (
                SELECT unit_id,
                       CASE WHEN COUNT(*) = 1 THEN MIN(variant_key) ELSE '' END AS variant,
                       MIN(first_seen_at) AS first_at
                FROM {table(Exposure)}
                WHERE experiment_id = %s
                GROUP BY unit_id
            ) uu
        ) u
        LEFT JOIN (
            SELECT unit_id, {", ".join(columns)}
            FROM (
                SELECT unit_id, event_name, window_s, value_sum, event_count
                FROM {table(UnitEventRollup)}
                WHERE experiment_id = %s
                UNION ALL
                SELECT ev.unit_id, ev.name, w.win, ev.value, 1
                {tail}
            ) parts
            GROUP BY unit_id
        ) r ON r.unit_id = u.unit_id
        WHERE u.variant <> ''
        GROUP BY u.variant, u.cohort
    """
    params = [
        *outer_params,
        *cohort_params,
        experiment_id,
        *inner_params,
        experiment_id,
        *tail_params,
    ]
    result: CohortStats = {m.key: {} for m in unit_metrics}
    for row in fetch(sql, params):
        variant, index = row[0], int(row[1])
        values = [float(v or 0.0) for v in row[2:]]
        position = 0
        for metric in unit_metrics:
            n = int(values[position])
            stats: MetricStats
            if metric.kind == "binomial":
                stats = ProportionStats(n=n, sum=values[position + 1])
                position += 2
            elif metric.kind == "mean":
                stats = MeanStats(n=n, sum=values[position + 1], sum_squares=values[position + 2])
                position += 3
            else:
                stats = RatioStats(
                    n=n,
                    numerator_sum=values[position + 1],
                    numerator_sum_squares=values[position + 2],
                    denominator_sum=values[position + 3],
                    denominator_sum_squares=values[position + 4],
                    cross_sum=values[position + 5],
                )
                position += 6
            if n > 0:
                result[metric.key].setdefault(variant, {})[index] = stats
    return result


def business_stats(
    *,
    experiment_id: int,
    metrics: Sequence[MetricView],
    tail_after: int,
    tail_until: int | None = None,
    now: datetime | None = None,
) -> dict[str, dict[str, MetricStats]]:
    """Per metric and variant, the unit-level statistics pooled over every cohort.

    The same rows as `cohort_stats` with a single cohort: what an experiment that never
    ramped or paused analyses. Built-in latency/error metrics are not handled here.
    """
    cohorts = cohort_stats(
        experiment_id=experiment_id,
        metrics=metrics,
        tail_after=tail_after,
        tail_until=tail_until,
        now=now,
    )
    return {key: pool_cohorts(per_variant) for key, per_variant in cohorts.items()}


def pool_cohorts(per_variant: Mapping[str, Mapping[int, MetricStats]]) -> dict[str, MetricStats]:
    """Each variant's statistic over all its cohorts (exact sums)."""
    pooled: dict[str, MetricStats] = {}
    for variant, by_cohort in per_variant.items():
        parts = list(by_cohort.values())
        total = parts[0]
        for part in parts[1:]:
            total = total + part  # type: ignore[operator]
        pooled[variant] = total
    return pooled
