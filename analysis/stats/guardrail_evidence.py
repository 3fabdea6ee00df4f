"""One (guardrail, treatment arm) pair's evidence from the arms' sufficient statistics.

`analysis.stats.guardrails.evaluate_guardrails` gives each pair its share alpha_k of the budget
and asks here for the harm bounds at that level:

* means, proportions, ratios and CUPED means: the one-sided sequential harm test of
  `analysis.stats.harm` (relative margin as a Fieller contrast, GrowthBook's eq. (134)
  boundary), its interval inverted by root finding (`_ratio_bounds`), after a burn-in; zero
  variance is handled as evidence by `analysis.stats.degenerate`;
* quantiles: the exceedance e-process of `analysis.stats.quantile_exceedance` for windowed
  histograms, else the per-arm confidence sequences of `analysis.stats.quantiles`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

from scipy import optimize

from analysis.stats.degenerate import constant_evidence, is_constant
from analysis.stats.guardrail_types import (
    GuardrailEvidence,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
)
from analysis.stats.harm import harm_p_value, harm_threshold, mean_harm_z, proportion_harm_z
from analysis.stats.moments import CupedStats, MeanStats, MetricStats, ProportionStats, RatioStats
from analysis.stats.quantile_exceedance import WindowedLatencyHistogram, exceedance_test
from analysis.stats.quantiles import LatencyHistogram, quantile_guardrail

MOMENT_TYPES = (ProportionStats, MeanStats, RatioStats, CupedStats)


def _ratio_bounds(z_of_ratio: Callable[[float], float], threshold: float) -> tuple[float, float]:
    """Invert the lower-is-better contrast z(r) = +-threshold for the ratio mu_B / mu_A.

    z(r) falls as r grows (mu_A > 0). The lower bound r_L solves z(r) = threshold, the upper
    bound r_U solves z(r) = -threshold; a side that never reaches its target is 0 or +inf
    (Fieller's unbounded case).
    """

    def solve(target: float) -> float:
        def excess(ratio: float) -> float:
            return z_of_ratio(ratio) - target

        low, high = 0.5, 2.0
        while excess(low) <= 0:
            if low < 1e-9:
                return 0.0
            low /= 4
        while excess(high) >= 0:
            if high > 1e9:
                return math.inf
            high *= 4
        return float(optimize.brentq(excess, low, high, xtol=1e-12, rtol=1e-10))

    return solve(threshold), solve(-threshold)


def burn_in(
    spec: GuardrailSpec, arm: str, alpha: float, n_a: int, n_b: int, note: str
) -> GuardrailEvidence:
    return GuardrailEvidence(
        metric_key=spec.metric_key,
        arm=arm,
        kind=spec.kind,
        direction=spec.direction,
        status=GuardrailStatus.BURN_IN,
        margin=spec.margin,
        alpha=alpha,
        n_control=n_a,
        n_treatment=n_b,
        note=note,
    )


def _not_evaluable(
    spec: GuardrailSpec, arm: str, alpha: float, n_a: int, n_b: int, note: str
) -> GuardrailEvidence:
    return GuardrailEvidence(
        metric_key=spec.metric_key,
        arm=arm,
        kind=spec.kind,
        direction=spec.direction,
        status=GuardrailStatus.NOT_EVALUABLE,
        margin=spec.margin,
        alpha=alpha,
        n_control=n_a,
        n_treatment=n_b,
        note=note,
    )


def _status(lower: float, upper: float, margin: float) -> GuardrailStatus:
    if lower > margin:
        return GuardrailStatus.HARM
    if upper < margin:
        return GuardrailStatus.SAFE
    return GuardrailStatus.INCONCLUSIVE


def moment_evidence(
    spec: GuardrailSpec,
    arm: str,
    control: MetricStats,
    treatment: MetricStats,
    *,
    alpha: float,
    settings: GuardrailSettings,
) -> GuardrailEvidence:
    """Harm test of a proportion, mean or ratio guardrail (analysis.stats.harm)."""
    expected: type[MetricStats] = {
        "proportion": ProportionStats,
        "mean": MeanStats,
        "ratio": RatioStats,
    }[spec.kind]
    for side, stats in (("control", control), ("treatment", treatment)):
        if not isinstance(stats, expected) or isinstance(stats, CupedStats):
            raise ValueError(
                f"{spec.metric_key}: {side} statistic must be {expected.__name__} for a "
                f"{spec.kind} guardrail, got {type(stats).__name__}"
            )
    n_a, n_b = control.n, treatment.n
    if min(n_a, n_b) < settings.min_units_per_arm:
        return burn_in(
            spec, arm, alpha, n_a, n_b, f"fewer than {settings.min_units_per_arm} units in an arm"
        )
    if (
        isinstance(control, ProportionStats)
        and isinstance(treatment, ProportionStats)
        and min(control.sum, treatment.sum) < settings.min_events_per_arm
    ):
        note = f"fewer than {settings.min_events_per_arm} events in an arm"
        return burn_in(spec, arm, alpha, n_a, n_b, note)
    mean_a, mean_b = control.mean, treatment.mean
    if mean_a <= 0:
        return _not_evaluable(spec, arm, alpha, n_a, n_b, "control mean is not positive")
    if is_constant(control) and is_constant(treatment):
        return constant_evidence(spec, arm, alpha, n_a, n_b, mean_a, mean_b)

    def z_lower_is_better(ratio: float) -> float:
        if isinstance(control, ProportionStats) and isinstance(treatment, ProportionStats):
            value = proportion_harm_z(
                control.sum, n_a, treatment.sum, n_b, ratio=ratio, lower_is_better=True
            )
        else:
            value = mean_harm_z(
                mean_a,
                control.variance,
                n_a,
                mean_b,
                treatment.variance,
                n_b,
                ratio=ratio,
                lower_is_better=True,
            )
        return float(value)

    total = n_a + n_b
    threshold = float(harm_threshold(total, alpha=alpha, n_star=settings.n_star))
    null_ratio = 1 + spec.margin if spec.lower_is_better else 1 - spec.margin
    z_null = z_lower_is_better(null_ratio)
    statistic = z_null if spec.lower_is_better else -z_null
    if not math.isfinite(statistic):
        return _not_evaluable(spec, arm, alpha, n_a, n_b, "the test statistic is undefined")
    ratio_low, ratio_high = _ratio_bounds(z_lower_is_better, threshold)
    relative = mean_b / mean_a - 1
    if spec.lower_is_better:
        harm, lower, upper = relative, ratio_low - 1, ratio_high - 1
    else:
        harm, lower, upper = -relative, 1 - ratio_high, 1 - ratio_low
    # The decision comes from the statistic at the margin itself, so root-finding tolerance in
    # the reported bounds can never flip it.
    status = GuardrailStatus.HARM if statistic > threshold else _status(lower, upper, spec.margin)
    if status is GuardrailStatus.HARM:
        lower = max(lower, spec.margin)
    return GuardrailEvidence(
        metric_key=spec.metric_key,
        arm=arm,
        kind=spec.kind,
        direction=spec.direction,
        status=status,
        margin=spec.margin,
        alpha=alpha,
        n_control=n_a,
        n_treatment=n_b,
        relative_effect=relative,
        harm_estimate=harm,
        harm_lower_bound=lower,
        harm_upper_bound=upper,
        interval=(ratio_low - 1, ratio_high - 1),
        statistic=statistic,
        threshold=threshold,
        p_value=float(harm_p_value(statistic, total, alpha=alpha, n_star=settings.n_star)),
    )


def _is_histogram(value: object) -> bool:
    """Structural check against the `LatencyHistogram` protocol of `analysis.stats.quantiles`."""
    return all(
        hasattr(value, name)
        for name in ("count", "relative_accuracy", "lower_edge", "upper_edge", "quantile")
    )


def quantile_evidence(
    spec: GuardrailSpec,
    arm: str,
    control: object,
    treatment: object,
    *,
    alpha: float,
    settings: GuardrailSettings,
) -> GuardrailEvidence:
    """Dispatch a quantile guardrail to `analysis.stats.quantiles.quantile_guardrail`."""
    for side, histogram in (("control", control), ("treatment", treatment)):
        if not _is_histogram(histogram):
            raise ValueError(
                f"{spec.metric_key}: {side} statistic must be a latency histogram (e.g. "
                f"routing.observe.histogram.LogHistogram) for a quantile guardrail, "
                f"got {type(histogram).__name__}"
            )
    assert spec.quantile is not None
    if hasattr(control, "windows") and hasattr(treatment, "windows"):
        return _exceedance_evidence(
            spec,
            arm,
            cast(WindowedLatencyHistogram, control),
            cast(WindowedLatencyHistogram, treatment),
            alpha=alpha,
        )
    control_histogram = cast(LatencyHistogram, control)
    treatment_histogram = cast(LatencyHistogram, treatment)
    n_a, n_b = int(control_histogram.count), int(treatment_histogram.count)
    if min(n_a, n_b) < settings.quantile_min_per_arm:
        return burn_in(
            spec,
            arm,
            alpha,
            n_a,
            n_b,
            f"fewer than {settings.quantile_min_per_arm} observations in an arm",
        )
    t_opt = settings.quantile_t_opt if settings.quantile_t_opt is not None else settings.n_star / 2
    result = quantile_guardrail(
        control_histogram,
        treatment_histogram,
        p=spec.quantile,
        alpha=alpha,
        t_opt=t_opt,
        lower_is_better=spec.lower_is_better,
    )
    lower, upper = result.harm_lower_bound, result.harm_upper_bound
    interval = (lower, upper) if spec.lower_is_better else (-upper, -lower)
    return GuardrailEvidence(
        metric_key=spec.metric_key,
        arm=arm,
        kind=spec.kind,
        direction=spec.direction,
        status=_status(lower, upper, spec.margin),
        margin=spec.margin,
        alpha=alpha,
        n_control=result.n_control,
        n_treatment=result.n_treatment,
        relative_effect=result.relative_effect,
        harm_estimate=result.relative_effect if spec.lower_is_better else -result.relative_effect,
        harm_lower_bound=lower,
        harm_upper_bound=upper,
        interval=interval,
    )


def _exceedance_evidence(
    spec: GuardrailSpec,
    arm: str,
    control: WindowedLatencyHistogram,
    treatment: WindowedLatencyHistogram,
    *,
    alpha: float,
) -> GuardrailEvidence:
    """Contemporaneous quantile guardrail: the exceedance e-process over time windows."""
    assert spec.quantile is not None
    result = exceedance_test(
        control,
        treatment,
        p=spec.quantile,
        alpha=alpha,
        margin=spec.margin,
        lower_is_better=spec.lower_is_better,
    )
    n_a, n_b = int(control.count), int(treatment.count)
    if result.windows_bet == 0:
        note = "no closed time window with requests from both arms yet"
        return burn_in(spec, arm, alpha, n_a, n_b, note)
    if result.fired(alpha):
        status = GuardrailStatus.HARM
    elif result.safe(alpha):
        status = GuardrailStatus.SAFE
    else:
        status = GuardrailStatus.INCONCLUSIVE
    lower, upper = result.harm_lower_bound, result.harm_upper_bound
    # The decision is the e-process at the margin itself; the bounds come from inverting it
    # in bucket steps, so they are aligned with it here.
    if status is GuardrailStatus.HARM:
        lower = max(lower, spec.margin)
    elif status is GuardrailStatus.SAFE:
        upper = min(upper, spec.margin)
    if spec.lower_is_better:
        harm, interval = result.relative_effect, (lower, upper)
    else:
        harm, interval = -result.relative_effect, (-upper, -lower)
    return GuardrailEvidence(
        metric_key=spec.metric_key,
        arm=arm,
        kind=spec.kind,
        direction=spec.direction,
        status=status,
        margin=spec.margin,
        alpha=alpha,
        n_control=n_a,
        n_treatment=n_b,
        relative_effect=result.relative_effect,
        harm_estimate=harm,
        harm_lower_bound=lower,
        harm_upper_bound=upper,
        interval=interval,
        statistic=result.max_log_e_value,
        threshold=math.log(1.0 / alpha),
        p_value=result.p_value,
        method=result.method,
    )
