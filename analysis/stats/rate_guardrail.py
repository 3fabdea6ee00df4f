"""The rate guardrail's evidence from the users' betting e-processes (analysis.stats.betting).

`rate_evidence` turns the fast- and slow-window states of one (guardrail, arm) pair into the
`GuardrailEvidence` every guardrail returns. The e-value is the average of the windows'
mixture e-values (harm: likelihood ratios over the relative harm, prior centred on a doubling
beyond the margin; analysis.stats.betting); it rolls back at E >= 1 / alpha_k and shows
non-inferiority at
E' >= 1 / alpha_k for the mirror bet, so the false-rollback bound of
`analysis.stats.guardrails` (weighted Bonferroni over guardrails and arms) is unchanged and
holds exactly, at every number of users, with the user as the unit. The always-valid
p-value is min(1, 1 / E); the caller keeps its running minimum.

There is no confidence interval on the relative effect: the bounds are the margin when a
side has been decided (harm: [margin, inf); non-inferior: (-inf, margin]) and unbounded
otherwise. The reported effect is the ratio of the arms' mean user outcomes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.stats.betting import RateBet, combined_log_e
from analysis.stats.guardrail_types import GuardrailEvidence, GuardrailSpec, GuardrailStatus

METHOD = "betting e-process on users (known assignment share), exact"


@dataclass(frozen=True, slots=True)
class UserRateBets:
    """The states of one (guardrail, arm) pair, one per outcome window (e.g. 3 s and 60 s)."""

    windows_s: tuple[float, ...]
    bets: tuple[RateBet, ...]
    # Whether the mirror bet (non-inferiority, for promotion) was placed with valid shares.
    promotion: bool = True

    def __post_init__(self) -> None:
        if not self.bets or len(self.bets) != len(self.windows_s):
            raise ValueError("need one bet state per window")


def rate_evidence(
    spec: GuardrailSpec, arm: str, bets: UserRateBets, *, alpha: float
) -> GuardrailEvidence:
    """Harm / non-inferiority decision of a lower-is-better per-request rate guardrail."""
    if not spec.lower_is_better:
        raise ValueError(f"{spec.metric_key}: the betting rate guardrail is lower-is-better")
    threshold = math.log(1 / alpha)
    harm_log_e = combined_log_e(bets.bets, harm=True)
    safe_log_e = combined_log_e(bets.bets, harm=False)
    # The report uses the longest window with users in both arms (else the longest at all).
    reported = max(
        (b for b in bets.bets if b.treated_users and b.control_users),
        key=lambda b: b.users,
        default=bets.bets[-1],
    )
    n_control = max(b.control_users for b in bets.bets)
    n_treatment = max(b.treated_users for b in bets.bets)
    windows = " + ".join(f"{w:g} s" for w in bets.windows_s)
    method = f"{METHOD}; user outcome = failed share of its requests within {windows}"
    if harm_log_e >= threshold:
        status = GuardrailStatus.HARM
        lower, upper = spec.margin, math.inf
    elif bets.promotion and safe_log_e >= threshold:
        status = GuardrailStatus.SAFE
        lower, upper = -math.inf, spec.margin
    elif not any(b.users for b in bets.bets):
        status = GuardrailStatus.BURN_IN
        lower, upper = -math.inf, math.inf
    else:
        status = GuardrailStatus.INCONCLUSIVE
        lower, upper = -math.inf, math.inf
    control_mean, treated_mean = reported.control_mean, reported.treated_mean
    relative = math.nan
    if control_mean > 0:
        relative = treated_mean / control_mean - 1
    elif control_mean == 0 and treated_mean > 0:
        relative = math.inf
    elif control_mean == 0 and treated_mean == 0:
        relative = 0.0
    return GuardrailEvidence(
        metric_key=spec.metric_key,
        arm=arm,
        kind=spec.kind,
        direction=spec.direction,
        status=status,
        margin=spec.margin,
        alpha=alpha,
        n_control=n_control,
        n_treatment=n_treatment,
        relative_effect=relative,
        harm_estimate=relative,
        harm_lower_bound=lower,
        harm_upper_bound=upper,
        interval=(lower, upper),
        statistic=harm_log_e,
        threshold=threshold,
        p_value=min(1.0, math.exp(-harm_log_e)) if harm_log_e > 0 else 1.0,
        note="no user's window has closed yet" if status is GuardrailStatus.BURN_IN else "",
        method=method,
    )
