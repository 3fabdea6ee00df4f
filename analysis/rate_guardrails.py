"""Folding users into the rate guardrails' betting e-processes, run by run.

The error-rate guardrail takes the user as the unit (STATS.md 12.1): the edge writes one
`routing.models.UnitOutcome` row per user (its requests and failures within
RATE_WINDOW_FAST_S and RATE_WINDOW_SLOW_S of its first request, and the assignment
probabilities at that moment), and every analysis run bets on the users whose window has
closed since the last run, in the order of their first requests, for each (error guardrail,
treatment arm, window). The states live in `analysis.models.RateBetState`.

When is a user's outcome final?
    The edge counts a request only if it completes within the window and flushes its counts
    at least every RECORDER_FLUSH_S. A user whose first request completed at t is bet on once
    the run's clock passes t + window + `settle_s()` (two flush intervals and half a second
    more). Each user is bet on once; the cursor (the first-request time up to which users
    have been bet on) only moves forward, so counts that reach the database later still (a
    flush delayed by a database outage) are not used. Which users are bet on, and when, never
    depends on their outcomes, so the e-process stays exact.

A user's arm and shares are those of its first request; only users of control and of the
tested arm take part in that arm's bets (the others' bet is 0). A change of the guardrail's
margin restarts its e-processes (the running maximum of the evidence is kept by
`SequentialState`, so an earlier alarm stays fired).

With several treatment arms the mirror (non-inferiority) bet takes the tested arm's share
for control users from the arms' lanes (`analysis.arm_lanes`): exact while the variants'
weights never change. A state records the lane its mirror bet was placed with
(`mirror_lane`); one placed otherwise (weights changed, or folded before lanes were used)
never shows non-inferiority.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from django.conf import settings
from django.utils import timezone

from analysis.aggregation import BUILTIN_ERROR
from analysis.arm_lanes import treatment_lanes
from analysis.models import RateBetState
from analysis.stats.betting import RateBet, fold_users
from analysis.stats.rate_guardrail import UserRateBets
from experiments.contracts import ExperimentMetricView, ExperimentView
from experiments.periods import step_periods
from routing.models import UnitOutcome

_COLUMNS = (("requests_fast", "errors_fast"), ("requests_slow", "errors_slow"))
# Users folded per query (each run folds at most this many per window and arm).
FOLD_BATCH = 200_000


def settle_s() -> float:
    """Seconds after a user's window closes before its counts are taken as final."""
    return 2 * float(settings.RECORDER_FLUSH_S) + 0.5


def windows_s() -> tuple[float, float]:
    return float(settings.RATE_WINDOW_FAST_S), float(settings.RATE_WINDOW_SLOW_S)


def page_end(
    rows: list[tuple[Any, ...]], *, batch: int, first_seen_at: int, horizon: float
) -> tuple[list[tuple[Any, ...]], float]:
    """The users of one fold page and the cursor after them.

    A full page (`batch` rows, ordered by first-seen time) stops before its last
    first-seen time, so users sharing it are folded together in the next page.
    """
    if len(rows) < batch:
        return rows, horizon
    last = rows[-1][first_seen_at]
    rows = [row for row in rows if row[first_seen_at] < last] or rows
    return rows, last if rows[-1][first_seen_at] < last else float(np.nextafter(last, np.inf))


def is_rate_guardrail(use: ExperimentMetricView) -> bool:
    """Per-request binary outcomes tested with users as the unit (lower is better)."""
    metric = use.metric
    return (
        use.role == "guardrail"
        and metric.source == BUILTIN_ERROR
        and metric.kind == "binomial"
        and metric.lower_is_better
    )


def _fold_window(
    state: RateBetState,
    *,
    control: str,
    arm: str,
    columns: tuple[str, str],
    horizon: float,
    lane: float | None = 1.0,
) -> None:
    """Bet on the users first seen in [cursor, horizon) (their windows closed).

    `lane` is the tested arm's share of the non-control traffic, None when unknown.
    """
    requests, errors = columns
    bet = RateBet.from_json(state.state)
    cursor = state.cursor
    while cursor < horizon:
        rows = list(
            UnitOutcome.objects.filter(
                experiment_id=state.experiment_id,
                variant_key__in=(control, arm),
                first_seen__gte=cursor,
                first_seen__lt=horizon,
                **{f"{requests}__gt": 0},
            )
            .order_by("first_seen", "id")
            .values_list("variant_key", "share", "control_share", requests, errors, "first_seen")[
                :FOLD_BATCH
            ]
        )
        if not rows:
            cursor = horizon
            break
        rows, next_cursor = page_end(rows, batch=FOLD_BATCH, first_seen_at=5, horizon=horizon)
        treated = np.array([row[0] == arm for row in rows], dtype=bool)
        share = np.array([row[1] for row in rows], dtype=float)
        control_share = np.array([row[2] for row in rows], dtype=float)
        outcome = np.array([row[4] / row[3] for row in rows], dtype=float)
        # A user's own arm's share is stored. The harm bet of a control user needs only
        # control's; the mirror bet the tested arm's, (1 - control's) * its lane.
        usable = (control_share > 0) & (control_share < 1) & (share > 0) & (share < 1)
        rest = (1 - control_share) * (lane if lane is not None else 1.0)
        bet = fold_users(
            bet,
            outcome=outcome[usable],
            treated=treated[usable],
            treated_share=np.where(treated, share, rest)[usable],
            control_share=control_share[usable],
            margin=state.margin,
        )
        cursor = float(next_cursor)
    state.state = {**bet.as_json(), "mirror_lane": lane}
    state.cursor = cursor
    state.save(update_fields=["state", "cursor", "margin"])


def rate_bets_update(
    view: ExperimentView, *, control: str, treatments: Sequence[str], now: float | None = None
) -> dict[tuple[str, str], UserRateBets]:
    """Fold the users whose windows closed into every rate guardrail's e-processes.

    Runs inside the analysis run's transaction (under its lock). Returns, per (metric key,
    treatment arm), the states to evaluate.
    """
    now = timezone.now().timestamp() if now is None else now
    windows = windows_s()
    result: dict[tuple[str, str], UserRateBets] = {}
    uses = [use for use in view.metrics if is_rate_guardrail(use)]
    lanes: dict[str, float] | None = {arm: 1.0 for arm in treatments}
    if uses and len(treatments) > 1:
        periods = step_periods(experiment_id=view.id)
        lanes = treatment_lanes(periods, control=control, treatments=treatments)
    for use in uses:
        margin = float(use.margin)
        for arm in treatments:
            lane = lanes.get(arm) if lanes is not None else None
            lane = lane if lane is not None and lane > 0 else None
            promotion = lane is not None
            bets = []
            for window, columns in zip(windows, _COLUMNS, strict=True):
                state, _ = RateBetState.objects.get_or_create(
                    experiment_id=view.id,
                    metric_key=use.metric.key,
                    arm=arm,
                    window_s=window,
                    defaults={"margin": margin},
                )
                if state.margin != margin:
                    state.margin, state.cursor, state.state = margin, 0.0, {}
                # The mirror bet is valid only if every user so far was bet on with this lane
                # (states from before lanes were recorded are valid with one treatment arm).
                recorded = state.state.get("mirror_lane", 1.0 if len(treatments) == 1 else None)
                valid = lane is not None and (state.cursor == 0 or recorded == lane)
                _fold_window(
                    state,
                    control=control,
                    arm=arm,
                    columns=columns,
                    horizon=now - window - settle_s(),
                    lane=lane if valid else None,
                )
                promotion = promotion and valid
                bets.append(RateBet.from_json(state.state))
            result[(use.metric.key, arm)] = UserRateBets(
                windows_s=windows, bets=tuple(bets), promotion=promotion
            )
    return result
