"""Fixed-horizon tests (Welch t or z) for reports; not valid when results are peeked at.

These reproduce gbstats `TwoSidedTTest` / `OneSidedTreatment*TTest` (STATS.md 1.3): Welch t
with Welch-Satterthwaite df even for proportions, on (estimate, SE) from `effects`. The z
variant is the large-sample test of spotify-confidence and statsmodels. Decisions under
continuous monitoring must use `sequential` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from scipy import stats as scipy_stats

from analysis.stats.effects import EffectError, EffectEstimate

Alternative = Literal["two-sided", "greater", "less"]
Distribution = Literal["t", "z"]


@dataclass(frozen=True, slots=True)
class FixedHorizonResult:
    """Test of H0: effect = null, with a (1 - alpha) confidence interval.

    For one-sided alternatives the interval is one-sided: [lower, +inf) for "greater" and
    (-inf, upper] for "less". On degenerate input `error` is set, the estimate and interval
    are 0 and p is 1 (gbstats' "no result").
    """

    estimate: float
    se: float
    statistic: float
    df: float
    p_value: float
    ci_lower: float
    ci_upper: float
    alpha: float
    alternative: Alternative
    error: EffectError | None = None


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def fixed_horizon_test(
    effect: EffectEstimate,
    *,
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
    null: float = 0.0,
    distribution: Distribution = "t",
) -> FixedHorizonResult:
    """Welch t (default) or z test of the effect, two- or one-sided (STATS.md 1.3)."""
    _check_alpha(alpha)
    if not effect.ok:
        return FixedHorizonResult(
            estimate=0.0,
            se=0.0,
            statistic=0.0,
            df=0.0,
            p_value=1.0,
            ci_lower=0.0,
            ci_upper=0.0,
            alpha=alpha,
            alternative=alternative,
            error=effect.error,
        )
    statistic = (effect.estimate - null) / effect.se
    df = effect.df if distribution == "t" else math.inf
    reference = scipy_stats.t(df) if math.isfinite(df) else scipy_stats.norm()
    if alternative == "two-sided":
        p_value = 2.0 * float(reference.sf(abs(statistic)))
        half_width = float(reference.isf(alpha / 2)) * effect.se
        lower, upper = effect.estimate - half_width, effect.estimate + half_width
    elif alternative == "greater":
        p_value = float(reference.sf(statistic))
        lower, upper = effect.estimate - float(reference.isf(alpha)) * effect.se, math.inf
    else:
        p_value = float(reference.cdf(statistic))
        lower, upper = -math.inf, effect.estimate + float(reference.isf(alpha)) * effect.se
    return FixedHorizonResult(
        estimate=effect.estimate,
        se=effect.se,
        statistic=statistic,
        df=df,
        p_value=min(p_value, 1.0),
        ci_lower=lower,
        ci_upper=upper,
        alpha=alpha,
        alternative=alternative,
    )
