"""Per-time-window latency histograms per arm, for the contemporaneous quantile guardrail.

The quantile guardrail (`analysis.stats.quantile_exceedance`) compares the arms inside each of
the proxy's time buckets (`routing.models.ObservationBucket`, one row per variant, bucket and
flush), so it needs the histograms per (variant, bucket start), not only the merged rollup.

Only *closed* buckets are read: a bucket starting at ``s`` is used once
``s + OBSERVATION_BUCKET_S + 2 * RECORDER_FLUSH_S <= now``, by which time every edge process has
flushed it. A window's e-value is then computed on its complete data and is the same at every
later look, so the running maximum over looks is the maximum of one e-process path, which is
what Ville's inequality covers (a window first seen half-written and later complete would be
two different bets on the same data). A row that arrives later still (an edge that stalled
for longer than that) is added at the next look; this is the same one-interval lag the
rollup's cursor assumes (`analysis.aggregation`).

Cost: one row per (variant, bucket, flush) since the start, read at every look of an
experiment that has a quantile guardrail: about 2,200 rows for a six-hour canary with two arms
and 10-second buckets.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from experiments.contracts import ExperimentView
from routing.models import ObservationBucket
from routing.observe.histogram import LogHistogram

_CHUNK = 2000


class WindowedLogHistogram(LogHistogram):
    """An arm's merged histogram that also keeps its closed per-bucket parts (by bucket start).

    It is a `LogHistogram` (everything that reads the merged histogram keeps working) and
    satisfies `analysis.stats.quantile_exceedance.WindowedLatencyHistogram`.
    """

    __slots__ = ("_windows",)

    def __init__(self, merged: LogHistogram, windows: Mapping[datetime, LogHistogram]) -> None:
        super().__init__(merged.relative_accuracy)
        self.merge(merged)
        self._windows = dict(windows)

    @property
    def windows(self) -> Mapping[object, LogHistogram]:
        return self._windows


def closed_before(now: datetime) -> datetime:
    """Buckets starting at or before this moment are closed (see the module docstring)."""
    return now - timedelta(
        seconds=float(settings.OBSERVATION_BUCKET_S) + 2.0 * float(settings.RECORDER_FLUSH_S)
    )


def latency_windows(
    *, experiment: ExperimentView, now: datetime | None = None
) -> dict[str, dict[datetime, LogHistogram]]:
    """Per variant, the merged histogram of every closed bucket (flushes summed).

    Empty (and no query) unless the experiment has a quantile metric.
    """
    if not any(use.metric.kind == "quantile" for use in experiment.metrics):
        return {}
    before = closed_before(now if now is not None else timezone.now())
    rows = (
        ObservationBucket.objects.filter(
            experiment_id=experiment.id, is_shadow=False, bucket_start__lte=before
        )
        .exclude(latency_histogram="")
        .order_by()
        .values_list("variant_key", "bucket_start", "latency_histogram")
    )
    result: dict[str, dict[datetime, LogHistogram]] = {}
    for variant, start, text in rows.iterator(chunk_size=_CHUNK):
        per_variant = result.setdefault(variant, {})
        histogram = LogHistogram.from_json(text)
        if start in per_variant:
            per_variant[start].merge(histogram)
        else:
            per_variant[start] = histogram
    return result
