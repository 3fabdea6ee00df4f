"""Per-user latency sums by stratum, for the mean-latency metrics (analysis.stats.latency_mean).

The edge writes one `routing.models.UnitOutcome` row per user: its requests' latency sum and
count within RATE_WINDOW_SLOW_S of its first request, and the probabilities of its arm and
of control at that moment (`routing.unit_outcomes`). `user_latency` reads, in one GROUP BY,
the sums of the users whose window has closed and whose counts have settled (first request
before now - RATE_WINDOW_SLOW_S - `settle_s()`, as the rate guardrail), per arm and stratum:
the period of the experiment in force at the user's first request
(`experiments.periods.step_periods`: ramp steps, pauses, split changes) and control's share
then. Users with no latency (no upstream call) are left out. Which users count never depends
on their latencies, and each counts once with its whole window.

The strata are combined by `analysis.stats.latency_mean.user_latency_means` (the same
Mantel-Haenszel weights as the per-user business metrics), over every routed arm with users.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db.models import Model

from analysis.aggregation import BUILTIN_LATENCY
from analysis.rate_guardrails import settle_s, windows_s
from analysis.sql import fetch, table
from analysis.stats.latency_mean import user_latency_means
from analysis.stats.moments import RatioStats
from analysis.stats.strata import Standardized
from experiments.contracts import ExperimentView, StepPeriod
from experiments.periods import step_periods
from routing.models import UnitOutcome

# Control's shares closer than this are the same stratum (floating-point noise of the split).
_SHARE_DIGITS = 9


def has_latency_mean(view: ExperimentView) -> bool:
    """Whether any metric of the experiment is the proxy's mean latency."""
    return any(
        use.metric.source == BUILTIN_LATENCY and use.metric.kind == "mean" for use in view.metrics
    )


def horizon(now: float) -> float:
    """Users first seen before this epoch time have closed and settled latency windows."""
    return now - windows_s()[1] - settle_s()


def user_latency_strata(
    *, experiment_id: int, now: float, periods: Sequence[StepPeriod]
) -> dict[str, dict[int, RatioStats]]:
    """Per variant and stratum, the ratio statistics of latency sum over latency count."""
    return user_ratio_strata(
        experiment_id=experiment_id,
        now=now,
        periods=periods,
        model=UnitOutcome,
        sum_column="latency_sum",
        count_column="latency_count",
    )


def user_ratio_strata(
    *,
    experiment_id: int,
    now: float,
    periods: Sequence[StepPeriod],
    model: type[Model],
    sum_column: str,
    count_column: str,
) -> dict[str, dict[int, RatioStats]]:
    """Per variant and stratum, the ratio statistics of the users' ``sum_column`` over their
    ``count_column`` in ``model``'s per-user rows (users with a zero count left out).

    Strata are numbered in (period, control share) order, the same numbering for every
    variant. The column names are the caller's constants, never input.
    """
    starts = [period.start.timestamp() for period in periods[1:]]
    if starts:
        cases = " ".join(f"WHEN first_seen < %s THEN {i}" for i in range(len(starts)))
        period_sql = f"CASE {cases} ELSE {len(starts)} END"
    else:
        period_sql = "0"
    num, den = sum_column, count_column
    sql = f"""
        SELECT variant_key, control_share, {period_sql} AS period, COUNT(*),
               SUM({num}), SUM({num} * {num}), SUM({den}), SUM({den} * {den}),
               SUM({num} * {den})
        FROM {table(model)}
        WHERE experiment_id = %s AND first_seen < %s AND {den} > 0
        GROUP BY 1, 2, 3
    """
    params = [*starts, experiment_id, horizon(now)]
    cells: dict[tuple[str, int, float], RatioStats] = {}
    for variant, share, period, n, m, mm, d, dd, md in fetch(sql, params):
        key = (str(variant), int(period), round(float(share), _SHARE_DIGITS))
        stats = RatioStats(
            n=int(n),
            numerator_sum=float(m),
            numerator_sum_squares=float(mm),
            denominator_sum=float(d),
            denominator_sum_squares=float(dd),
            cross_sum=float(md),
        )
        cells[key] = cells[key] + stats if key in cells else stats
    numbers = {stratum: i for i, stratum in enumerate(sorted({k[1:] for k in cells}))}
    result: dict[str, dict[int, RatioStats]] = {}
    for (variant, period, share), stats in cells.items():
        result.setdefault(variant, {})[numbers[(period, share)]] = stats
    return result


def user_latency(
    view: ExperimentView, *, now: float, periods: Sequence[StepPeriod] | None = None
) -> Standardized | None:
    """The arms' standardised user latency sums, or None without a mean-latency metric."""
    if not has_latency_mean(view):
        return None
    if periods is None:
        periods = step_periods(experiment_id=view.id)
    strata = user_latency_strata(experiment_id=view.id, now=now, periods=periods)
    arms = [variant.key for variant in view.routed_variants if strata.get(variant.key)]
    return user_latency_means(strata, arms=arms)
