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
    boundary, or the quantile confidence sequences of `analysis.stats.quantiles`), so under its
    null ("not worse than the margin") the probability that it *ever* fires, over any number
    of looks at any times, is at most alpha_k. By the union bound the probability that the
    experiment is *ever* rolled back while no guardrail is truly violated by more than its
    margin is at most sum_k alpha_k = alpha, under any dependence between metrics and arms.
    The guarantee is asymptotic for mean, rate and ratio guardrails (plug-in variances, CLT),
    hence the burn-in (`GuardrailSettings.min_units_per_arm`, `min_events_per_arm`), and
    requires N* (`n_star`) and the specs to be fixed before the first look. The seeded A/A
    simulations in tests/analysis/stats/test_guardrail_simulation.py check it, and show that
    naive repeated fixed-horizon testing of the same data exceeds alpha several times over.
    The same holds for `safe_to_promote`: a guardrail is declared non-inferior only when its
    upper harm bound at alpha_k is below the margin.

Decisions are not sticky here: the worker persists a fired rollback and never un-fires it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, cast

from scipy import optimize

from analysis.stats.harm import harm_p_value, harm_threshold, mean_harm_z, proportion_harm_z
from analysis.stats.health import (
    SequentialSrmResult,
    SrmResult,
    srm_chi_square,
    srm_sequential,
)
from analysis.stats.moments import CupedStats, MeanStats, MetricStats, ProportionStats, RatioStats
from analysis.stats.multiple import bonferroni_alphas
from analysis.stats.quantiles import LatencyHistogram, quantile_guardrail

_MOMENT_TYPES = (ProportionStats, MeanStats, RatioStats, CupedStats)

GuardrailKind = Literal["proportion", "mean", "ratio", "quantile"]
Direction = Literal["lower_is_better", "higher_is_better"]


@dataclass(frozen=True, slots=True)
class GuardrailSpec:
    """One guardrail: which metric, how it is measured, which way is bad, and the margin.

    `margin` is relative: 0.10 on a lower-is-better metric means "may rise at most 10%", on a
    higher-is-better one "may fall at most 10%". `weight` is its share of the alpha budget.
    `quantile` (e.g. 0.95) is required for quantile guardrails and forbidden otherwise.
    """

    metric_key: str
    kind: GuardrailKind
    direction: Direction
    margin: float = 0.0
    weight: float = 1.0
    quantile: float | None = None

    def __post_init__(self) -> None:
        if not self.metric_key:
            raise ValueError("metric_key must not be empty")
        if self.kind not in ("proportion", "mean", "ratio", "quantile"):
            raise ValueError(f"kind must be proportion, mean, ratio or quantile: {self.kind!r}")
        if self.direction not in ("lower_is_better", "higher_is_better"):
            raise ValueError(
                f"direction must be lower_is_better or higher_is_better: {self.direction!r}"
            )
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin}")
        if self.direction == "higher_is_better" and self.margin >= 1:
            raise ValueError("margin must be < 1 for a higher-is-better metric (a fall of 100%)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.kind == "quantile":
            if self.quantile is None or not 0 < self.quantile < 1:
                raise ValueError(
                    f"quantile must lie in (0, 1) for quantile guardrails: {self.quantile}"
                )
        elif self.quantile is not None:
            raise ValueError("quantile is only allowed for quantile guardrails")

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower_is_better"


@dataclass(frozen=True, slots=True)
class GuardrailSettings:
    """The experiment's fixed design: alpha budget, tuning N*, burn-in and SRM rules.

    `n_star` is the pairwise total at which decisions are expected (see
    `analysis.stats.planning.guardrail_n_star_*`); quantile guardrails use
    `quantile_t_opt` per arm (default n_star / 2).
    """

    alpha: float = 0.05
    n_star: float = 10_000.0
    min_units_per_arm: int = 100
    min_events_per_arm: int = 10
    quantile_min_per_arm: int = 100
    quantile_t_opt: float | None = None
    srm_threshold: float = 0.001
    srm_min_units: int = 100
    srm_concentration: float = 1000.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {self.alpha}")
        if not (math.isfinite(self.n_star) and self.n_star > 0):
            raise ValueError(f"n_star must be positive, got {self.n_star}")
        for field in ("min_units_per_arm", "min_events_per_arm", "quantile_min_per_arm"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0")
        if self.quantile_t_opt is not None and not self.quantile_t_opt > 0:
            raise ValueError(f"quantile_t_opt must be positive, got {self.quantile_t_opt}")
        if not 0 < self.srm_threshold < 1:
            raise ValueError(f"srm_threshold must lie in (0, 1), got {self.srm_threshold}")


@dataclass(frozen=True)
class ExperimentSnapshot:
    """Cumulative statistics of one experiment at one look.

    `metrics[metric_key][arm]` holds the arm's statistic of the guardrail's kind
    (`ProportionStats`, `MeanStats`, `RatioStats`, or a `LogHistogram` for quantiles).
    `exposures` and `expected_weights` (per arm) enable the SRM checks; pass back
    `previous_srm_max_log_e_value` from the last decision for the sequential SRM.
    """

    control: str
    treatments: tuple[str, ...]
    metrics: Mapping[str, Mapping[str, object]]
    exposures: Mapping[str, int] | None = None
    expected_weights: Mapping[str, float] | None = None
    previous_srm_max_log_e_value: float = 0.0

    def __post_init__(self) -> None:
        if not self.treatments:
            raise ValueError("treatments must name at least one arm")
        if self.control in self.treatments:
            raise ValueError("control must not be one of the treatments")
        if (self.exposures is None) != (self.expected_weights is None):
            raise ValueError("exposures and expected_weights must be given together")


class GuardrailStatus(StrEnum):
    HARM = "harm"
    SAFE = "safe"
    INCONCLUSIVE = "inconclusive"
    BURN_IN = "burn_in"
    NOT_EVALUABLE = "not_evaluable"


@dataclass(frozen=True, slots=True)
class GuardrailEvidence:
    """The evaluation of one (guardrail, treatment arm) pair at this look.

    Harm is the relative change in the bad direction (+0.12 = 12% worse). The harm bounds are
    always-valid one-sided bounds at `alpha` (so [lower, upper] is a 1 - 2 alpha confidence
    sequence); `interval` is the same range on the relative effect (treatment / control - 1).
    """

    metric_key: str
    arm: str
    kind: GuardrailKind
    direction: Direction
    status: GuardrailStatus
    margin: float
    alpha: float
    n_control: int
    n_treatment: int
    relative_effect: float = math.nan
    harm_estimate: float = math.nan
    harm_lower_bound: float = -math.inf
    harm_upper_bound: float = math.inf
    interval: tuple[float, float] = (-math.inf, math.inf)
    statistic: float = math.nan
    threshold: float = math.nan
    p_value: float = 1.0
    note: str = ""


class GuardrailAction(StrEnum):
    CONTINUE = "continue"
    ROLLBACK = "rollback"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class GuardrailDecision:
    """What to do now, why, and the evidence for every pair.

    `tripped` is the harm evidence with the largest excess of its lower bound over the margin
    (the rollback reason); `tripped_all` lists every pair that fired. Persist
    `srm_max_log_e_value` and pass it back on the next look.
    """

    action: GuardrailAction
    reason: str
    evaluations: tuple[GuardrailEvidence, ...]
    tripped: GuardrailEvidence | None
    tripped_all: tuple[GuardrailEvidence, ...]
    safe_to_promote: bool
    alpha: float
    srm: SrmResult | None
    srm_sequential: SequentialSrmResult | None
    srm_max_log_e_value: float


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
    if control.variance <= 0 or treatment.variance <= 0:
        return _not_evaluable(spec, arm, alpha, n_a, n_b, "an arm has zero variance")

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
    assert spec.quantile is not None
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
        if control is None or treatment is None:
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
