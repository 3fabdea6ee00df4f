"""Generative models' metrics per arm, read from the proxy's per-bucket LLM statistics.

The proxy stores what it measured of generative answers in ``ObservationBucket.llm``
(``routing.observe.llm_stats.LLMCell`` as JSON: TTFB, TTFT, chunks, tokens, per-request
rates, cost). This module merges them per variant and turns them into the statistics the
reports take, mirroring the latency metrics:

* ``ttft_ms`` as a quantile: the merged TTFT histogram with its closed per-bucket parts
  (``analysis.latency_windows.WindowedLogHistogram``) for the rows of quantile metrics; the
  closed parts are also control's history behind the p95 TTFT guardrail, which bets on users
  (``analysis.quantile_guardrails``, the per-user TTFT buckets of ``UnitLLMOutcome``);
* the means (TTFT, ``output_tokens``, ``output_tokens_per_s``, ``cost``) are not read here:
  they are compared on per-user sums (``analysis.llm_means``), like mean latency. The cells'
  pooled figures below are what the page shows per version.

Rows are read only for experiments that use one of these metrics or give a variant token
prices: one row per (variant, bucket, flush) that saw such answers, as for quantile metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from analysis.latency_windows import WindowedLogHistogram, closed_before
from experiments.contracts import BUILTIN_TTFT, LLM_SOURCES, ExperimentView, MetricView
from routing.models import ObservationBucket
from routing.observe.histogram import LogHistogram
from routing.observe.llm_stats import LLMCell

__all__ = ["LLM_SOURCES", "LLMTotals", "llm_aggregates", "llm_metric_stats", "llm_summary"]
_CHUNK = 2000


@dataclass
class LLMTotals:
    """One variant's merged LLM statistics and its closed per-bucket TTFT histograms."""

    cell: LLMCell = field(default_factory=LLMCell)
    ttft_windows: dict[datetime, LogHistogram] = field(default_factory=dict)


def uses_llm(experiment: ExperimentView) -> bool:
    """Whether an analysis of this experiment reads the LLM statistics."""
    return any(use.metric.source in LLM_SOURCES for use in experiment.metrics) or any(
        variant.prices is not None for variant in experiment.variants
    )


def llm_aggregates(
    *, experiment: ExperimentView, now: datetime | None = None
) -> dict[str, LLMTotals]:
    """Per variant, the LLM statistics of every bucket so far (empty if the experiment has none)."""
    if not uses_llm(experiment):
        return {}
    before = closed_before(now if now is not None else timezone.now())
    rows = (
        ObservationBucket.objects.filter(experiment_id=experiment.id, is_shadow=False)
        .exclude(llm="")
        .order_by()
        .values_list("variant_key", "bucket_start", "llm")
    )
    totals: dict[str, LLMTotals] = {}
    for variant, start, text in rows.iterator(chunk_size=_CHUNK):
        total = totals.setdefault(variant, LLMTotals())
        cell = LLMCell.from_json(text)
        total.cell.merge(cell)
        if cell.ttft.count and start <= before:
            window = total.ttft_windows.get(start)
            if window is None:
                total.ttft_windows[start] = cell.ttft
            else:
                window.merge(cell.ttft)
    return totals


def llm_metric_stats(metric: MetricView, totals: LLMTotals | None) -> object | None:
    """The TTFT histogram of one arm for a TTFT quantile metric (None for anything else:
    the means are per-user sums, ``analysis.llm_means``)."""
    if totals is None or metric.source != BUILTIN_TTFT or metric.kind != "quantile":
        return None
    ttft = totals.cell.ttft
    return WindowedLogHistogram(ttft, totals.ttft_windows) if ttft.count else None


def llm_summary(totals: Mapping[str, LLMTotals]) -> dict[str, dict[str, Any]]:
    """Per variant, the figures the results page shows: TTFT percentiles, rate, tokens, cost."""
    table: dict[str, dict[str, Any]] = {}
    for variant, total in sorted(totals.items()):
        cell = total.cell
        ttft, ttfb = cell.ttft, cell.ttfb
        table[variant] = {
            "streams": cell.streams,
            "chunks": cell.chunks,
            "ttfb_p50": ttfb.quantile(0.5) if ttfb.count else None,
            "ttft_n": int(ttft.count),
            "ttft_p50": ttft.quantile(0.5) if ttft.count else None,
            "ttft_p95": ttft.quantile(0.95) if ttft.count else None,
            "ttft_p99": ttft.quantile(0.99) if ttft.count else None,
            "token_requests": cell.token_requests,
            "approx_requests": cell.approx_requests,
            "input_tokens_mean": _ratio(cell.input_tokens, cell.token_requests),
            "output_tokens_mean": _ratio(cell.output_tokens, cell.token_requests),
            "tokens_per_s_mean": _ratio(cell.rate_sum, cell.rate_n),
            "cost_mean": _ratio(cell.cost_sum, cell.cost_n),
            "cost_total": cell.cost_sum if cell.cost_n else None,
        }
    return table


def _ratio(total: float, n: int) -> float | None:
    return total / n if n else None
