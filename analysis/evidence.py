"""Per-metric evidence of one look: the result rows and the sequential state they carry.

For each (metric, arm) a guardrail row (from the evidence `evaluate_guardrails` returns) or
a primary/secondary metric row (two-sided always-valid inference on the relative lift),
each folding the look into the `ArmState` persisted between runs; also the per-arm latency
table. `analysis.guardrails.analyse` assembles these into the snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from analysis.aggregation import Aggregates
from analysis.latency_windows import WindowedLogHistogram
from analysis.stats.effects import estimate_effect
from analysis.stats.fixed import fixed_horizon_test
from analysis.stats.guardrails import GuardrailEvidence, GuardrailStatus
from analysis.stats.quantile_exceedance import exceedance_test
from analysis.stats.quantiles import quantile_guardrail
from analysis.stats.quantiles_fixed import quantile_difference_ci
from analysis.stats.sequential import RunningEvidence, asymptotic_confidence_sequence
from experiments.contracts import ExperimentMetricView, MetricView
from routing.observe.histogram import LogHistogram

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


def guardrail_row(
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
            "method": evidence.method or guardrail_method(evidence.kind),
            "status": status,
            "summary": summary,
        }
    )
    return row, state


def guardrail_method(kind: str) -> str:
    """The test behind a guardrail whose evidence does not name its own method."""
    if kind == "quantile":
        return "quantile confidence sequences (Howard & Ramdas 2022), per request"
    return "one-sided sequential harm test (GrowthBook eq. 134 boundary), asymptotic"


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


def metric_row(
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
    if isinstance(control_stats, WindowedLogHistogram) and isinstance(
        treatment_stats, WindowedLogHistogram
    ):
        # Contemporaneous (per time window, analysis.stats.quantile_exceedance): the slower
        # and the faster side each at alpha / 2, the p-value of "no difference" by Bonferroni.
        exceedance = exceedance_test(
            control_stats, treatment_stats, p=metric.quantile or 0.5, alpha=alpha / 2
        )
        state = state.intersect(exceedance.harm_lower_bound, exceedance.harm_upper_bound)
        state = replace(state, looks=state.looks + 1)
        rel = finite(exceedance.relative_effect)
        p_always = min(1.0, 2 * min(exceedance.p_value, exceedance.safe_p_value), state.min_p_value)
        state = replace(state, min_p_value=p_always)
        row["method"] = exceedance.method
    elif isinstance(control_stats, LogHistogram) and isinstance(treatment_stats, LogHistogram):
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


def latency(aggregates: Aggregates) -> dict[str, dict[str, Any]]:
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
