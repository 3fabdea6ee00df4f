"""Treatment effects and their standard errors from two arms' sufficient statistics.

Every test in this package (fixed-horizon, confidence sequences, mSPRT, guardrails) consumes
only the triple (estimate, SE, N) built here (STATS.md 1.2), for proportions, means, ratio
metrics (delta method, STATS.md 6) and CUPED-adjusted means (STATS.md 5). Degenerate inputs
return an estimate with `error` set instead of dividing by zero, as gbstats does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from analysis.stats.moments import CupedStats, MeanStats, MetricStats, ProportionStats, RatioStats


class EffectError(StrEnum):
    """Why an effect could not be estimated (the result then carries estimate 0, SE 0)."""

    INSUFFICIENT_DATA = "insufficient_data"
    BASELINE_ZERO = "baseline_zero"
    ZERO_VARIANCE = "zero_variance"


@dataclass(frozen=True, slots=True)
class ArmSummary:
    """One arm's point estimate and per-unit variance as the tests see them.

    For CUPED `mean`/`variance` are the adjusted ones and `unadjusted_mean` is the raw mean
    of the metric; for the other kinds the two means are equal.
    """

    n: int
    mean: float
    variance: float
    unadjusted_mean: float


@dataclass(frozen=True, slots=True)
class EffectEstimate:
    """Treatment-minus-control effect (absolute, or relative lift), its SE and sample sizes.

    `df` is the Welch-Satterthwaite degrees of freedom from the unscaled per-unit variances
    (STATS.md 1.3, as gbstats does even for relative effects). `cuped_theta` is the pooled
    regression coefficient when CUPED was applied, else None.
    """

    estimate: float
    se: float
    relative: bool
    control: ArmSummary
    treatment: ArmSummary
    df: float
    cuped_theta: float | None = None
    error: EffectError | None = None

    @property
    def n_control(self) -> int:
        return self.control.n

    @property
    def n_treatment(self) -> int:
        return self.treatment.n

    @property
    def total_n(self) -> int:
        """Pairwise total N = n_A + n_B, the time axis of every sequential formula."""
        return self.control.n + self.treatment.n

    @property
    def variance(self) -> float:
        return self.se * self.se

    @property
    def ok(self) -> bool:
        return self.error is None


def _welch_df(control: ArmSummary, treatment: ArmSummary) -> float:
    """Welch-Satterthwaite degrees of freedom (STATS.md 1.3)."""
    term_a = control.variance / control.n
    term_b = treatment.variance / treatment.n
    denominator = term_b**2 / (treatment.n - 1) + term_a**2 / (control.n - 1)
    if denominator <= 0:
        return math.inf
    return (term_a + term_b) ** 2 / denominator


def _failed(
    control: ArmSummary, treatment: ArmSummary, relative: bool, error: EffectError
) -> EffectEstimate:
    return EffectEstimate(
        estimate=0.0,
        se=0.0,
        relative=relative,
        control=control,
        treatment=treatment,
        df=0.0,
        error=error,
    )


def _from_summaries(
    control: ArmSummary,
    treatment: ArmSummary,
    *,
    relative: bool,
    control_terms: tuple[float, float, float] | None = None,
    cuped_theta: float | None = None,
) -> EffectEstimate:
    """Combine two arms into (estimate, SE) by STATS.md 1.2.

    `control_terms` = (var_Y, cov_XY, var_X) of the control arm switches the relative variance
    to the corrected CUPED delta method (STATS.md 5 step 4, gbstats development head).
    """
    if control.n < 2 or treatment.n < 2:
        return _failed(control, treatment, relative, EffectError.INSUFFICIENT_DATA)
    if relative and control.unadjusted_mean == 0:
        return _failed(control, treatment, relative, EffectError.BASELINE_ZERO)
    if control.variance <= 0 or treatment.variance <= 0:
        return _failed(control, treatment, relative, EffectError.ZERO_VARIANCE)
    difference = treatment.mean - control.mean
    if not relative:
        estimate = difference
        variance = treatment.variance / treatment.n + control.variance / control.n
    else:
        base = control.unadjusted_mean
        estimate = difference / abs(base)
        # First-order delta method on g = mu_B / mu_A - 1 with independent arms.
        treatment_part = treatment.variance / (treatment.n * base**2)
        if control_terms is None:
            control_part = control.variance * treatment.unadjusted_mean**2 / (control.n * base**4)
        else:
            # g = (Y_B - theta X_B - Y_A + theta X_A) / Y_A has gradient
            # (-Y_B / Y_A**2, theta / Y_A) in (Y_A, X_A) when X_A ~ X_B (randomisation), which
            # gives the control term of STATS.md 5 step 4 (gbstats development head).
            var_y, cov_xy, var_x = control_terms
            ratio = treatment.unadjusted_mean / base
            theta = cuped_theta if cuped_theta is not None else 0.0
            control_part = (var_y * ratio**2 - 2 * theta * cov_xy * ratio + theta**2 * var_x) / (
                control.n * base**2
            )
        variance = treatment_part + control_part
    if variance <= 0:
        return _failed(control, treatment, relative, EffectError.ZERO_VARIANCE)
    return EffectEstimate(
        estimate=estimate,
        se=math.sqrt(variance),
        relative=relative,
        control=control,
        treatment=treatment,
        df=_welch_df(control, treatment),
        cuped_theta=cuped_theta,
    )


def _summary(stats: ProportionStats | MeanStats | RatioStats) -> ArmSummary:
    mean = stats.mean
    return ArmSummary(n=stats.n, mean=mean, variance=stats.variance, unadjusted_mean=mean)


def cuped_theta(control: CupedStats, treatment: CupedStats) -> float:
    """Pooled CUPED coefficient theta = cov(Y, X) / var(X) over both arms (STATS.md 5 step 1).

    Returns 0 (no adjustment) when the pooled pre- or post-period variance is 0, as gbstats.
    """
    pooled = control + treatment
    if pooled.pre.variance <= 0 or pooled.post.variance <= 0:
        return 0.0
    return pooled.covariance / pooled.pre.variance


def _cuped_summary(stats: CupedStats, theta: float) -> ArmSummary:
    variance = stats.variance + theta**2 * stats.pre.variance - 2 * theta * stats.covariance
    return ArmSummary(
        n=stats.n,
        mean=stats.mean - theta * stats.pre.mean,
        variance=max(variance, 0.0) if stats.n > 1 else 0.0,
        unadjusted_mean=stats.mean,
    )


def estimate_effect(
    control: MetricStats, treatment: MetricStats, *, relative: bool
) -> EffectEstimate:
    """Effect of treatment vs control: absolute difference or relative lift (delta method).

    Both arms must hold the same kind of statistic. CUPED statistics are adjusted with the
    pooled theta of the two arms, re-estimated at every call (STATS.md 5 step 5).
    """
    if type(control) is not type(treatment):
        raise ValueError(
            f"control and treatment must be the same kind of statistic, got "
            f"{type(control).__name__} and {type(treatment).__name__}"
        )
    if isinstance(control, CupedStats) and isinstance(treatment, CupedStats):
        theta = cuped_theta(control, treatment)
        if theta == 0.0:
            return _from_summaries(
                _summary(control.post), _summary(treatment.post), relative=relative
            )
        return _from_summaries(
            _cuped_summary(control, theta),
            _cuped_summary(treatment, theta),
            relative=relative,
            control_terms=(control.variance, control.covariance, control.pre.variance),
            cuped_theta=theta,
        )
    assert not isinstance(control, CupedStats) and not isinstance(treatment, CupedStats)
    return _from_summaries(_summary(control), _summary(treatment), relative=relative)


def contrast_effect(
    control: MetricStats, treatment: MetricStats, *, ratio: float
) -> EffectEstimate:
    """The linear contrast mu_B - ratio * mu_A with its SE, in units of the control mean.

    A relative margin m is the hypothesis mu_B <= (1 + m) mu_A, i.e. a sign test on this
    contrast with ratio = 1 + m (Fieller's construction). Divided by |mu_A| its SE equals the
    delta-method SE of the relative lift evaluated on the null boundary mu_B = (1 + m) mu_A
    (STATS.md 1.2 with mu_B / mu_A replaced by 1 + m). The estimate returned is the contrast
    divided by |mu_A|, i.e. (L_hat - m) on the relative-lift scale.
    """
    effect = estimate_effect(control, treatment, relative=False)
    if not effect.ok:
        return EffectEstimate(
            estimate=0.0,
            se=0.0,
            relative=True,
            control=effect.control,
            treatment=effect.treatment,
            df=0.0,
            cuped_theta=effect.cuped_theta,
            error=effect.error,
        )
    base = effect.control.unadjusted_mean
    if base == 0:
        return EffectEstimate(
            estimate=0.0,
            se=0.0,
            relative=True,
            control=effect.control,
            treatment=effect.treatment,
            df=0.0,
            cuped_theta=effect.cuped_theta,
            error=EffectError.BASELINE_ZERO,
        )
    a, b = effect.control, effect.treatment
    contrast = b.mean - ratio * a.mean
    variance = b.variance / b.n + ratio**2 * a.variance / a.n
    return EffectEstimate(
        estimate=contrast / abs(base),
        se=math.sqrt(variance) / abs(base),
        relative=True,
        control=a,
        treatment=b,
        df=effect.df,
        cuped_theta=effect.cuped_theta,
    )
