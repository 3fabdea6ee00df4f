"""The mean-latency guardrail with the user as the unit, compared within ramp-step strata.

Issue 12 asks two things of a mean-latency guardrail that the pooled per-request comparison
did not give: the user is the unit (a user's requests share its payloads, region and client,
and a heavy user sends thousands), and the comparison is contemporaneous (in a ramp,
control's requests come mostly from early minutes and the canary's from late ones).

Estimand
    The arm's mean latency per request, R = E[M] / E[D], where M is a user's latency sum and
    D its number of requests with a latency within a fixed window after its first request
    (`routing.unit_outcomes`, RATE_WINDOW_SLOW_S): a ratio metric with the user as the unit
    (STATS.md 6, "never analyse a ratio metric as a per-event mean"). Its per-unit
    delta-method variance (gbstats `RatioStatistic`; Deng, Knoblich & Lu 2018, "Applying the
    delta method in metric analytics", KDD)

        (1) sigma_R^2 = s_M^2 / Dbar^2 - 2 R cov(M, D) / Dbar^2 + R^2 s_D^2 / Dbar^2
                      = sum_i (M_i - R D_i)^2 / ((n - 1) Dbar^2)

    is the cluster-robust (user-clustered) variance of the per-request mean, so one user's
    correlated requests count once (checked against statsmodels' OLS with cluster-robust
    standard errors by user in tests/analysis/stats/test_latency_mean.py).

Contemporaneous construction: strata of constant assignment probability
    A user's stratum is (the ramp step in force at its first request, the probability that
    the routing snapshot which served it gave control). Inside one stratum the assignment
    probability is constant, so which arm a user lands in is independent of when it came:
    both arms have the same time profile, and any drift shared by the arms (load, time of
    day, user mix) cancels within the stratum (stratification on the propensity score,
    Rosenbaum & Rubin 1983, Biometrika 70:41-55; in a ramp, the strata are the
    ramp steps of STATS.md 12.2). The strata are combined by `analysis.stats.strata.standardize`
    with the fixed Mantel-Haenszel weights w_s = n_A,s n_B,s / (n_A,s + n_B,s) (Greenland &
    Robins 1985): each arm's (Mbar, Dbar) becomes sum_s w_s (Mbar_s, Dbar_s), with covariance
    sum_s w_s^2 Cov_s / n_s, and (1) is applied to the standardised sums, so the contrast is a
    fixed-weight combination of within-stratum contrasts and time cannot leak into it. A
    stratum in which an arm has fewer than 2 users contributes nothing. With a single stratum
    (an A/B test whose split never changed) the arms' own sums are compared ("pooled", which
    is then contemporaneous too).

The test
    The standardised arms go through the same one-sided harm test as every mean and ratio
    guardrail (`analysis.stats.guardrails`): Fieller's contrast R_B - (1 + m) R_A over its
    delta-method standard error (`analysis.stats.harm.mean_harm_z`), against the boundary of
    the one-sided asymptotic confidence sequence of Waudby-Smith et al. 2023 (arXiv
    2103.06476v7, eq. (134); GrowthBook Safe Rollouts), a normal mixture equivalent to that of
    Howard, Ramdas, McAuliffe & Sekhon 2021 (Ann. Statist. 49(2), section 3.2; STATS.md 2.3),
    with N the number of users in both arms. Margins, the
    weighted-Bonferroni alpha split over guardrails and arms, the burn-in
    (`min_units_per_arm` users per arm) and degenerate data (`analysis.stats.degenerate`:
    one constant arm tests as usual, two constant arms compare the exact difference with the
    margin) are those of every moment guardrail.

Guarantee
    Asymptotic, like every mean and ratio guardrail: users independent (each counted once,
    its outcome fixed by a window that does not look at it), plug-in variances, the CLT.
    Under H0 (in every stratum the canary's mean latency is at most (1 + m) times control's)
    the probability of ever rolling back is at most alpha_k up to the CLT approximation.
    bench/ramp_latency.py measures it in A/A ramps with latency doubling over the run and
    with sticky users who send Pareto(1.2) numbers of requests and have their own latency
    levels, next to the pooled per-request test it replaces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from analysis.stats.guardrail_types import (
    GuardrailEvidence,
    GuardrailSettings,
    GuardrailSpec,
    GuardrailStatus,
)
from analysis.stats.moments import MetricStats, RatioStats
from analysis.stats.strata import POOLED, STRATIFIED, Construction, Standardized, standardize

__all__ = [
    "METHOD",
    "UserLatencyMeans",
    "latency_mean_evidence",
    "method_text",
    "user_latency_means",
]

LATENCY_QUANTITY = "latency sum / requests per user"
_METHOD = (
    "users as the unit ({quantity}, delta method), one-sided "
    "sequential harm test (GrowthBook eq. 134 boundary), asymptotic"
)
METHOD = _METHOD.format(quantity=LATENCY_QUANTITY)
_CONSTRUCTION_TEXT = {
    STRATIFIED: "stratified by ramp step (Mantel-Haenszel weights)",
    POOLED: "one stratum (the split never changed)",
}

# moment_test(spec, arm, control, treatment, *, alpha, settings): the harm test of
# analysis.stats.guardrails for proportion, mean and ratio guardrails.
MomentTest = Callable[..., GuardrailEvidence]


@dataclass(frozen=True, slots=True)
class UserLatencyMeans:
    """Control and one treatment arm, standardised to the same stratum weights.

    `control` / `treatment` are None while no stratum holds users of both arms. `quantity`
    names the per-user ratio (the same construction serves the generative models' means:
    TTFT, output tokens, tokens per second and cost, each a per-user sum over a count).
    """

    control: RatioStats | None
    treatment: RatioStats | None
    construction: Construction
    strata_used: int = 0
    strata_seen: int = 0
    quantity: str = LATENCY_QUANTITY


def method_text(construction: Construction, quantity: str = LATENCY_QUANTITY) -> str:
    """The words a result row and an alert carry for the guardrail's test."""
    return f"{_METHOD.format(quantity=quantity)}; {_CONSTRUCTION_TEXT[construction]}"


def user_latency_means(
    strata: Mapping[str, Mapping[int, RatioStats]], *, arms: Sequence[str]
) -> Standardized:
    """Combine per-stratum user sums of `arms` (strata[arm][stratum]) with shared weights.

    Strata are numbered by the caller (ramp step, then control's share). More than one
    stratum seen in any arm makes the construction "stratified by ramp step".
    """
    seen = {s for arm in arms for s in strata.get(arm, {})}
    construction = STRATIFIED if len(seen) > 1 else POOLED
    typed: dict[str, Mapping[int, MetricStats]] = {arm: strata.get(arm, {}) for arm in arms}
    return standardize(typed, arms=arms, construction=construction)


def comparison(
    combined: Standardized, *, control: str, arm: str, quantity: str = LATENCY_QUANTITY
) -> UserLatencyMeans:
    """The pair (control, arm) out of a standardisation over the experiment's arms."""
    a, b = combined.stats.get(control), combined.stats.get(arm)
    return UserLatencyMeans(
        control=a if isinstance(a, RatioStats) else None,
        treatment=b if isinstance(b, RatioStats) else None,
        construction=combined.construction,
        strata_used=combined.cohorts_used,
        strata_seen=combined.cohorts_seen,
        quantity=quantity,
    )


def latency_mean_evidence(
    spec: GuardrailSpec,
    arm: str,
    means: UserLatencyMeans,
    *,
    alpha: float,
    settings: GuardrailSettings,
    moment_test: MomentTest,
) -> GuardrailEvidence:
    """Harm / non-inferiority of a mean-latency guardrail on standardised user sums."""
    method = method_text(means.construction, means.quantity)
    if means.control is None or means.treatment is None:
        return GuardrailEvidence(
            metric_key=spec.metric_key,
            arm=arm,
            kind=spec.kind,
            direction=spec.direction,
            status=GuardrailStatus.BURN_IN,
            margin=spec.margin,
            alpha=alpha,
            n_control=means.control.n if means.control is not None else 0,
            n_treatment=means.treatment.n if means.treatment is not None else 0,
            note=(
                "no ramp step has users of both arms whose "
                f"{'latency ' if means.quantity == LATENCY_QUANTITY else ''}window has closed"
            ),
            method=method,
        )
    evidence = moment_test(
        replace(spec, kind="ratio"),
        arm,
        means.control,
        means.treatment,
        alpha=alpha,
        settings=settings,
    )
    return replace(evidence, kind=spec.kind, method=method)
