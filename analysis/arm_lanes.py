"""Each treatment arm's lane: its constant share of the traffic that does not go to control.

The rate guardrail's mirror (non-inferiority) bet needs, for every control user, the tested
arm's assignment probability at the user's first request (`analysis.stats.betting`), but a
`UnitOutcome` row stores only the user's own arm's and control's. The planned split gives
every treatment arm B the share rho_B = (1 - rho_A) * lane_B, lane_B = w_B / sum of the
treatment arms' weights (`experiments.periods`, the rule of `routing.split.planned_split`);
ramp steps and pauses change only control's share. So while the variants' weights never
change, rho_B = (1 - rho_A) * lane_B holds exactly for every user, whichever snapshot served
it. With one treatment arm the lane is 1. A change of the weights (an `update` period with
other lanes) makes the lanes unknown for users around the change: `treatment_lanes` then
returns None and promotion by the mirror bet stays off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from experiments.contracts import StepPeriod


def treatment_lanes(
    periods: Sequence[StepPeriod], *, control: str, treatments: Sequence[str]
) -> dict[str, float] | None:
    """The treatment arms' lanes if they were the same in every period that routed to them."""
    if len(treatments) == 1:
        return {treatments[0]: 1.0}
    lanes: dict[str, float] | None = None
    for period in periods:
        rest = 1.0 - float(period.shares.get(control, 0.0))
        if rest <= 1e-12:
            continue
        current = {arm: float(period.shares.get(arm, 0.0)) / rest for arm in treatments}
        if lanes is None:
            lanes = current
        elif any(not math.isclose(lanes[arm], current[arm], rel_tol=1e-9) for arm in treatments):
            return None
    return lanes
