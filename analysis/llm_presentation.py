"""The experiment page's generative-model figures: TTFT, tokens per second and cost per version.

Read from the result snapshots (``latency[arm]["llm"]``, written by ``analysis.llm_metrics``):
one table line per version for the latest run, and one series per version over the runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analysis.models import ResultSnapshot
from experiments.contracts import ExperimentView

SERIES_FIELDS = ("ttft_p50", "ttft_p95", "ttft_p99", "tokens_per_s_mean", "cost_mean")


@dataclass(frozen=True)
class LLMLine:
    key: str
    is_control: bool
    css: str
    ttft_p50: str
    ttft_p95: str
    ttft_p99: str
    tokens_per_s: str
    output_tokens: str
    cost: str
    counted: str
    prices: str


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def _number(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else "—"


def _money(value: Any) -> str:
    """A cost per request in dollars, with enough digits for fractions of a cent."""
    if not isinstance(value, int | float):
        return "—"
    return f"${value:.6f}" if value < 0.01 else f"${value:,.4f}"


def llm_lines(view: ExperimentView, latency: Mapping[str, Any]) -> list[LLMLine]:
    """One line per routed version, or none when no version has LLM figures yet."""
    figures = {key: (row or {}).get("llm") for key, row in latency.items()}
    if not any(figures.values()):
        return []
    lines = []
    for index, variant in enumerate(view.routed_variants):
        row = figures.get(variant.key) or {}
        requests = row.get("token_requests") or 0
        approx = row.get("approx_requests") or 0
        counted = f"{approx / requests:.0%} counted" if requests and approx else "from usage"
        prices = variant.prices
        lines.append(
            LLMLine(
                key=variant.key,
                is_control=variant.is_control,
                css=f"arm-{index % 6}",
                ttft_p50=_ms(row.get("ttft_p50")),
                ttft_p95=_ms(row.get("ttft_p95")),
                ttft_p99=_ms(row.get("ttft_p99")),
                tokens_per_s=_number(row.get("tokens_per_s_mean")),
                output_tokens=_number(row.get("output_tokens_mean")),
                cost=_money(row.get("cost_mean")),
                counted=counted if requests else "—",
                prices=f"${prices[0]:g} / ${prices[1]:g}" if prices else "no prices",
            )
        )
    return lines


def llm_series(arms: Sequence[str], history: Sequence[ResultSnapshot]) -> dict[str, Any]:
    """Per version and figure, one value per analysis run (None where there was none)."""
    return {
        arm: {
            name: [((s.latency or {}).get(arm) or {}).get("llm", {}).get(name) for s in history]
            for name in SERIES_FIELDS
        }
        for arm in arms
    }
