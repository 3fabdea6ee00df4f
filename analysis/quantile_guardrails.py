"""Folding users into the quantile guardrails' betting e-processes, run by run.

Quantile guardrails on the proxy's histograms (p95 / p99 of latency or of TTFT, lower is
better) take the user as the unit (`analysis.stats.quantile_users`): the edge writes, per
user, its values per histogram bucket within RATE_WINDOW_FAST_S and RATE_WINDOW_SLOW_S of its
first request (`UserHistograms`: latency in `routing.models.UnitOutcome.latency_buckets_fast`
/ `_slow`, TTFT in `routing.models.UnitLLMOutcome.ttft_buckets_fast` / `_slow`), and every
analysis run bets on the users whose window has closed since the last run, in the order of
their first requests, for each (quantile guardrail, treatment arm, window). A user's threshold
is control's p-quantile over control's closed 10-second buckets of the same histogram that
ended before the user's first request (`Aggregates.latency_windows`, or the TTFT windows of
`Aggregates.llm`). The states live in `analysis.models.RateBetState`
(keyed by the metric), and the cursor, settle time and ordering rules are those of
`analysis.rate_guardrails`: each user is bet on once, when its window has closed, and which
users are bet on never depends on their outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
from django.conf import settings
from django.utils import timezone
from scipy.special import logsumexp

from analysis.aggregation import BUILTIN_LATENCY
from analysis.models import RateBetState
from analysis.rate_guardrails import FOLD_BATCH, page_end, settle_s, windows_s
from analysis.stats.betting import RateBet, fold_users, log_mean_exp
from analysis.stats.quantile_exceedance import dense_windows, standardised_effect
from analysis.stats.quantile_users import (
    ControlHistory,
    UserLatencies,
    UserQuantileBets,
    bound_levels,
    margin_shift,
    thresholds,
)
from analysis.stats.rate_guardrail import UserRateBets
from experiments.contracts import BUILTIN_TTFT, ExperimentMetricView, ExperimentView
from routing.models import UnitLLMOutcome, UnitOutcome
from routing.observe.histogram import LogHistogram
from routing.observe.unit_outcomes import decode_buckets


@dataclass(frozen=True, slots=True)
class UserHistograms:
    """Where the users' bucket counts of one histogram are: the table, and per window (fast,
    slow) the column that says the user had requests in it and the bucket-count column."""

    model: type[UnitOutcome] | type[UnitLLMOutcome]
    columns: tuple[tuple[str, str], tuple[str, str]]
    outcome: str


LATENCY = UserHistograms(
    UnitOutcome,
    (("requests_fast", "latency_buckets_fast"), ("requests_slow", "latency_buckets_slow")),
    "requests",
)
TTFT = UserHistograms(
    UnitLLMOutcome,
    (("answers_fast", "ttft_buckets_fast"), ("answers_slow", "ttft_buckets_slow")),
    "generative answers' TTFTs",
)
SOURCES = {BUILTIN_LATENCY: LATENCY, BUILTIN_TTFT: TTFT}
_REFERENCE = LogHistogram()
_LOG_RATIO = float(np.log(_REFERENCE.upper_edge(1) / _REFERENCE.upper_edge(0)))

Windows = Mapping[str, Mapping[datetime, LogHistogram]]


def is_user_quantile_guardrail(use: ExperimentMetricView) -> bool:
    """Latency and TTFT quantile guardrails (lower is better), tested with users as the unit."""
    metric = use.metric
    return (
        use.role == "guardrail"
        and metric.source in SOURCES
        and metric.kind == "quantile"
        and metric.lower_is_better
        and metric.quantile is not None
    )


def control_history(windows: Windows, control: str) -> ControlHistory:
    """Control's closed per-bucket histograms, as `ControlHistory`."""
    buckets = [
        (start.timestamp(), dict(histogram))
        for start, histogram in windows.get(control, {}).items()
        if histogram.count
    ]
    return ControlHistory.from_buckets(buckets, bucket_s=float(settings.OBSERVATION_BUCKET_S))


def _effect(windows: Windows, control: str, arm: str, p: float) -> float:
    """The canary's p-quantile over control's reweighted to its time profile, minus one."""
    a, b = windows.get(control, {}), windows.get(arm, {})
    keys = sorted(set(a) & set(b))
    if not keys:
        return float("nan")
    return standardised_effect(dense_windows([[(a[key], b[key])] for key in keys]), p)


def _fold_window(
    state: RateBetState,
    *,
    control: str,
    arm: str,
    model: type[UnitOutcome] | type[UnitLLMOutcome],
    columns: tuple[str, str],
    horizon: float,
    history: ControlHistory,
    p: float,
    shifts: tuple[int, int],
    bound_shifts: Mapping[str, int],
) -> float:
    """Bet on the users first seen in [cursor, horizon); returns the last threshold in ms.

    The state is the `RateBet` JSON plus ``"bounds"``: per extra harm bet of ``bound_shifts``,
    the grid log-wealths (`analysis.stats.quantile_users.bound_levels`).
    """
    requests, buckets = columns
    bet = RateBet.from_json(state.state)
    stored = state.state.get("bounds", {}) if isinstance(state.state, dict) else {}
    bounds = {
        level: RateBet(harm_log_wealth=tuple(stored[level]))
        if len(stored.get(level, ())) == len(bet.harm_log_wealth)
        else RateBet()
        for level in bound_shifts
    }
    cursor = state.cursor
    last_threshold = float("nan")
    while cursor < horizon:
        rows = list(
            model.objects.filter(  # type: ignore[attr-defined]
                experiment_id=state.experiment_id,
                variant_key__in=(control, arm),
                first_seen__gte=cursor,
                first_seen__lt=horizon,
                **{f"{requests}__gt": 0},
            )
            .order_by("first_seen", "id")
            .values_list("variant_key", "share", "control_share", buckets, "first_seen")[
                :FOLD_BATCH
            ]
        )
        if not rows:
            cursor = horizon
            break
        rows, next_cursor = page_end(rows, batch=FOLD_BATCH, first_seen_at=4, horizon=horizon)
        treated = np.array([row[0] == arm for row in rows], dtype=bool)
        share = np.array([row[1] for row in rows], dtype=float)
        control_share = np.array([row[2] for row in rows], dtype=float)
        first_seen = np.array([row[4] for row in rows], dtype=float)
        index, found = thresholds(history, first_seen, p=p)
        usable = found & (control_share > 0) & (control_share < 1) & (share > 0) & (share < 1)
        picked = np.flatnonzero(usable)
        latencies = UserLatencies.from_counts([decode_buckets(rows[i][3]) for i in picked])
        in_b = treated[picked]
        treated_share = np.where(treated, share, 1 - control_share)[picked]
        # Harm: strictly above k (+ s for the canary); non-inferiority: at or above k (+ s').
        outcomes = (
            latencies.shares(index[picked] + np.where(in_b, shifts[0], 0)),
            latencies.shares(index[picked] + np.where(in_b, shifts[1], 0), inclusive=True),
        )
        harm_bet, safe_bet = (
            fold_users(
                bet,
                outcome=outcome,
                treated=in_b,
                treated_share=treated_share,
                control_share=control_share[picked],
                margin=0.0,
            )
            for outcome in outcomes
        )
        bet = replace(harm_bet, safe_log_wealth=safe_bet.safe_log_wealth)
        for level, shift in bound_shifts.items():
            bounds[level] = fold_users(
                bounds[level],
                outcome=latencies.shares(index[picked] + np.where(in_b, shift, 0)),
                treated=in_b,
                treated_share=treated_share,
                control_share=control_share[picked],
                margin=0.0,
            )
        if len(picked):
            last_threshold = _REFERENCE.upper_edge(int(index[picked[-1]]))
        cursor = float(next_cursor)
    state.state = {
        **bet.as_json(),
        "bounds": {level: list(b.harm_log_wealth) for level, b in bounds.items()},
    }
    state.cursor = cursor
    state.save(update_fields=["state", "cursor", "margin"])
    return last_threshold


def quantile_bets_update(
    view: ExperimentView,
    *,
    control: str,
    treatments: Sequence[str],
    latency_windows: Windows,
    now: float | None = None,
    ttft_windows: Windows | None = None,
) -> dict[tuple[str, str], UserQuantileBets]:
    """Fold the users whose windows closed into every latency and TTFT quantile guardrail.

    Runs inside the analysis run's transaction (under its lock). Returns, per (metric key,
    treatment arm), the states to evaluate.
    """
    uses = [use for use in view.metrics if is_user_quantile_guardrail(use)]
    if not uses:
        return {}
    now = timezone.now().timestamp() if now is None else now
    windows = windows_s()
    by_source = {BUILTIN_LATENCY: latency_windows, BUILTIN_TTFT: ttft_windows or {}}
    histories = {
        source: control_history(by_source[source], control)
        for source in {use.metric.source for use in uses}
    }
    result: dict[tuple[str, str], UserQuantileBets] = {}
    for use in uses:
        source = SOURCES[use.metric.source]
        history = histories[use.metric.source]
        margin = float(use.margin)
        p = float(use.metric.quantile)  # type: ignore[arg-type]
        shifts = (
            margin_shift(margin, _LOG_RATIO),
            margin_shift(margin, _LOG_RATIO, harm=False),
        )
        levels = bound_levels(margin, _LOG_RATIO)
        bound_shifts = {key: shift for key, (shift, _) in levels.items()}
        for arm in treatments:
            bets = []
            bound_log_e: dict[str, list[float]] = {level: [] for level in bound_shifts}
            threshold_ms = float("nan")
            for window, columns in zip(windows, source.columns, strict=True):
                state, _ = RateBetState.objects.get_or_create(
                    experiment_id=view.id,
                    metric_key=use.metric.key,
                    arm=arm,
                    window_s=window,
                    defaults={"margin": margin},
                )
                if state.margin != margin:
                    state.margin, state.cursor, state.state = margin, 0.0, {}
                latest = _fold_window(
                    state,
                    control=control,
                    arm=arm,
                    model=source.model,
                    columns=columns,
                    horizon=now - window - settle_s(),
                    history=history,
                    p=p,
                    shifts=shifts,
                    bound_shifts=bound_shifts,
                )
                if not np.isnan(latest):
                    threshold_ms = latest
                bets.append(RateBet.from_json(state.state))
                for level, wealth in state.state["bounds"].items():
                    bound_log_e[level].append(log_mean_exp(wealth))
            result[(use.metric.key, arm)] = UserQuantileBets(
                bets=UserRateBets(
                    windows_s=windows, bets=tuple(bets), promotion=len(treatments) == 1
                ),
                quantile=p,
                shift=shifts[0],
                threshold_ms=threshold_ms,
                relative_effect=_effect(by_source[use.metric.source], control, arm, p),
                outcome=source.outcome,
                bounds=tuple(
                    (levels[level][1], float(logsumexp(values)) - math.log(len(values)))
                    for level, values in bound_log_e.items()
                ),
            )
    return result
