"""Glue between an experiment's specification, its aggregates and `analysis.stats`.

`analyse` is a pure function (no database, no settings): given the experiment's frozen view,
its aggregated statistics and the sequential state persisted by earlier runs, it returns
what the result snapshot stores (health, exposures, metric rows, latency) and the proposed
decision. `analysis.services` persists the new sequential state and carries the decision
out (rollback, hold, ramp step).

Statistics used
    * Health: the chi-square SRM test and the Dirichlet-multinomial SRM e-value
      (`analysis.stats.health`), the multiple-exposure share, and a no-traffic check. In a
      canary the expected split changes with every ramp step, so the SRM compares the units
      first seen in the current step (after a short grace period for the edges to pick the
      step up) with the step's split, and its running e-value restarts at each step.
    * Guardrails: `analysis.stats.guardrails.evaluate_guardrails` (one-sided sequential harm
      tests with weighted Bonferroni; false-rollback probability <= alpha over all looks).
      It is not run on data with a sample ratio mismatch.
    * Other metrics: relative lift with GrowthBook's asymptotic confidence sequence
      (Waudby-Smith et al. 2023, eq. (9) and (155)) for the always-valid interval and
      p-value, the Welch t test for the fixed-horizon interval (STATS.md 1.3), and for
      latency quantiles the quantile confidence sequences of Howard & Ramdas 2022.
    * Persistence (STATS.md 9.3): per (metric, arm) the running maximum e-value / running
      minimum harm p-value and the running intersection of the intervals, so always-valid
      p-values and intervals are monotone across runs, and a fired guardrail stays fired.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from analysis.aggregation import BUILTIN_ERROR, BUILTIN_LATENCY, Aggregates
from analysis.stats.effects import estimate_effect
from analysis.stats.fixed import fixed_horizon_test
from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailDecision,
    GuardrailEvidence,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
    evaluate_guardrails,
)
from analysis.stats.health import (
    multiple_exposure_check,
    srm_chi_square,
    srm_sequential,
)
from analysis.stats.quantiles import quantile_guardrail
from analysis.stats.quantiles_fixed import quantile_difference_ci
from analysis.stats.sequential import RunningEvidence, asymptotic_confidence_sequence
from experiments.contracts import ExperimentMetricView, ExperimentView, MetricView
from routing.histogram import LogHistogram
from routing.split import planned_split

GUARDRAIL = "guardrail"
# Burn-in for metrics that are not guardrails, as for guardrails (STATS.md 2.1 notes).
MIN_UNITS_PER_ARM = 100


@dataclass(frozen=True, slots=True)
class ArmState:
    """Sequential evidence of one (metric, arm) carried from run to run (None = unbounded)."""

    looks: int = 0
    max_log_e_value: float = 0.0
    min_p_value: float = 1.0
    lower: float | None = None
    upper: float | None = None
    empty_intersection: bool = False
    fired: bool = False

    def intersect(self, lower: float, upper: float) -> ArmState:
        """Fold one look's interval into the running intersection (kept if it would be empty)."""
        old_lower = -math.inf if self.lower is None else self.lower
        old_upper = math.inf if self.upper is None else self.upper
        new_lower, new_upper = max(old_lower, lower), min(old_upper, upper)
        empty = self.empty_intersection
        if new_lower > new_upper:
            new_lower, new_upper, empty = lower, upper, True
        return replace(
            self,
            lower=new_lower if math.isfinite(new_lower) else None,
            upper=new_upper if math.isfinite(new_upper) else None,
            empty_intersection=empty,
        )


@dataclass(frozen=True)
class HealthSettings:
    """How health is judged: thresholds and the waiting times that avoid false alarms."""

    srm_threshold: float = 0.001
    srm_min_units: int = 100
    multiple_exposure_threshold: float = 0.01
    no_traffic_after_s: float = 60.0


@dataclass(frozen=True)
class Health:
    srm_p: float
    srm_e_value: float
    srm_flagged: bool
    srm_max_log_e_value: float
    multiple_share: float
    multiple_units: int
    multiple_flagged: bool
    no_traffic: bool

    @property
    def failing(self) -> bool:
        return self.srm_flagged or self.multiple_flagged or self.no_traffic

    @property
    def problems(self) -> list[str]:
        found = []
        if self.srm_flagged:
            found.append(f"sample ratio mismatch (p = {self.srm_p:.2g})")
        if self.multiple_flagged:
            found.append(f"{self.multiple_share:.1%} of units saw more than one variant")
        if self.no_traffic:
            found.append("an arm receives no traffic")
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "srm": {
                "p": self.srm_p,
                "e_value": min(self.srm_e_value, 1e300),
                "flagged": self.srm_flagged,
            },
            "multiple_exposure": {
                "share": self.multiple_share,
                "units": self.multiple_units,
                "flagged": self.multiple_flagged,
            },
            "no_traffic": self.no_traffic,
        }


@dataclass(frozen=True)
class Breach:
    """The guardrail that tripped, with the evidence the audit entry and the alert carry."""

    metric: str
    name: str
    arm: str
    control_arm: str
    rel_effect: float | None
    interval: tuple[float | None, float | None]
    interval_level: float | None
    harm_bound: float | None
    margin: float
    n: Mapping[str, int]
    summary: str
    sticky: bool = False

    def evidence(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "arm": self.arm,
            "control_arm": self.control_arm,
            "rel_effect": finite(self.rel_effect),
            "interval": [finite(bound) for bound in self.interval],
            "interval_level": finite(self.interval_level),
            "harm_bound": finite(self.harm_bound),
            "margin": self.margin,
            "n": dict(self.n),
            "summary": self.summary,
        }


@dataclass(frozen=True)
class ExperimentAnalysis:
    """One look at one experiment: what the snapshot stores and what should happen."""

    decision: str
    reason: str
    health: Health
    exposures: dict[str, int]
    metrics: list[dict[str, Any]]
    latency: dict[str, dict[str, Any]]
    states: dict[tuple[str, str], ArmState]
    breach: Breach | None
    ramp_ready: bool
    guardrail_decision: GuardrailDecision | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- formatting


def finite(value: float | None) -> float | None:
    """JSON has no inf or NaN: map them to None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _percent(value: float | None) -> str:
    if value is None:
        return "unbounded"
    return f"{value * 100:+.0f}%"


def _summary(
    name: str,
    arm: str,
    rel: float | None,
    interval: tuple[float | None, float | None],
    level: float,
) -> str:
    """A plain-words sentence, e.g. "p95 latency is 38% higher on v2, 95% always-valid ..."."""
    if rel is None:
        return f"{name} on {arm}: no estimate yet"
    if abs(rel) < 0.005:
        change = "about the same"
    else:
        change = f"{abs(rel) * 100:.0f}% {'higher' if rel > 0 else 'lower'}"
    lower, upper = interval
    return (
        f"{name} is {change} on {arm}, {level * 100:.4g}% always-valid interval "
        f"{_percent(lower)} to {_percent(upper)}"
    )


# --------------------------------------------------------------------------- inputs


def arms(experiment: ExperimentView) -> tuple[str, tuple[str, ...]]:
    control = experiment.control.key
    treatments = tuple(v.key for v in experiment.routed_variants if not v.is_control)
    return control, treatments


def expected_weights(experiment: ExperimentView) -> dict[str, float]:
    """The split the routing aims for now (one definition: `routing.split.planned_split`)."""
    return planned_split(experiment)


def metric_stats(metric: MetricView, aggregates: Aggregates, arm: str) -> object | None:
    """The statistic of one metric for one arm, of the kind `analysis.stats` expects."""
    if metric.source in (BUILTIN_LATENCY, BUILTIN_ERROR) and metric.kind != "ratio":
        totals = aggregates.observations.get(arm)
        if totals is None or totals.count == 0:
            return None
        if metric.source == BUILTIN_ERROR:
            return totals.errors
        if metric.kind == "quantile":
            return totals.histogram if totals.histogram.count else None
        return totals.latency if totals.histogram.count else None
    return aggregates.business.get(metric.key, {}).get(arm)


def _spec(use: ExperimentMetricView) -> GuardrailSpec:
    metric = use.metric
    kind = {"binomial": "proportion", "mean": "mean", "ratio": "ratio", "quantile": "quantile"}[
        metric.kind
    ]
    return GuardrailSpec(
        metric_key=metric.key,
        kind=kind,  # type: ignore[arg-type]
        direction="lower_is_better" if metric.lower_is_better else "higher_is_better",
        margin=float(use.margin),
        quantile=metric.quantile if metric.kind == "quantile" else None,
    )


def _estimate(stats: object | None, quantile: float | None) -> float | None:
    if stats is None:
        return None
    if isinstance(stats, LogHistogram):
        return finite(stats.quantile(quantile or 0.5)) if stats.count else None
    mean = getattr(stats, "mean", None)
    return finite(float(mean)) if mean is not None else None


def _n(stats: object | None) -> int:
    if stats is None:
        return 0
    if isinstance(stats, LogHistogram):
        return int(stats.count)
    return int(getattr(stats, "n", 0))


# --------------------------------------------------------------------------- health


def check_health(
    experiment: ExperimentView,
    aggregates: Aggregates,
    *,
    previous_srm_max_log_e_value: float,
    now: datetime,
    settings: HealthSettings,
) -> Health:
    control, treatments = arms(experiment)
    weights = expected_weights(experiment)
    canary = experiment.kind == "canary"
    counts = aggregates.exposures.new_in_step if canary else aggregates.exposures.per_variant
    # Arms the routing should not send anyone to (a 100% canary step leaves control empty,
    # apart from units first seen while the edges were still switching) are left out.
    tested = [arm for arm in (control, *treatments) if weights.get(arm, 0.0) > 0]
    srm_p, srm_flagged = 1.0, False
    srm_max = previous_srm_max_log_e_value
    if len(tested) >= 2:
        observed = [int(counts.get(arm, 0)) for arm in tested]
        shares = [weights[arm] for arm in tested]
        chi = srm_chi_square(
            observed, shares, threshold=settings.srm_threshold, min_units=settings.srm_min_units
        )
        sequential = srm_sequential(
            observed,
            shares,
            alpha=settings.srm_threshold,
            previous_max_log_e_value=previous_srm_max_log_e_value,
        )
        srm_p, srm_max = chi.p_value, sequential.max_log_e_value
        srm_flagged = chi.flagged or sequential.flagged
    exposures = aggregates.exposures
    odd = exposures.unexpected_multiple if canary else exposures.multiple
    multiple = multiple_exposure_check(
        units_exposed=exposures.total_units,
        units_multiple=odd,
        threshold=settings.multiple_exposure_threshold,
    )
    started = experiment.started_at
    no_traffic = False
    if started is not None and now - started >= timedelta(seconds=settings.no_traffic_after_s):
        for arm in (control, *treatments):
            requests = aggregates.observations.get(arm)
            if exposures.per_variant.get(arm, 0) == 0 and (requests is None or not requests.count):
                no_traffic = True
    return Health(
        srm_p=srm_p,
        srm_e_value=math.exp(min(srm_max, 700.0)),
        srm_flagged=srm_flagged,
        srm_max_log_e_value=srm_max,
        multiple_share=multiple.share,
        multiple_units=exposures.multiple,
        multiple_flagged=multiple.flagged,
        no_traffic=no_traffic,
    )


# --------------------------------------------------------------------------- metric rows


def _base_row(use: ExperimentMetricView, arm: str, control: str) -> dict[str, Any]:
    metric = use.metric
    return {
        "metric": metric.key,
        "name": metric.name,
        "kind": metric.kind,
        "role": use.role,
        "direction": metric.direction,
        "arm": arm,
        "control_arm": control,
        "margin": float(use.margin) if use.role == GUARDRAIL else None,
    }


def _guardrail_row(
    use: ExperimentMetricView,
    evidence: GuardrailEvidence,
    control_stats: object | None,
    treatment_stats: object | None,
    state: ArmState,
    *,
    control: str,
    alpha: float,
) -> tuple[dict[str, Any], ArmState]:
    metric = use.metric
    row = _base_row(use, evidence.arm, control)
    control_estimate = _estimate(control_stats, metric.quantile)
    treatment_estimate = _estimate(treatment_stats, metric.quantile)
    evaluable = evidence.status not in (GuardrailStatus.BURN_IN, GuardrailStatus.NOT_EVALUABLE)
    if evaluable:
        state = state.intersect(*evidence.interval)
        state = replace(
            state,
            looks=state.looks + 1,
            min_p_value=min(state.min_p_value, evidence.p_value),
            fired=state.fired or evidence.status is GuardrailStatus.HARM,
        )
    ci_fixed = _fixed_interval(metric, control_stats, treatment_stats, alpha)
    rel = finite(evidence.relative_effect) if evaluable else None
    interval = (state.lower, state.upper) if evaluable else (None, None)
    level = 1 - 2 * evidence.alpha
    if state.fired:
        status = "breach"
    elif evaluable:
        status = "ok"
    else:
        status = "insufficient"
    abs_effect = (
        treatment_estimate - control_estimate
        if control_estimate is not None and treatment_estimate is not None
        else None
    )
    summary = (
        _summary(metric.name, evidence.arm, rel, interval, level)
        if evaluable
        else f"{metric.name} on {evidence.arm}: not enough data yet ({evidence.note})"
    )
    row.update(
        {
            "n_control": evidence.n_control,
            "n_treatment": evidence.n_treatment,
            "control_estimate": control_estimate,
            "treatment_estimate": treatment_estimate,
            "abs_effect": finite(abs_effect),
            "rel_effect": rel,
            "ci_fixed": list(ci_fixed),
            "ci_always_valid": list(interval),
            "p_value": finite(fixed_p_value(metric, control_stats, treatment_stats, alpha)),
            "p_always_valid": finite(state.min_p_value) if evaluable else None,
            "harm_bound": finite(evidence.harm_lower_bound) if evaluable else None,
            "status": status,
            "summary": summary,
        }
    )
    return row, state


def _fixed_interval(
    metric: MetricView, control_stats: object | None, treatment_stats: object | None, alpha: float
) -> tuple[float | None, float | None]:
    """Fixed-horizon two-sided interval of the relative effect (reference only)."""
    if control_stats is None or treatment_stats is None:
        return (None, None)
    if isinstance(control_stats, LogHistogram) and isinstance(treatment_stats, LogHistogram):
        if not control_stats.count or not treatment_stats.count:
            return (None, None)
        result = quantile_difference_ci(
            control_stats, treatment_stats, p=metric.quantile or 0.5, alpha=alpha
        )
        if result.error is not None:
            return (None, None)
        return (finite(result.relative_interval[0]), finite(result.relative_interval[1]))
    effect = estimate_effect(control_stats, treatment_stats, relative=True)  # type: ignore[arg-type]
    if not effect.ok:
        return (None, None)
    fixed = fixed_horizon_test(effect, alpha=alpha)
    return (finite(fixed.ci_lower), finite(fixed.ci_upper))


def fixed_p_value(
    metric: MetricView, control_stats: object | None, treatment_stats: object | None, alpha: float
) -> float | None:
    if control_stats is None or treatment_stats is None or isinstance(control_stats, LogHistogram):
        return None
    effect = estimate_effect(control_stats, treatment_stats, relative=True)  # type: ignore[arg-type]
    if not effect.ok:
        return None
    return fixed_horizon_test(effect, alpha=alpha).p_value


def _metric_row(
    use: ExperimentMetricView,
    arm: str,
    control_stats: object | None,
    treatment_stats: object | None,
    state: ArmState,
    *,
    control: str,
    alpha: float,
    n_star: float,
) -> tuple[dict[str, Any], ArmState]:
    """A primary or secondary metric: two-sided always-valid inference on the relative lift."""
    metric = use.metric
    row = _base_row(use, arm, control)
    n_control, n_treatment = _n(control_stats), _n(treatment_stats)
    control_estimate = _estimate(control_stats, metric.quantile)
    treatment_estimate = _estimate(treatment_stats, metric.quantile)
    row.update(
        {
            "n_control": n_control,
            "n_treatment": n_treatment,
            "control_estimate": control_estimate,
            "treatment_estimate": treatment_estimate,
            "abs_effect": finite(treatment_estimate - control_estimate)
            if control_estimate is not None and treatment_estimate is not None
            else None,
            "rel_effect": None,
            "ci_fixed": [None, None],
            "ci_always_valid": [None, None],
            "p_value": None,
            "p_always_valid": None,
            "harm_bound": None,
            "status": "insufficient",
            "summary": f"{metric.name} on {arm}: not enough data yet",
        }
    )
    if (
        control_stats is None
        or treatment_stats is None
        or min(n_control, n_treatment) < (MIN_UNITS_PER_ARM)
    ):
        return row, state
    higher_is_better = not metric.lower_is_better
    if isinstance(control_stats, LogHistogram) and isinstance(treatment_stats, LogHistogram):
        quantile = quantile_guardrail(
            control_stats,
            treatment_stats,
            p=metric.quantile or 0.5,
            alpha=alpha,
            t_opt=n_star / 2,
            lower_is_better=True,
        )
        lower, upper = quantile.harm_lower_bound, quantile.harm_upper_bound
        state = replace(state.intersect(lower, upper), looks=state.looks + 1)
        rel = finite(quantile.relative_effect)
        p_always = None
    else:
        effect = estimate_effect(control_stats, treatment_stats, relative=True)  # type: ignore[arg-type]
        if not effect.ok:
            row["summary"] = f"{metric.name} on {arm}: no estimate ({effect.error})"
            return row, state
        sequence = asymptotic_confidence_sequence(effect, alpha=alpha, n_star=n_star)
        running = RunningEvidence(
            looks=state.looks,
            max_log_e_value=state.max_log_e_value,
            lower=-math.inf if state.lower is None else state.lower,
            upper=math.inf if state.upper is None else state.upper,
            empty_intersection=state.empty_intersection,
        ).update(sequence)
        state = replace(
            state,
            looks=running.looks,
            max_log_e_value=running.max_log_e_value,
            lower=finite(running.lower),
            upper=finite(running.upper),
            empty_intersection=running.empty_intersection,
        )
        rel = finite(effect.estimate)
        p_always = running.p_value
    lower_bound = -math.inf if state.lower is None else state.lower
    upper_bound = math.inf if state.upper is None else state.upper
    if lower_bound > 0:
        status = "win" if higher_is_better else "loss"
    elif upper_bound < 0:
        status = "loss" if higher_is_better else "win"
    else:
        status = "inconclusive"
    interval = (state.lower, state.upper)
    row.update(
        {
            "rel_effect": rel,
            "ci_fixed": list(_fixed_interval(metric, control_stats, treatment_stats, alpha)),
            "ci_always_valid": list(interval),
            "p_value": finite(fixed_p_value(metric, control_stats, treatment_stats, alpha)),
            "p_always_valid": finite(p_always),
            "status": status,
            "summary": _summary(metric.name, arm, rel, interval, 1 - alpha),
        }
    )
    return row, state


def _latency(aggregates: Aggregates) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for variant, totals in sorted(aggregates.observations.items()):
        histogram = totals.histogram
        has = histogram.count > 0
        table[variant] = {
            "n": totals.count,
            "mean": finite(histogram.sum / histogram.count) if has else None,
            "p50": finite(histogram.quantile(0.5)) if has else None,
            "p95": finite(histogram.quantile(0.95)) if has else None,
            "p99": finite(histogram.quantile(0.99)) if has else None,
            "error_rate": totals.error_count / totals.count if totals.count else None,
        }
    return table


# --------------------------------------------------------------------------- the look


def ramp_ready(
    experiment: ExperimentView, aggregates: Aggregates, *, now: datetime
) -> tuple[bool, str]:
    """Whether the current canary step has lasted long enough and seen enough units per arm."""
    step = experiment.current_step
    if step is None or experiment.step_started_at is None:
        return False, "not a running canary"
    elapsed = (now - experiment.step_started_at).total_seconds()
    if elapsed < step.min_duration_s:
        return False, f"step {step.position} has run {elapsed:.0f}s of {step.min_duration_s}s"
    control, treatments = arms(experiment)
    for arm in (control, *treatments) if step.canary_share < 1 else treatments:
        seen = aggregates.exposures.new_in_step.get(arm, 0)
        if seen < step.min_exposures_per_arm:
            return False, f"{arm} has {seen} of {step.min_exposures_per_arm} units in this step"
    return True, f"step {step.position} met its duration and exposures"


def analyse(
    experiment: ExperimentView,
    aggregates: Aggregates,
    *,
    states: Mapping[tuple[str, str], ArmState],
    previous_srm_max_log_e_value: float,
    now: datetime,
    health_settings: HealthSettings | None = None,
) -> ExperimentAnalysis:
    """Evaluate health, guardrails and metrics of one experiment at one look."""
    health_settings = health_settings or HealthSettings()
    control, treatments = arms(experiment)
    alpha = float(experiment.alpha)
    n_star = float(experiment.decision_sample_size)
    health = check_health(
        experiment,
        aggregates,
        previous_srm_max_log_e_value=previous_srm_max_log_e_value,
        now=now,
        settings=health_settings,
    )
    new_states: dict[tuple[str, str], ArmState] = {}
    rows: list[dict[str, Any]] = []
    guardrail_uses = [use for use in experiment.metrics if use.role == GUARDRAIL]
    decision: GuardrailDecision | None = None
    breach: Breach | None = None
    notes: list[str] = []
    if guardrail_uses and treatments and not health.srm_flagged:
        snapshot = ExperimentSnapshot(
            control=control,
            treatments=treatments,
            metrics={
                use.metric.key: {
                    arm: stats
                    for arm in (control, *treatments)
                    if (stats := metric_stats(use.metric, aggregates, arm)) is not None
                }
                for use in guardrail_uses
            },
        )
        settings = GuardrailSettings(alpha=alpha, n_star=n_star)
        decision = evaluate_guardrails(
            [_spec(use) for use in guardrail_uses], snapshot, settings=settings
        )
        uses = {use.metric.key: use for use in guardrail_uses}
        for evidence in decision.evaluations:
            use = uses[evidence.metric_key]
            key = (evidence.metric_key, evidence.arm)
            row, new_states[key] = _guardrail_row(
                use,
                evidence,
                metric_stats(use.metric, aggregates, control),
                metric_stats(use.metric, aggregates, evidence.arm),
                states.get(key, ArmState()),
                control=control,
                alpha=alpha,
            )
            rows.append(row)
        breach = _breach(decision, rows, new_states, control)
    elif guardrail_uses and health.srm_flagged:
        notes.append("guardrails not evaluated: sample ratio mismatch")
    if breach is None:
        breach = _sticky_breach(states, guardrail_uses, control)
    for use in experiment.metrics:
        if use.role == GUARDRAIL:
            continue
        for arm in treatments:
            key = (use.metric.key, arm)
            row, new_states[key] = _metric_row(
                use,
                arm,
                metric_stats(use.metric, aggregates, control),
                metric_stats(use.metric, aggregates, arm),
                states.get(key, ArmState()),
                control=control,
                alpha=alpha,
                n_star=n_star,
            )
            rows.append(row)
    ready, ramp_note = ramp_ready(experiment, aggregates, now=now)
    if breach is not None:
        verdict, reason = "rollback", breach.summary
    elif health.failing and experiment.on_health_failure != "warn":
        verdict = "rollback" if experiment.on_health_failure == "rollback" else "hold"
        reason = "health check failed: " + "; ".join(health.problems)
    elif experiment.kind == "canary" and ready:
        verdict, reason = "advance", ramp_note
    elif decision is not None and decision.safe_to_promote:
        verdict, reason = "safe_to_promote", "every guardrail is shown non-inferior"
    else:
        verdict = "continue"
        reason = decision.reason if decision is not None else "no guardrails to evaluate"
        if experiment.kind == "canary":
            reason = f"{reason}; {ramp_note}"
        if health.failing:
            reason = f"{reason}; health warning: " + "; ".join(health.problems)
    exposures = dict(sorted(aggregates.exposures.per_variant.items()))
    return ExperimentAnalysis(
        decision=verdict,
        reason=reason,
        health=health,
        exposures=exposures,
        metrics=rows,
        latency=_latency(aggregates),
        states=new_states,
        breach=breach,
        ramp_ready=ready,
        guardrail_decision=decision,
        notes=notes,
    )


def _breach(
    decision: GuardrailDecision,
    rows: Sequence[dict[str, Any]],
    states: Mapping[tuple[str, str], ArmState],
    control: str,
) -> Breach | None:
    tripped = decision.tripped
    if tripped is None:
        return None
    row = next(r for r in rows if r["metric"] == tripped.metric_key and r["arm"] == tripped.arm)
    state = states[(tripped.metric_key, tripped.arm)]
    return Breach(
        metric=tripped.metric_key,
        name=row["name"],
        arm=tripped.arm,
        control_arm=control,
        rel_effect=finite(tripped.relative_effect),
        interval=(state.lower, state.upper),
        interval_level=1 - 2 * tripped.alpha,
        harm_bound=finite(tripped.harm_lower_bound),
        margin=tripped.margin,
        n={control: tripped.n_control, tripped.arm: tripped.n_treatment},
        summary=row["summary"],
    )


def _sticky_breach(
    states: Mapping[tuple[str, str], ArmState],
    guardrail_uses: Sequence[ExperimentMetricView],
    control: str,
) -> Breach | None:
    """A guardrail that fired at an earlier look stays fired (STATS.md 9.3)."""
    names = {use.metric.key: use for use in guardrail_uses}
    for (metric_key, arm), state in sorted(states.items()):
        use = names.get(metric_key)
        if use is None or not state.fired:
            continue
        return Breach(
            metric=metric_key,
            name=use.metric.name,
            arm=arm,
            control_arm=control,
            rel_effect=None,
            interval=(state.lower, state.upper),
            interval_level=None,
            harm_bound=state.lower,
            margin=float(use.margin),
            n={},
            summary=f"{use.metric.name} on {arm} breached its guardrail at an earlier look",
            sticky=True,
        )
    return None
