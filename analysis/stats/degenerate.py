"""Degenerate data is evidence, not an error (issue 12): constant arms in moment guardrails.

Used by `analysis.stats.guardrails` for proportion, mean and ratio guardrails. With one constant
arm nothing special is needed: the Fieller contrast's variance s_B^2 / n_B + r^2 s_A^2 / n_A
(`analysis.stats.harm.mean_harm_z`, STATS.md 1.2) stays positive and the harm test runs as
usual. Only two constant arms leave the contrast without variance; `constant_evidence` decides
that case.
"""

from __future__ import annotations

import math

from analysis.stats.guardrail_types import GuardrailEvidence, GuardrailSpec, GuardrailStatus
from analysis.stats.moments import MetricStats

__all__ = ["constant_evidence", "is_constant"]


def is_constant(stats: MetricStats) -> bool:
    """Zero sample variance up to rounding (sd below 1e-6 of the mean; the one-pass variance
    sum_squares - sum^2 / n leaves about 1e-8 of the mean on constant data)."""
    return stats.variance <= 1e-12 * stats.mean * stats.mean


def constant_evidence(
    spec: GuardrailSpec,
    arm: str,
    alpha: float,
    n_a: int,
    n_b: int,
    mean_a: float,
    mean_b: float,
) -> GuardrailEvidence:
    """Both arms constant after the burn-in: the difference is known, compare it to the margin.

    Degenerate data is evidence, not an error (issue 12). With one constant arm the Fieller
    contrast's variance s_B^2 / n_B + r^2 s_A^2 / n_A stays positive and the harm test runs
    as usual. With both arms constant the contrast has no variance and the statistic is
    +-inf: under the test's assumption that the plug-in variances estimate the arms' variances
    (the same assumption as the CLT burn-in), `min_units_per_arm` identical values in each arm
    mean both populations are constant, so mu_B / mu_A - 1 is known exactly. Beyond the margin
    is harm (rolled back), inside it is safe, exactly on it is inconclusive. A population with
    rare values unseen in a burn-in's worth of units breaks that assumption, as it breaks the
    CLT; the seeded A/A check with discretised latencies in tests/analysis/stats/
    test_guardrails.py measures the false-rollback rate this leaves.
    """
    relative = mean_b / mean_a - 1
    harm = relative if spec.lower_is_better else -relative
    if math.isclose(harm, spec.margin, rel_tol=1e-9, abs_tol=1e-12):
        status, p_value = GuardrailStatus.INCONCLUSIVE, 1.0  # on the margin (up to rounding)
    elif harm > spec.margin:
        status, p_value = GuardrailStatus.HARM, 0.0
    else:
        status, p_value = GuardrailStatus.SAFE, 1.0
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
        harm_lower_bound=harm,
        harm_upper_bound=harm,
        interval=(relative, relative),
        p_value=p_value,
        note="both arms constant: the difference is exact",
    )
