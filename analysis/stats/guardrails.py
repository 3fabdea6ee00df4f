"""The guardrail decision: roll back, continue or hold a canary, with a bounded false-rollback rate.

`evaluate_guardrails` is a pure function of the guardrail specs and the current cumulative
statistics per arm. It returns `rollback` (with the metric, the arm and the evidence that
tripped), `hold` (sample ratio mismatch, or a guardrail still in burn-in) or `continue`, plus
`safe_to_promote` (non-inferiority shown for every guardrail and arm, STATS.md 9.1) for the ramp.

False-rollback guarantee
    Let alpha be the experiment's guardrail budget (default 0.05) and K the number of
    (guardrail, treatment arm) pairs. Pair k gets alpha_k = alpha * w_k / sum(w) (weighted
    Bonferroni, STATS.md 9.2). For each pair the harm test is one-sided and sequential
    (`analysis.stats.harm`: relative margin as a Fieller contrast, GrowthBook's eq. (134)
    boundary; for quantiles the exceedance e-process of `analysis.stats.quantile_exceedance`,
    which compares the arms within each time window and is exact with no burn-in, or the
    per-arm confidence sequences of `analysis.stats.quantiles` for histograms without time
    windows), so under its null ("not worse than the margin") the probability that it *ever*
    fires, over any number of looks at any times, is at most alpha_k. By the union bound the
    probability that the experiment is *ever* rolled back while no guardrail is truly violated
    by more than its margin is at most sum_k alpha_k = alpha, under any dependence between
    metrics and arms.
    Per-request rate guardrails given as `UserRateBets` (the worker does this for the error
    rate) use the exact betting e-process of `analysis.stats.rate_guardrail` instead, with
    the user as the unit and no burn-in; quantile guardrails given as `UserQuantileBets` (the
    worker does this for latency quantiles) the same bet on each user's share of requests
    slower than control's recent quantile (`analysis.stats.quantile_users`).
    The guarantee is asymptotic for mean, rate and ratio guardrails (plug-in variances, CLT),
    hence the burn-in (`GuardrailSettings.min_units_per_arm`, `min_events_per_arm`), and
    requires N* (`n_star`) and the specs to be fixed before the first look. Zero variance is
    evidence: one constant arm still leaves the contrast a positive variance, and two constant
    arms after the burn-in give the exact difference, compared with the margin directly
    (`analysis.stats.degenerate` states the assumption). The seeded A/A
    simulations in tests/analysis/stats/test_guardrail_simulation.py check it, and show that
    naive repeated fixed-horizon testing of the same data exceeds alpha several times over.
    The same holds for `safe_to_promote`: a guardrail is declared non-inferior only when its
    upper harm bound at alpha_k is below the margin.

Decisions are not sticky here: the worker persists a fired rollback and never un-fires it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

from scipy import optimize

from analysis.stats.degenerate import constant_evidence, is_constant
from analysis.stats.guardrail_types import (
    Direction,
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailDecision,
    GuardrailEvidence,
    GuardrailKind,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
)
from analysis.stats.harm import harm_p_value, harm_threshold, mean_harm_z, proportion_harm_z
from analysis.stats.health import (
    SequentialSrmResult,
    SrmResult,
    srm_chi_square,
    srm_sequential,
)
from analysis.stats.moments import CupedStats, MeanStats, MetricStats, ProportionStats, RatioStats
from analysis.stats.multiple import bonferroni_alphas
from analysis.stats.quantile_exceedance import WindowedLatencyHistogram, exceedance_test
from analysis.stats.quantile_users import UserQuantileBets, quantile_user_evidence
from analysis.stats.quantiles import LatencyHistogram, quantile_guardrail
from analysis.stats.rate_guardrail import UserRateBets, rate_evidence

__all__ = [
    "Direction",
    "ExperimentSnapshot",
    "GuardrailAction",
    "GuardrailDecision",
    "GuardrailEvidence",
    "GuardrailKind",
    "GuardrailSettings",
    "GuardrailSpec",
    "GuardrailStatus",
    "evaluate_guardrails",
]

_MOMENT_TYPES = (ProportionStats, MeanStats, RatioStats, CupedStats)


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


def _burn_in(
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


def _moment_evidence(
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
        return _burn_in(
            spec, arm, alpha, n_a, n_b, f"fewer than {settings.min_units_per_arm} units in an arm"
        )
    if (
        isinstance(control, ProportionStats)
        and isinstance(treatment, ProportionStats)
        and min(control.sum, treatment.sum) < settings.min_events_per_arm
    ):
        note = f"fewer than {settings.min_events_per_arm} events in an arm"
        return _burn_in(spec, arm, alpha, n_a, n_b, note)
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


def _quantile_evidence(
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
                f"routing.histogram.LogHistogram) for a quantile guardrail, "
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
        return _burn_in(
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
        return _burn_in(spec, arm, alpha, n_a, n_b, note)
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


def _srm_checks(
    snapshot: ExperimentSnapshot, settings: GuardrailSettings
) -> tuple[SrmResult | None, SequentialSrmResult | None]:
    if snapshot.exposures is None or snapshot.expected_weights is None:
        return None, None
    arms = (snapshot.control, *snapshot.treatments)
    observed = [int(snapshot.exposures.get(arm, 0)) for arm in arms]
    weights = [float(snapshot.expected_weights[arm]) for arm in arms]
    chi_square = srm_chi_square(
        observed, weights, threshold=settings.srm_threshold, min_units=settings.srm_min_units
    )
    sequential = srm_sequential(
        observed,
        weights,
        alpha=settings.srm_threshold,
        concentration=settings.srm_concentration,
        previous_max_log_e_value=snapshot.previous_srm_max_log_e_value,
    )
    return chi_square, sequential


def evaluate_guardrails(
    specs: Sequence[GuardrailSpec],
    snapshot: ExperimentSnapshot,
    *,
    settings: GuardrailSettings | None = None,
) -> GuardrailDecision:
    """Decide rollback / hold / continue for one look at one experiment (STATS.md 9.1-9.3).

    Order: an SRM (chi-square p < threshold after the minimum units, or the Dirichlet e-value
    past 1 / threshold) means `hold`, and guardrails are not evaluated on that data; otherwise
    any pair whose harm lower bound exceeds its margin means `rollback`; otherwise any pair in
    burn-in (or not evaluable) means `hold`; otherwise `continue`.
    """
    settings = settings if settings is not None else GuardrailSettings()
    if not specs:
        raise ValueError("specs must contain at least one guardrail")
    keys = [spec.metric_key for spec in specs]
    if len(set(keys)) != len(keys):
        raise ValueError("each guardrail metric_key must appear once")
    pairs = [(spec, arm) for spec in specs for arm in snapshot.treatments]
    alphas = bonferroni_alphas([spec.weight for spec, _ in pairs], alpha=settings.alpha)
    srm, srm_seq = _srm_checks(snapshot, settings)
    srm_max = (
        srm_seq.max_log_e_value if srm_seq is not None else snapshot.previous_srm_max_log_e_value
    )
    if (srm is not None and srm.flagged) or (srm_seq is not None and srm_seq.flagged):
        return GuardrailDecision(
            action=GuardrailAction.HOLD,
            reason="sample ratio mismatch: guardrails are not evaluated on this data",
            evaluations=(),
            tripped=None,
            tripped_all=(),
            safe_to_promote=False,
            alpha=settings.alpha,
            srm=srm,
            srm_sequential=srm_seq,
            srm_max_log_e_value=srm_max,
        )
    evaluations: list[GuardrailEvidence] = []
    for (spec, arm), alpha_k in zip(pairs, alphas, strict=True):
        per_arm = snapshot.metrics.get(spec.metric_key, {})
        control, treatment = per_arm.get(snapshot.control), per_arm.get(arm)
        if isinstance(treatment, UserQuantileBets):
            # Latency quantiles with the user as the unit: exact, no burn-in (quantile_users).
            evaluations.append(quantile_user_evidence(spec, arm, treatment, alpha=alpha_k))
        elif isinstance(treatment, UserRateBets):
            # Per-request rates with the user as the unit: exact, no burn-in (STATS.md 12.1).
            evaluations.append(rate_evidence(spec, arm, treatment, alpha=alpha_k))
        elif control is None or treatment is None:
            evaluations.append(_burn_in(spec, arm, alpha_k, 0, 0, "no data yet"))
        elif spec.kind == "quantile":
            evaluations.append(
                _quantile_evidence(spec, arm, control, treatment, alpha=alpha_k, settings=settings)
            )
        elif isinstance(control, _MOMENT_TYPES) and isinstance(treatment, _MOMENT_TYPES):
            evaluations.append(
                _moment_evidence(spec, arm, control, treatment, alpha=alpha_k, settings=settings)
            )
        else:
            raise ValueError(
                f"{spec.metric_key}: expected sufficient statistics for a {spec.kind} guardrail, "
                f"got {type(control).__name__} and {type(treatment).__name__}"
            )
    fired = tuple(e for e in evaluations if e.status is GuardrailStatus.HARM)
    safe = all(e.status is GuardrailStatus.SAFE for e in evaluations)
    if fired:
        worst = max(fired, key=lambda e: e.harm_lower_bound - e.margin)
        action = GuardrailAction.ROLLBACK
        reason = (
            f"{worst.metric_key} on {worst.arm} is worse than control by more than "
            f"{worst.margin:.1%} (always-valid lower bound on harm {worst.harm_lower_bound:.2%}, "
            f"alpha {worst.alpha:.4g})"
        )
        if worst.method:
            reason = f"{reason[:-1]}, always-valid p {worst.p_value:.2g}, {worst.method})"
    else:
        worst = None
        waiting = [
            e
            for e in evaluations
            if e.status in (GuardrailStatus.BURN_IN, GuardrailStatus.NOT_EVALUABLE)
        ]
        if waiting:
            action = GuardrailAction.HOLD
            reason = "not enough data: " + ", ".join(
                f"{e.metric_key}/{e.arm} ({e.note})" for e in waiting
            )
        else:
            action = GuardrailAction.CONTINUE
            reason = "no guardrail shows harm beyond its margin"
    return GuardrailDecision(
        action=action,
        reason=reason,
        evaluations=tuple(evaluations),
        tripped=worst,
        tripped_all=fired,
        safe_to_promote=safe and not fired,
        alpha=settings.alpha,
        srm=srm,
        srm_sequential=srm_seq,
        srm_max_log_e_value=srm_max,
    )
