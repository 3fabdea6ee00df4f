"""Glue between an experiment's specification, its aggregates and `analysis.stats`.

`analyse` is a pure function (no database, no settings): given the experiment's frozen view,
its aggregated statistics and the sequential state persisted by earlier runs, it returns
what the result snapshot stores (health, exposures, metric rows, latency) and the proposed
decision. `analysis.services` persists the new sequential state and carries the decision
out (rollback, hold, ramp step). The health checks live in `analysis.health`, the metric rows
and the sequential state they carry in `analysis.evidence`.

Statistics used
    * Health: the chi-square SRM test and the Dirichlet-multinomial SRM e-value
      (`analysis.stats.health`), the multiple-exposure share, and a no-traffic check. In a
      canary the expected split changes with every ramp step, so the SRM compares the units
      first seen in the current step (after a short grace period for the edges to pick the
      step up) with the step's split, and its running e-value restarts at each step.
    * Guardrails: `analysis.stats.guardrails.evaluate_guardrails` (one-sided sequential harm
      tests with weighted Bonferroni; false-rollback probability <= alpha over all looks).
      The error rate is tested with the user as the unit by an exact betting e-process
      (`analysis.stats.rate_guardrail`, fed by `analysis.rate_guardrails`), the mean latency
      on per-user latency sums standardised over ramp steps (`analysis.stats.latency_mean`,
      fed by `analysis.latency_means`; its result rows and reports too). The generative
      models' TTFT quantiles are bet on users like latency quantiles, and their means (TTFT,
      tokens, tokens per second, cost) compared on per-user sums like mean latency
      (`analysis.llm_means`).
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from analysis.aggregation import BUILTIN_ERROR, BUILTIN_LATENCY, Aggregates
from analysis.cohorts import annotate_rows
from analysis.evidence import GUARDRAIL, ArmState, finite, guardrail_row, latency, metric_row
from analysis.health import Health, HealthSettings, arms, check_health
from analysis.latency_windows import WindowedLogHistogram
from analysis.llm_means import is_llm_mean, llm_comparison
from analysis.llm_metrics import LLM_SOURCES, llm_metric_stats, llm_summary
from analysis.reporting import withhold_small_samples
from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailDecision,
    GuardrailSettings,
    GuardrailSpec,
    evaluate_guardrails,
)
from analysis.stats.latency_mean import comparison
from analysis.stats.quantile_users import UserQuantileBets
from analysis.stats.rate_guardrail import UserRateBets
from analysis.stats.strata import Standardized
from experiments.contracts import ExperimentMetricView, ExperimentView, MetricView


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
    p_value: float | None = None
    method: str = ""

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
            "p_value": finite(self.p_value),
            "method": self.method or None,
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


# --------------------------------------------------------------------------- inputs


def is_latency_mean(metric: MetricView) -> bool:
    """The proxy's mean latency (compared on users within ramp steps)."""
    return metric.source == BUILTIN_LATENCY and metric.kind == "mean"


def metric_stats(
    metric: MetricView,
    aggregates: Aggregates,
    arm: str,
    user_latency: Standardized | None = None,
    user_llm: Mapping[str, Standardized] | None = None,
) -> object | None:
    """The statistic of one metric for one arm, of the kind `analysis.stats` expects.

    The mean latency is the arm's standardised per-user latency sums (`user_latency`), never
    the requests pooled over the run; so are the generative models' means (`user_llm`, by
    source).
    """
    if is_latency_mean(metric):
        return user_latency.stats.get(arm) if user_latency is not None else None
    if is_llm_mean(metric):
        combined = (user_llm or {}).get(metric.source)
        return combined.stats.get(arm) if combined is not None else None
    if metric.source in LLM_SOURCES and metric.kind != "ratio":
        return llm_metric_stats(metric, aggregates.llm.get(arm))
    if metric.source in (BUILTIN_LATENCY, BUILTIN_ERROR) and metric.kind != "ratio":
        totals = aggregates.observations.get(arm)
        if totals is None or totals.count == 0:
            return None
        if metric.source == BUILTIN_ERROR:
            return totals.errors
        if metric.kind == "quantile":
            if not totals.histogram.count:
                return None
            windows = aggregates.latency_windows.get(arm, {})
            return WindowedLogHistogram(totals.histogram, windows)
        return totals.latency if totals.histogram.count else None
    return aggregates.business.get(metric.key, {}).get(arm)


def _spec(use: ExperimentMetricView, aggregates: Aggregates) -> GuardrailSpec:
    metric = use.metric
    kind = {"binomial": "proportion", "mean": "mean", "ratio": "ratio", "quantile": "quantile"}[
        metric.kind
    ]
    construction = aggregates.business_construction.get(metric.key)
    if kind == "proportion" and construction is not None and construction.standardized:
        kind = "mean"  # cohorts combined: a standardised rate is a mean (analysis.stats.strata)
    return GuardrailSpec(
        metric_key=metric.key,
        kind=kind,  # type: ignore[arg-type]
        direction="lower_is_better" if metric.lower_is_better else "higher_is_better",
        margin=float(use.margin),
        quantile=metric.quantile if metric.kind == "quantile" else None,
    )


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
    rate_bets: Mapping[tuple[str, str], UserRateBets | UserQuantileBets] | None = None,
    user_latency: Standardized | None = None,
    user_llm: Mapping[str, Standardized] | None = None,
) -> ExperimentAnalysis:
    """Evaluate health, guardrails and metrics of one experiment at one look.

    `rate_bets` holds, per (metric key, treatment arm), the users' betting e-processes of the
    per-request rate guardrails (`analysis.rate_guardrails`) and of the latency quantile
    guardrails (`analysis.quantile_guardrails`); those guardrails are tested on them, with the
    user as the unit, instead of on the per-request counts and histograms. `user_latency`
    holds the arms' per-user latency sums standardised over ramp steps
    (`analysis.latency_means`), on which mean-latency metrics are compared; without it they
    wait for data. `user_llm` does the same for the generative models' means, by source
    (`analysis.llm_means`).
    """
    rate_bets = rate_bets or {}
    health_settings = health_settings or HealthSettings()
    control, treatments = arms(experiment)

    def stats_of(metric: MetricView, arm: str) -> object | None:
        return metric_stats(metric, aggregates, arm, user_latency, user_llm)

    def guardrail_stats(metric: MetricView, arm: str) -> object | None:
        """What the guardrail test of one arm takes: users' bets or latency comparisons
        (treatment arms), otherwise the arm's statistic."""
        if (metric.key, arm) in rate_bets:
            return rate_bets[(metric.key, arm)]
        if is_latency_mean(metric) and user_latency is not None and arm != control:
            return comparison(user_latency, control=control, arm=arm)
        if is_llm_mean(metric) and user_llm and metric.source in user_llm and arm != control:
            return llm_comparison(user_llm[metric.source], metric, control=control, arm=arm)
        return stats_of(metric, arm)

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
                    if (stats := guardrail_stats(use.metric, arm)) is not None
                }
                for use in guardrail_uses
            },
        )
        settings = GuardrailSettings(alpha=alpha, n_star=n_star)
        decision = evaluate_guardrails(
            [_spec(use, aggregates) for use in guardrail_uses], snapshot, settings=settings
        )
        uses = {use.metric.key: use for use in guardrail_uses}
        for evidence in decision.evaluations:
            use = uses[evidence.metric_key]
            key = (evidence.metric_key, evidence.arm)
            row, new_states[key] = guardrail_row(
                use,
                evidence,
                stats_of(use.metric, control),
                stats_of(use.metric, evidence.arm),
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
            row, new_states[key] = metric_row(
                use,
                arm,
                stats_of(use.metric, control),
                stats_of(use.metric, arm),
                states.get(key, ArmState()),
                control=control,
                alpha=alpha,
                n_star=n_star,
            )
            rows.append(row)
    withhold_small_samples(rows)
    constructions = dict(aggregates.business_construction)
    if user_latency is not None:
        constructions.update(
            (use.metric.key, user_latency)
            for use in experiment.metrics
            if is_latency_mean(use.metric)
        )
    if user_llm:
        constructions.update(
            (use.metric.key, user_llm[use.metric.source])
            for use in experiment.metrics
            if is_llm_mean(use.metric) and use.metric.source in user_llm
        )
    annotate_rows(rows, constructions)
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
        latency=_with_llm(latency(aggregates), aggregates),
        states=new_states,
        breach=breach,
        ramp_ready=ready,
        guardrail_decision=decision,
        notes=notes,
    )


def _with_llm(table: dict[str, dict[str, Any]], aggregates: Aggregates) -> dict[str, Any]:
    """The per-arm latency table, with each arm's LLM figures under "llm" when it has some."""
    for variant, figures in llm_summary(aggregates.llm).items():
        table.setdefault(variant, {})["llm"] = figures
    return table


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
        p_value=row["p_always_valid"],
        method=tripped.method,
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
