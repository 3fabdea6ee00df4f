"""Experiment health checks: sample ratio mismatch (fixed and sequential) and multiple exposure.

* `srm_chi_square`: GrowthBook's chi-square SRM test (gbstats `utils.check_srm`, STATS.md 7.1),
  a fixed-sample test: re-run at every look, its chance of a false alarm grows with the number
  of looks. Reported (for parity with GrowthBook and for display), it raises no flag.
* `srm_sequential`: an anytime-valid SRM e-value, the Dirichlet-multinomial Bayes factor of
  Lindon & Malek, "Anytime-valid inference for multinomial count data", NeurIPS 2022
  (STATS.md 7.2); flagging at E >= 1 / alpha keeps the chance of a false SRM alarm over the
  whole experiment at most alpha (Ville's inequality), however often it is looked at.
* `srm_check`: both at one look; the flag is the e-value's alone.
* `multiple_exposure_check`: the share of units that saw more than one variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import special
from scipy import stats as scipy_stats

DEFAULT_SRM_THRESHOLD = 0.001
DEFAULT_SRM_MIN_UNITS = 100
DEFAULT_SRM_CONCENTRATION = 1000.0
DEFAULT_MULTIPLE_EXPOSURE_THRESHOLD = 0.01


def _check_counts(observed: Sequence[int], weights: Sequence[float]) -> None:
    if len(observed) != len(weights):
        raise ValueError("observed and expected_weights must have the same length")
    if len(observed) < 2:
        raise ValueError("observed must have at least two arms")
    for count in observed:
        if isinstance(count, bool) or int(count) != count or count < 0:
            raise ValueError(f"observed must hold non-negative integers, got {count!r}")
    for weight in weights:
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"expected_weights must be finite and >= 0, got {weight!r}")
    if sum(weights) <= 0:
        raise ValueError("expected_weights must have a positive sum")


@dataclass(frozen=True, slots=True)
class SrmResult:
    """Chi-square SRM test: p-value, statistic, and GrowthBook's rule (p < threshold).

    `flagged` is GrowthBook's single-look rule, kept for parity; Rampart's SRM flag is
    `SrmCheck.flagged` (the anytime-valid e-value), as repeated looks inflate this one.
    """

    p_value: float
    chi_square: float
    total_units: int
    enough_data: bool
    flagged: bool
    threshold: float


def srm_chi_square(
    observed: Sequence[int],
    expected_weights: Sequence[float],
    *,
    threshold: float = DEFAULT_SRM_THRESHOLD,
    min_units: int = DEFAULT_SRM_MIN_UNITS,
) -> SrmResult:
    """Pearson chi-square of observed units per arm against the configured weights.

    As gbstats: arms with weight <= 0 are left out of the sum but still count in the k - 1
    degrees of freedom, and p = 1 with no units. Flags only once `min_units` units exist.
    """
    _check_counts(observed, expected_weights)
    total = int(sum(observed))
    total_weight = float(sum(expected_weights))
    statistic = 0.0
    for count, weight in zip(observed, expected_weights, strict=True):
        if weight <= 0:
            continue
        expected = weight / total_weight * total
        if expected > 0:
            statistic += (count - expected) ** 2 / expected
    p_value = 1.0 if total == 0 else float(scipy_stats.chi2.sf(statistic, len(observed) - 1))
    enough = total >= min_units
    return SrmResult(
        p_value=p_value,
        chi_square=statistic,
        total_units=total,
        enough_data=enough,
        flagged=enough and p_value < threshold,
        threshold=threshold,
    )


@dataclass(frozen=True, slots=True)
class SequentialSrmResult:
    """Dirichlet-multinomial SRM e-value at this look and its running maximum.

    `p_value` = min(1, 1 / max E) is always valid; persist `max_log_e_value` and pass it back
    as `previous_max_log_e_value` on the next look.
    """

    log_e_value: float
    max_log_e_value: float
    p_value: float
    flagged: bool
    alpha: float

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, 700.0))


def srm_sequential(
    observed: Sequence[int],
    expected_weights: Sequence[float],
    *,
    alpha: float = DEFAULT_SRM_THRESHOLD,
    concentration: float = DEFAULT_SRM_CONCENTRATION,
    previous_max_log_e_value: float = 0.0,
) -> SequentialSrmResult:
    """Lindon & Malek 2022 Bayes factor of a Dirichlet(kappa * pi) mixture vs the expected split.

    log E_n = log G(A) - log G(A + n) + sum_i [log G(a_i + o_i) - log G(a_i)] - sum_i o_i log pi_i
    with a_i = kappa * pi_i, A = sum a_i (STATS.md 7.2). Units in an arm with zero expected
    weight are impossible under H0, so they make the e-value infinite.
    """
    _check_counts(observed, expected_weights)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not (math.isfinite(concentration) and concentration > 0):
        raise ValueError(f"concentration must be positive, got {concentration}")
    total_weight = float(sum(expected_weights))
    log_e = 0.0
    prior_total = 0.0
    units = 0
    impossible = False
    for count, weight in zip(observed, expected_weights, strict=True):
        if weight <= 0:
            impossible = impossible or count > 0
            continue
        share = weight / total_weight
        prior = concentration * share
        prior_total += prior
        units += int(count)
        log_e += float(special.gammaln(prior + count) - special.gammaln(prior))
        log_e -= count * math.log(share)
    log_e += float(special.gammaln(prior_total) - special.gammaln(prior_total + units))
    if impossible:
        log_e = math.inf
    running_max = max(previous_max_log_e_value, log_e)
    return SequentialSrmResult(
        log_e_value=log_e,
        max_log_e_value=running_max,
        p_value=min(1.0, math.exp(-running_max)),
        flagged=running_max >= -math.log(alpha),
        alpha=alpha,
    )


@dataclass(frozen=True, slots=True)
class SrmCheck:
    """One look's SRM check: the chi-square is reported, the anytime-valid e-value decides."""

    chi_square: SrmResult
    sequential: SequentialSrmResult

    @property
    def flagged(self) -> bool:
        return self.sequential.flagged


def srm_check(
    observed: Sequence[int],
    expected_weights: Sequence[float],
    *,
    alpha: float = DEFAULT_SRM_THRESHOLD,
    min_units: int = DEFAULT_SRM_MIN_UNITS,
    concentration: float = DEFAULT_SRM_CONCENTRATION,
    previous_max_log_e_value: float = 0.0,
) -> SrmCheck:
    """The SRM check run at every look of a monitored experiment (STATS.md 7.2).

    Flags when the running maximum of the Dirichlet-multinomial e-value reaches 1 / alpha, so
    the chance of ever flagging a correct split is at most alpha however many looks there are.
    The chi-square p-value (threshold `alpha`, after `min_units`) is computed for display only:
    OR-ing it in would add a fixed-sample test's false alarms at every look.
    """
    return SrmCheck(
        chi_square=srm_chi_square(observed, expected_weights, threshold=alpha, min_units=min_units),
        sequential=srm_sequential(
            observed,
            expected_weights,
            alpha=alpha,
            concentration=concentration,
            previous_max_log_e_value=previous_max_log_e_value,
        ),
    )


@dataclass(frozen=True, slots=True)
class MultipleExposureResult:
    """Share of exposed units that saw more than one variant, and whether it is too high."""

    share: float
    units_exposed: int
    units_multiple: int
    flagged: bool
    threshold: float


def multiple_exposure_check(
    *,
    units_exposed: int,
    units_multiple: int,
    threshold: float = DEFAULT_MULTIPLE_EXPOSURE_THRESHOLD,
) -> MultipleExposureResult:
    """Flag when more than `threshold` (default 1%) of the exposed units saw several variants.

    Such units contaminate both arms (sticky assignment broke, or ids are shared), so the
    analysis is not trustworthy beyond a small share.
    """
    for field, value in (("units_exposed", units_exposed), ("units_multiple", units_multiple)):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
    if units_multiple > units_exposed:
        raise ValueError("units_multiple cannot exceed units_exposed")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    share = units_multiple / units_exposed if units_exposed else 0.0
    return MultipleExposureResult(
        share=share,
        units_exposed=units_exposed,
        units_multiple=units_multiple,
        flagged=share > threshold,
        threshold=threshold,
    )
