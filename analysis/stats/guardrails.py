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
    worker does this for latency and TTFT quantiles) the same bet on each user's share of
    requests slower than control's recent quantile (`analysis.stats.quantile_users`). Mean
    latency given as `UserLatencyMeans` (the worker does this, and for the generative models'
    means: TTFT, tokens, tokens per second, cost) runs the same harm test on per-user sums
    standardised over ramp steps (`analysis.stats.latency_mean`).
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

from collections.abc import Sequence

from analysis.stats.guardrail_evidence import (
    MOMENT_TYPES,
    burn_in,
    moment_evidence,
    quantile_evidence,
)
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
from analysis.stats.health import SequentialSrmResult, SrmResult, srm_check
from analysis.stats.latency_mean import UserLatencyMeans, latency_mean_evidence
from analysis.stats.multiple import bonferroni_alphas
from analysis.stats.quantile_users import UserQuantileBets, quantile_user_evidence
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


def _srm_checks(
    snapshot: ExperimentSnapshot, settings: GuardrailSettings
) -> tuple[SrmResult | None, SequentialSrmResult | None]:
    if snapshot.exposures is None or snapshot.expected_weights is None:
        return None, None
    arms = (snapshot.control, *snapshot.treatments)
    observed = [int(snapshot.exposures.get(arm, 0)) for arm in arms]
    weights = [float(snapshot.expected_weights[arm]) for arm in arms]
    check = srm_check(
        observed,
        weights,
        alpha=settings.srm_threshold,
        min_units=settings.srm_min_units,
        concentration=settings.srm_concentration,
        previous_max_log_e_value=snapshot.previous_srm_max_log_e_value,
    )
    return check.chi_square, check.sequential


def evaluate_guardrails(
    specs: Sequence[GuardrailSpec],
    snapshot: ExperimentSnapshot,
    *,
    settings: GuardrailSettings | None = None,
) -> GuardrailDecision:
    """Decide rollback / hold / continue for one look at one experiment (STATS.md 9.1-9.3).

    Order: an SRM (the running maximum of the Dirichlet e-value past 1 / threshold; the
    chi-square p is only reported, `srm_check`) means `hold`, and guardrails are not evaluated
    on that data; otherwise any pair whose harm lower bound exceeds its margin means
    `rollback`; otherwise any pair in burn-in (or not evaluable) means `hold`; otherwise
    `continue`.
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
    if srm_seq is not None and srm_seq.flagged:
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
        elif isinstance(treatment, UserLatencyMeans):
            # Mean latency: users as the unit, within ramp steps (analysis.stats.latency_mean).
            evaluations.append(
                latency_mean_evidence(
                    spec,
                    arm,
                    treatment,
                    alpha=alpha_k,
                    settings=settings,
                    moment_test=moment_evidence,
                )
            )
        elif control is None or treatment is None:
            evaluations.append(burn_in(spec, arm, alpha_k, 0, 0, "no data yet"))
        elif spec.kind == "quantile":
            evaluations.append(
                quantile_evidence(spec, arm, control, treatment, alpha=alpha_k, settings=settings)
            )
        elif isinstance(control, MOMENT_TYPES) and isinstance(treatment, MOMENT_TYPES):
            evaluations.append(
                moment_evidence(spec, arm, control, treatment, alpha=alpha_k, settings=settings)
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
