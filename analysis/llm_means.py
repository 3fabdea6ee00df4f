"""The generative models' mean metrics with the user as the unit, within ramp-step strata.

TTFT (as a mean), output tokens per request, output tokens per second (the mean of per-request
rates) and cost per request are per-request means. A user's answers are not independent (its
prompts, client and region), and a heavy user sends thousands, so these are compared like mean
latency (`analysis.stats.latency_mean`, `analysis.latency_means`): per user, the sum of the
metric over its answers and their number within RATE_WINDOW_SLOW_S of its first request
(`routing.models.UnitLLMOutcome`, written by `routing.observe.unit_llm`), a ratio metric with
a delta-method variance per arm, in strata of constant assignment probability (the ramp step
and control's share at the user's first request) combined with Mantel-Haenszel weights, then
the harm test of every mean guardrail. Users whose window has not closed and settled wait;
users with no such answer (a zero count) are left out, by a rule that does not look at the
metric's values.

Cost per conversion is not here: it is a ratio of the users' ``llm_cost`` events to their
conversions (`routing.observe.llm_costs`), analysed like every ratio of business events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from analysis.latency_means import user_ratio_strata
from analysis.stats.latency_mean import comparison, user_latency_means
from analysis.stats.strata import Standardized
from experiments.contracts import (
    BUILTIN_COST,
    BUILTIN_OUTPUT_TOKENS,
    BUILTIN_TOKENS_PER_S,
    BUILTIN_TTFT,
    ExperimentView,
    MetricView,
    StepPeriod,
)
from experiments.periods import step_periods
from routing.models import UnitLLMOutcome

__all__ = ["QUANTITIES", "is_llm_mean", "llm_comparison", "user_llm_means"]

# Per source: the per-user sum and count columns of UnitLLMOutcome.
_COLUMNS: Final = {
    BUILTIN_TTFT: ("ttft_sum", "ttft_count"),
    BUILTIN_OUTPUT_TOKENS: ("output_tokens_sum", "output_tokens_count"),
    BUILTIN_TOKENS_PER_S: ("rate_sum", "rate_count"),
    BUILTIN_COST: ("cost_sum", "cost_count"),
}
# What the result rows and alerts say the per-user ratio is.
QUANTITIES: Final = {
    BUILTIN_TTFT: "TTFT sum / streamed answers per user",
    BUILTIN_OUTPUT_TOKENS: "output tokens / answers per user",
    BUILTIN_TOKENS_PER_S: "sum of answers' tokens per second / answers per user",
    BUILTIN_COST: "cost / priced answers per user",
}


def is_llm_mean(metric: MetricView) -> bool:
    """A generative model's mean metric (compared on users within ramp steps)."""
    return metric.source in _COLUMNS and metric.kind == "mean"


def user_llm_means(
    view: ExperimentView, *, now: float, periods: Sequence[StepPeriod] | None = None
) -> dict[str, Standardized]:
    """Per LLM mean metric's source, the arms' standardised per-user sums (empty if none)."""
    sources = sorted({use.metric.source for use in view.metrics if is_llm_mean(use.metric)})
    if not sources:
        return {}
    if periods is None:
        periods = step_periods(experiment_id=view.id)
    result: dict[str, Standardized] = {}
    for source in sources:
        sum_column, count_column = _COLUMNS[source]
        strata = user_ratio_strata(
            experiment_id=view.id,
            now=now,
            periods=periods,
            model=UnitLLMOutcome,
            sum_column=sum_column,
            count_column=count_column,
        )
        arms = [variant.key for variant in view.routed_variants if strata.get(variant.key)]
        result[source] = user_latency_means(strata, arms=arms)
    return result


def llm_comparison(combined: Standardized, metric: MetricView, *, control: str, arm: str) -> object:
    """The (control, arm) pair the guardrail test takes (`analysis.stats.latency_mean`)."""
    return comparison(combined, control=control, arm=arm, quantity=QUANTITIES[metric.source])
