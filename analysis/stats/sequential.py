"""Anytime-valid inference: confidence sequences, e-values and always-valid p-values.

Three families, all fed with (estimate, SE, N) from `effects` (STATS.md 1.2), so each works for
the absolute difference and the relative lift of proportion, mean, ratio and CUPED metrics:

* Asymptotic confidence sequences of Waudby-Smith et al. 2023 (arXiv 2103.06476v7) exactly as
  GrowthBook computes them: two-sided CS eq. (9), e-value/p-value eq. (155), tuning rho
  eq. (161) (STATS.md 2.1), and the one-sided bound eq. (134) of GrowthBook Safe Rollouts
  (STATS.md 2.2). N* ("n_star") is in pairwise-total units and must stay fixed for the life
  of an experiment.
* Normal-mixture uniform boundaries of Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform,
  nonparametric, nonasymptotic confidence sequences" (Ann. Statist. 49(2)), Section 3.2, as
  Eppo uses them: on the standardised sum s = z * sqrt(N) with intrinsic time v = N, the
  two-sided normal mixture  log M = 1/2 log(rho / (v + rho)) + s^2 / (2 (v + rho))  with
  boundary u(v) = sqrt((v + rho) log((v + rho) / (rho alpha^2))), and the one-sided
  (half-normal) mixture  log M = 1/2 log(4 rho / (v + rho)) + s^2 / (2 (v + rho))
  + log Phi(s / sqrt(v + rho)); rho is tuned to be tightest at v_opt (their Proposition 3(a),
  the `best_rho` of the confseq package). The two-sided version equals GrowthBook's CS
  (STATS.md 2.3), which the tests check.
* The mixture SPRT of Johari, Koomen, Pekelis & Walsh 2017 ("Peeking at A/B tests", KDD;
  Johari, Pekelis & Walsh 2022, Oper. Res. 70(3)) with normal mixing N(null, tau^2), in the
  general form with V/n replaced by SE^2 (STATS.md 3).

Validity is asymptotic (plug-in variance, CLT): callers enforce a burn-in before deciding.
Always-valid p-values come from the running maximum e-value (`RunningEvidence`), valid at any
stopping time by Ville's inequality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from scipy import optimize, special

from analysis.stats.effects import EffectError, EffectEstimate

Side = Literal["lower", "upper"]


def _check_alpha(alpha: float, *, one_sided: bool = False) -> None:
    upper = 0.5 if one_sided else 1.0
    if not 0 < alpha < upper:
        raise ValueError(f"alpha must lie in (0, {upper}), got {alpha}")


def _check_n_star(n_star: float) -> None:
    if not (math.isfinite(n_star) and n_star > 0):
        raise ValueError(f"n_star must be a positive number, got {n_star}")


def _mixture_constant(alpha: float) -> float:
    """2 log(1/a) + log(1 + 2 log(1/a)): Waudby-Smith et al. eq. (161) / Howard Prop. 3(a)."""
    log_inverse = -math.log(alpha)
    return 2 * log_inverse + math.log(1 + 2 * log_inverse)


def asymptotic_rho(alpha: float, n_star: float, *, one_sided: bool = False) -> float:
    """Mixing parameter rho of GrowthBook's CS, tightest at N = n_star (eq. (161)).

    One-sided (Safe Rollouts, STATS.md 2.2) uses 2 * alpha in the same formula.
    alpha = 0.05, n_star = 5000 gives rho = 0.0398401 (two-sided), 0.0355777 (one-sided).
    """
    _check_alpha(alpha, one_sided=one_sided)
    _check_n_star(n_star)
    level = 2 * alpha if one_sided else alpha
    return math.sqrt(_mixture_constant(level) / n_star)


@dataclass(frozen=True, slots=True)
class ConfidenceSequenceResult:
    """One look of a two-sided confidence sequence for the effect, with its e-value.

    `p_value` is the instantaneous one, min(1, 1 / E_N) (what gbstats reports); the
    always-valid p-value needs the running maximum of E over looks (`RunningEvidence`).
    """

    estimate: float
    se: float
    total_n: int
    lower: float
    upper: float
    log_e_value: float
    p_value: float
    alpha: float
    error: EffectError | None = None

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, 700.0))


def _no_result(effect: EffectEstimate, alpha: float) -> ConfidenceSequenceResult:
    return ConfidenceSequenceResult(
        estimate=0.0,
        se=0.0,
        total_n=effect.total_n,
        lower=0.0,
        upper=0.0,
        log_e_value=0.0,
        p_value=1.0,
        alpha=alpha,
        error=effect.error,
    )


def asymptotic_confidence_sequence(
    effect: EffectEstimate, *, alpha: float = 0.05, n_star: float = 5000.0, null: float = 0.0
) -> ConfidenceSequenceResult:
    """GrowthBook's two-sided asymptotic CS (Waudby-Smith et al. eq. (9), (155), (161)).

    With k = N rho^2 + 1, the half-width is SE * sqrt(k / (N rho^2) * (2 log(1/alpha) + log k))
    and log E_N = rho^2 N z^2 / (2k) - log(k) / 2 with z = (estimate - null) / SE.
    """
    _check_alpha(alpha)
    if not effect.ok:
        return _no_result(effect, alpha)
    rho2 = asymptotic_rho(alpha, n_star) ** 2
    n = effect.total_n
    k = n * rho2 + 1
    half_width = effect.se * math.sqrt(k / (n * rho2) * (-2 * math.log(alpha) + math.log(k)))
    z = (effect.estimate - null) / effect.se
    log_e = rho2 * n * z * z / (2 * k) - 0.5 * math.log(k)
    return ConfidenceSequenceResult(
        estimate=effect.estimate,
        se=effect.se,
        total_n=n,
        lower=effect.estimate - half_width,
        upper=effect.estimate + half_width,
        log_e_value=log_e,
        p_value=min(1.0, math.exp(-log_e)),
        alpha=alpha,
    )


@dataclass(frozen=True, slots=True)
class OneSidedBoundResult:
    """One look of a one-sided confidence sequence: a lower or an upper bound on the effect.

    `p_value` tests H0: effect <= null (side "lower") or effect >= null (side "upper"): the
    level alpha' at which the bound would touch the null, in closed form (not clipped, unlike
    gbstats' bisection; STATS.md 2.2). Its running minimum over looks is always valid.
    """

    estimate: float
    se: float
    total_n: int
    bound: float
    side: Side
    p_value: float
    alpha: float
    error: EffectError | None = None


def asymptotic_one_sided_bound(
    effect: EffectEstimate,
    *,
    alpha: float = 0.05,
    n_star: float = 5000.0,
    side: Side = "lower",
    null: float = 0.0,
) -> OneSidedBoundResult:
    """GrowthBook's one-sided sequential bound (Waudby-Smith et al. eq. (134); STATS.md 2.2).

    w = SE * sqrt(2 k / (N rho1^2) * log(1 + sqrt(k) / (2 alpha))), k = N rho1^2 + 1, with rho1
    from 2 * alpha. Side "lower" is gbstats' `SequentialOneSidedTreatmentGreaterTTest` bound
    [estimate - w, inf); "upper" is the `Lesser` bound (-inf, estimate + w].
    """
    _check_alpha(alpha, one_sided=True)
    if not effect.ok:
        return OneSidedBoundResult(
            estimate=0.0,
            se=0.0,
            total_n=effect.total_n,
            bound=-math.inf if side == "lower" else math.inf,
            side=side,
            p_value=1.0,
            alpha=alpha,
            error=effect.error,
        )
    rho2 = asymptotic_rho(alpha, n_star, one_sided=True) ** 2
    n = effect.total_n
    k = n * rho2 + 1
    half_width = effect.se * math.sqrt(
        2 * k / (n * rho2) * math.log(1 + math.sqrt(k) / (2 * alpha))
    )
    z = (effect.estimate - null) / effect.se
    if side == "upper":
        z = -z
    if z <= 0:
        p_value = 1.0
    else:
        # Solve the bound = null for the level (rho held at the design alpha, as gbstats).
        exponent = z * z * n * rho2 / (2 * k)
        p_value = min(1.0, math.sqrt(k) / (2 * math.expm1(min(exponent, 700.0))))
    bound = effect.estimate - half_width if side == "lower" else effect.estimate + half_width
    return OneSidedBoundResult(
        estimate=effect.estimate,
        se=effect.se,
        total_n=n,
        bound=bound,
        side=side,
        p_value=p_value,
        alpha=alpha,
    )


def normal_mixture_rho(v_opt: float, alpha_opt: float = 0.05, *, one_sided: bool = False) -> float:
    """Howard et al. 2021 Prop. 3(a): the rho making the normal mixture tightest at v_opt.

    The one-sided mixture is tuned with 2 * alpha_opt (confseq `OneSidedNormalMixture`).
    confseq's tests: v_opt = 100, alpha_opt = 0.05, two-sided gives 12.60056.
    """
    _check_n_star(v_opt)
    _check_alpha(alpha_opt, one_sided=one_sided)
    level = 2 * alpha_opt if one_sided else alpha_opt
    return v_opt / _mixture_constant(level)


def normal_mixture_log_e(
    s: float, v: float, *, v_opt: float, alpha_opt: float = 0.05, one_sided: bool = False
) -> float:
    """Log of Howard et al.'s normal-mixture supermartingale at sum s, intrinsic time v.

    Two-sided: 1/2 log(rho / (v + rho)) + s^2 / (2 (v + rho)); one-sided (half-normal mixing,
    tests s > 0): 1/2 log(4 rho / (v + rho)) + s^2 / (2 (v + rho)) + log Phi(s / sqrt(v + rho)).
    """
    rho = normal_mixture_rho(v_opt, alpha_opt, one_sided=one_sided)
    scale = v + rho
    if not one_sided:
        return 0.5 * math.log(rho / scale) + s * s / (2 * scale)
    return (
        0.5 * math.log(4 * rho / scale)
        + s * s / (2 * scale)
        + float(special.log_ndtr(s / math.sqrt(scale)))
    )


def normal_mixture_bound(
    v: float, *, alpha: float, v_opt: float, alpha_opt: float = 0.05, one_sided: bool = False
) -> float:
    """Uniform boundary u(v) on s: P(exists v: |S_v| >= u(v)) <= alpha (one-sided: S_v >= u).

    Two-sided closed form sqrt((v + rho) log((v + rho) / (rho alpha^2))) (Howard et al. 2021,
    Section 3.2); the one-sided boundary solves log M(s, v) = log(1 / alpha) for s, bracketed
    between the two-sided boundaries at 2 * alpha and alpha with the same rho (since
    Phi(.) lies in [1/2, 1] for s >= 0).
    """
    _check_alpha(alpha, one_sided=one_sided)
    if v < 0:
        raise ValueError(f"v must be >= 0, got {v}")
    rho = normal_mixture_rho(v_opt, alpha_opt, one_sided=one_sided)
    scale = v + rho

    def two_sided(level: float) -> float:
        return math.sqrt(scale * math.log(scale / (rho * level * level)))

    if not one_sided:
        return two_sided(alpha)
    target = -math.log(alpha)

    def excess(s: float) -> float:
        return normal_mixture_log_e(s, v, v_opt=v_opt, alpha_opt=alpha_opt, one_sided=True) - (
            target
        )

    low, high = two_sided(2 * alpha), two_sided(alpha)
    if excess(low) >= 0:
        return low
    return float(optimize.brentq(excess, low, high, xtol=1e-12, rtol=1e-14))


def normal_mixture_confidence_sequence(
    effect: EffectEstimate, *, alpha: float = 0.05, n_star: float = 5000.0, null: float = 0.0
) -> ConfidenceSequenceResult:
    """Two-sided CS from Howard et al.'s normal mixture with plug-in variance.

    Standardising the estimator gives s = z sqrt(N), v = N, v_opt = N*; the CS is
    estimate +- u(N) * SE / sqrt(N). With alpha_opt = alpha this equals GrowthBook's CS.
    """
    _check_alpha(alpha)
    if not effect.ok:
        return _no_result(effect, alpha)
    n = effect.total_n
    u = normal_mixture_bound(n, alpha=alpha, v_opt=n_star, alpha_opt=alpha)
    half_width = u * effect.se / math.sqrt(n)
    z = (effect.estimate - null) / effect.se
    log_e = normal_mixture_log_e(z * math.sqrt(n), n, v_opt=n_star, alpha_opt=alpha)
    return ConfidenceSequenceResult(
        estimate=effect.estimate,
        se=effect.se,
        total_n=n,
        lower=effect.estimate - half_width,
        upper=effect.estimate + half_width,
        log_e_value=log_e,
        p_value=min(1.0, math.exp(-log_e)),
        alpha=alpha,
    )


def normal_mixture_one_sided_bound(
    effect: EffectEstimate,
    *,
    alpha: float = 0.05,
    n_star: float = 5000.0,
    side: Side = "lower",
    null: float = 0.0,
) -> OneSidedBoundResult:
    """One-sided bound from Howard et al.'s half-normal mixture (confseq `OneSidedNormalMixture`).

    `p_value` is min(1, 1 / M) of the one-sided mixture at the null (instantaneous).
    """
    _check_alpha(alpha, one_sided=True)
    if not effect.ok:
        return OneSidedBoundResult(
            estimate=0.0,
            se=0.0,
            total_n=effect.total_n,
            bound=-math.inf if side == "lower" else math.inf,
            side=side,
            p_value=1.0,
            alpha=alpha,
            error=effect.error,
        )
    n = effect.total_n
    u = normal_mixture_bound(n, alpha=alpha, v_opt=n_star, alpha_opt=alpha, one_sided=True)
    half_width = u * effect.se / math.sqrt(n)
    z = (effect.estimate - null) / effect.se
    s = z * math.sqrt(n) if side == "lower" else -z * math.sqrt(n)
    log_m = normal_mixture_log_e(s, n, v_opt=n_star, alpha_opt=alpha, one_sided=True)
    bound = effect.estimate - half_width if side == "lower" else effect.estimate + half_width
    return OneSidedBoundResult(
        estimate=effect.estimate,
        se=effect.se,
        total_n=n,
        bound=bound,
        side=side,
        p_value=min(1.0, math.exp(-log_m)),
        alpha=alpha,
    )


def matched_tau2(per_unit_variance: float, *, alpha: float = 0.05, n_star: float) -> float:
    """Johari's mixing variance matched to GrowthBook's tuning (STATS.md 3, rule (ii)).

    tau^2 = rho^2 * sigma^2 with sigma^2 = SE^2 * N the estimator's per-unit variance in
    pairwise-total units, so that the mSPRT equals the asymptotic CS with the same N*.
    In Johari's per-arm form this is V (2 log(1/alpha) + log(1 + 2 log(1/alpha))) / n*, N* = 2 n*.
    """
    if not (math.isfinite(per_unit_variance) and per_unit_variance > 0):
        raise ValueError(f"per_unit_variance must be positive, got {per_unit_variance}")
    return asymptotic_rho(alpha, n_star) ** 2 * per_unit_variance


def msprt(
    effect: EffectEstimate, *, alpha: float = 0.05, tau2: float, null: float = 0.0
) -> ConfidenceSequenceResult:
    """Mixture SPRT with normal mixing N(null, tau^2) (Johari et al. 2017, 2022; STATS.md 3).

    Lambda = sqrt(V / (V + tau^2)) exp(tau^2 (d - null)^2 / (2 V (V + tau^2))) with V = SE^2;
    the always-valid CI inverts Lambda < 1 / alpha:
    d +- sqrt(V (V + tau^2) / tau^2 * log((V + tau^2) / (V alpha^2))).
    """
    _check_alpha(alpha)
    if not (math.isfinite(tau2) and tau2 > 0):
        raise ValueError(f"tau2 must be positive, got {tau2}")
    if not effect.ok:
        return _no_result(effect, alpha)
    variance = effect.variance
    total = variance + tau2
    deviation = effect.estimate - null
    log_lambda = 0.5 * math.log(variance / total) + tau2 * deviation**2 / (2 * variance * total)
    half_width = math.sqrt(variance * total / tau2 * math.log(total / (variance * alpha**2)))
    return ConfidenceSequenceResult(
        estimate=effect.estimate,
        se=effect.se,
        total_n=effect.total_n,
        lower=effect.estimate - half_width,
        upper=effect.estimate + half_width,
        log_e_value=log_lambda,
        p_value=min(1.0, math.exp(-log_lambda)),
        alpha=alpha,
    )


@dataclass(frozen=True, slots=True)
class RunningEvidence:
    """What must persist between looks for one estimand: running max e-value and intersection.

    The always-valid p-value is min(1, 1 / max_m E_m) (Johari-style; Ville's inequality), and
    the running intersection [max_m L_m, min_m U_m] of a valid CS is itself a valid CS. If the
    intersection would be empty (the plug-in variance moved), the current interval is kept and
    `empty_intersection` records it: under H0 that happens with probability at most alpha.
    """

    looks: int = 0
    max_log_e_value: float = 0.0
    lower: float = -math.inf
    upper: float = math.inf
    empty_intersection: bool = False

    @property
    def p_value(self) -> float:
        return min(1.0, math.exp(-self.max_log_e_value))

    def update(self, result: ConfidenceSequenceResult) -> RunningEvidence:
        """Fold one look in; looks with no result (error) count but change nothing else."""
        if result.error is not None:
            return replace(self, looks=self.looks + 1)
        lower = max(self.lower, result.lower)
        upper = min(self.upper, result.upper)
        empty = self.empty_intersection
        if lower > upper:
            lower, upper, empty = result.lower, result.upper, True
        return RunningEvidence(
            looks=self.looks + 1,
            max_log_e_value=max(self.max_log_e_value, result.log_e_value),
            lower=lower,
            upper=upper,
            empty_intersection=empty,
        )
