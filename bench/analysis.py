"""Time to analyse an experiment with N events on PostgreSQL, against the bare GROUP BY query.

The script creates a throwaway database `rampart_bench` on the server that DATABASE_URL names
(start one with `scripts/services.sh start` and `eval "$(scripts/services.sh env)"`),
migrates it, and loads with COPY: N/10 units exposed 50/50 to two variants (0.5% of them to
both), and N events (purchase with a value, view, click) at or after each unit's exposure,
plus a few events of units outside the experiment. The experiment is an A/B test with three
unit-level metrics: conversion (binomial), revenue (mean) and clicks per view (ratio).

Compared on the same rows, in the same run:
  * bare: one GROUP BY query that computes the same per-variant sufficient statistics from
    the raw events (units joined to exposures, multiple exposures excluded); the best of
    several runs after one warm-up.
  * first look: a full analysis run (`analysis.services.analysis_run`: aggregation,
    statistics, result snapshot) of an experiment whose events were never folded: it reads
    the (empty) per-unit rollup plus every raw event.
  * fold: the background task's work, folding every event into the per-unit rollup in
    chunks (not on any decision's path; reported as throughput).
  * steady state: the analysis runs after 1% more events arrived: the first reads the
    rollup plus the new events as the tail, the next one also folds them (inline).
Target: every analysis run at most 1.5x bare.

Run: .venv/bin/python bench/analysis.py [--events 1000000] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_DB = "rampart_bench"
TARGET_RATIO = 1.5
CHUNK = 200_000
EVENT_NAMES = ("purchase", "view", "click")


def _bench_database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        sys.exit(
            "DATABASE_URL must name a PostgreSQL server: scripts/services.sh start && "
            'eval "$(scripts/services.sh env)"'
        )
    return url


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _recreate_database(url: str) -> None:
    import psycopg

    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {BENCH_DB}")


def _drop_database(url: str) -> None:
    import psycopg

    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


def _setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = _with_database(url, BENCH_DB)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _copy(table: str, columns: str, lines: Callable[[], list[str]], rows: int) -> None:
    """COPY rows produced in chunks of text lines (tab-separated)."""
    from django.db import connection

    with connection.cursor() as cursor:
        raw = cursor.cursor
        with raw.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            done = 0
            while done < rows:
                chunk = lines()
                copy.write("".join(chunk))
                done += len(chunk)


def load(events: int, *, seed: int = 7) -> tuple[int, datetime]:
    """Create the experiment and COPY exposures and events; returns (experiment id, t0)."""
    from experiments import services
    from experiments.models import Experiment

    for key, kind, source, extra in (
        ("conversion", "binomial", "purchase", {}),
        ("revenue", "mean", "purchase", {}),
        ("ctr", "ratio", "", {"numerator_event": "click", "denominator_event": "view"}),
    ):
        # Events come up to a day after exposure: a one-day window counts them all, as the
        # bare query does.
        services.metric_create(
            actor="bench",
            key=key,
            name=key,
            kind=kind,
            source=source,
            direction="higher",
            window_s=86_400,
            **extra,
        )
    services.experiment_create(
        actor="bench",
        key="bench",
        name="bench",
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url="http://127.0.0.1:1", weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url="http://127.0.0.1:2", weight=0.5),
        ],
        metrics=[
            services.MetricUseInput(metric_key="conversion", role="primary"),
            services.MetricUseInput(metric_key="revenue", role="secondary"),
            services.MetricUseInput(metric_key="ctr", role="secondary"),
        ],
    )
    services.experiment_start(actor="bench", key="bench")
    experiment = Experiment.objects.get(key="bench")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rng = np.random.default_rng(seed)
    units = max(events // 10, 100)
    stamp = t0.isoformat()

    exposure_rows = [f"{experiment.pk}\tu{i}\tv{1 + i % 2}\t{stamp}\n" for i in range(units)]
    exposure_rows += [
        f"{experiment.pk}\tu{i}\tv{2 - i % 2}\t{stamp}\n" for i in range(0, units, 200)
    ]
    served = iter([exposure_rows])
    _copy(
        "routing_exposure",
        "experiment_id, unit_id, variant_key, first_seen_at",
        lambda: next(served),
        len(exposure_rows),
    )
    load_events(events, units=units, start_id=0, t0=t0, rng=rng)
    return experiment.pk, t0


def load_events(
    count: int, *, units: int, start_id: int, t0: datetime, rng: np.random.Generator
) -> None:
    """COPY `count` events; about 2% belong to units outside the experiment."""
    produced = 0
    received = (t0 + timedelta(days=1)).isoformat()

    def chunk() -> list[str]:
        nonlocal produced
        size = min(CHUNK, count - produced)
        unit = rng.integers(0, int(units * 1.02), size)
        name = rng.integers(0, len(EVENT_NAMES), size)
        value = np.round(rng.exponential(20.0, size), 2)
        offset = rng.integers(1, 86_400, size)
        lines = [
            f"b{start_id + produced + i}\tu{unit[i]}\t{EVENT_NAMES[name[i]]}\t{value[i]}\t"
            f"{(t0 + timedelta(seconds=int(offset[i]))).isoformat()}\t{received}\n"
            for i in range(size)
        ]
        produced += size
        return lines

    _copy(
        "routing_event",
        "event_id, unit_id, name, value, timestamp, received_at",
        chunk,
        count,
    )


BARE_SQL = """
SELECT u.variant, COUNT(*),
       SUM(CASE WHEN COALESCE(r.purchases, 0) > 0 THEN 1 ELSE 0 END),
       SUM(COALESCE(r.revenue, 0)), SUM(COALESCE(r.revenue, 0) * COALESCE(r.revenue, 0)),
       SUM(COALESCE(r.clicks, 0)), SUM(COALESCE(r.clicks, 0) * COALESCE(r.clicks, 0)),
       SUM(COALESCE(r.views, 0)), SUM(COALESCE(r.views, 0) * COALESCE(r.views, 0)),
       SUM(COALESCE(r.clicks, 0) * COALESCE(r.views, 0))
FROM (
    SELECT unit_id, MIN(variant_key) AS variant
    FROM routing_exposure WHERE experiment_id = %(experiment)s
    GROUP BY unit_id HAVING COUNT(*) = 1
) u
LEFT JOIN (
    SELECT ev.unit_id,
           SUM(CASE WHEN ev.name = 'purchase' THEN 1 ELSE 0 END) AS purchases,
           SUM(CASE WHEN ev.name = 'purchase' THEN ev.value ELSE 0 END) AS revenue,
           SUM(CASE WHEN ev.name = 'click' THEN ev.value ELSE 0 END) AS clicks,
           SUM(CASE WHEN ev.name = 'view' THEN ev.value ELSE 0 END) AS views
    FROM routing_event ev
    WHERE ev.name IN ('purchase', 'view', 'click')
      AND EXISTS (SELECT 1 FROM routing_exposure ex
                  WHERE ex.experiment_id = %(experiment)s AND ex.unit_id = ev.unit_id
                    AND ex.first_seen_at <= ev.timestamp)
    GROUP BY ev.unit_id
) r ON r.unit_id = u.unit_id
GROUP BY u.variant
"""


def bare_query(experiment_id: int) -> tuple[float, list[tuple[Any, ...]]]:
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(BARE_SQL, {"experiment": experiment_id})
        rows = cursor.fetchall()
    return time.perf_counter() - started, rows


def analysis_run(experiment_id: int) -> float:
    from analysis import services

    started = time.perf_counter()
    services.analysis_run(experiment_id=experiment_id)
    return time.perf_counter() - started


def result_history(*, experiment_id: int, limit: int) -> list[Any]:
    from analysis.selectors import result_history as history

    return history(experiment_id=experiment_id, limit=limit)


def reset_rollups(experiment_id: int) -> None:
    from analysis.models import AnalysisState, ResultSnapshot, SequentialState, UnitEventRollup

    for model in (UnitEventRollup, SequentialState, ResultSnapshot, AnalysisState):
        model.objects.filter(experiment_id=experiment_id).delete()


def run(events: int, *, repeats: int) -> dict[str, float]:
    from django.db import connection

    from analysis import folding, services

    # Folding is timed on its own below; the bench has no worker to hand it to.
    services.schedule_fold = lambda experiment_id: None
    started = time.perf_counter()
    experiment_id, t0 = load(events)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    print(f"loaded {events:,} events in {time.perf_counter() - started:.1f}s")

    bare_times = []
    for _ in range(repeats + 1):  # the first run warms the cache
        elapsed, bare_rows = bare_query(experiment_id)
        bare_times.append(elapsed)
    bare = min(bare_times[1:])

    first_times = []
    for _ in range(repeats):
        reset_rollups(experiment_id)
        first_times.append(analysis_run(experiment_id))
    first = statistics.median(first_times)
    first_look = {
        row["arm"]: row
        for row in result_history(experiment_id=experiment_id, limit=1)[-1].metrics
        if row["metric"] == "conversion"
    }

    analysis_run(experiment_id)  # the events seen at the first look are now settled
    fold_started = time.perf_counter()
    while folding.events_fold(experiment_id=experiment_id) > 0:
        pass
    fold = time.perf_counter() - fold_started

    extra = max(events // 100, 1)
    from routing.models import Exposure

    units = Exposure.objects.filter(experiment_id=experiment_id).count()
    load_events(extra, units=units, start_id=events, t0=t0, rng=np.random.default_rng(99))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    tail = analysis_run(experiment_id)  # rollup plus the new events as the tail
    folded = analysis_run(experiment_id)  # ... and folds them inline

    # The analysis agrees with the bare query on the same rows.
    by_variant = {row[0]: row for row in bare_rows}
    assert first_look["v2"]["n_treatment"] == by_variant["v2"][1]
    assert first_look["v2"]["n_control"] == by_variant["v1"][1]
    assert first_look["v2"]["control_estimate"] == by_variant["v1"][2] / by_variant["v1"][1]
    return {"bare": bare, "first": first, "fold": fold, "tail": tail, "folded": folded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100k events, one repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the rampart_bench database")
    args = parser.parse_args()
    events = 100_000 if args.quick else args.events
    repeats = 1 if args.quick else args.repeats
    url = _bench_database_url()
    _recreate_database(url)
    try:
        _setup_django(url)
        figures = run(events, repeats=repeats)
        from django.db import connections

        connections.close_all()
    finally:
        if not args.keep:
            _drop_database(url)
    bare = figures["bare"]
    print(f"events: {events:,} (PostgreSQL)")
    print(f"bare GROUP BY over the raw rows:           {bare * 1000:9.1f} ms")
    worst = 0.0
    for label, key in (
        ("analysis, first look (nothing folded):    ", "first"),
        ("analysis, steady state (+1% as the tail): ", "tail"),
        ("analysis, steady state (+1% folded):      ", "folded"),
    ):
        ratio = figures[key] / bare
        worst = max(worst, ratio)
        print(f"{label}{figures[key] * 1000:9.1f} ms  ratio {ratio:.2f}")
    rate = events / figures["fold"]
    print(f"background fold of every event: {figures['fold']:.1f} s ({rate:,.0f} events/s)")
    verdict = "met" if worst <= TARGET_RATIO else "not met"
    print(f"target: every analysis run at most {TARGET_RATIO}x the bare query: {verdict}")


if __name__ == "__main__":
    main()
