"""Label health: do the arms get labels at the same rate? A warning, never a rollback trigger.

Quality guardrails compare arms on labelled predictions only. If one arm's predictions are
labelled more often (say the canary's answers make users leave before the outcome is known),
the labelled subsets are no longer comparable and the comparison may be biased.

The check is Pearson's chi-square test of homogeneity on the k x 2 table (labelled, missing)
of predictions whose outcome is decided (Pearson 1900; Agresti 2013, *Categorical Data
Analysis*, 3rd ed., eq. 3.10), the same statistic as ``scipy.stats.chi2_contingency`` without
continuity correction. Like GrowthBook's SRM check (STATS.md 7.1, 11.5), it is a fixed-sample
test re-run at every look, kept safe by a very small threshold (0.001) and a minimum of
decided predictions per arm. Over 20 looks the union bound gives a false-warning rate of at
most 2%; a seeded A/A simulation (labelled share 0.7 in both arms, 200 to 4,000 decided
predictions per arm, tests/analysis/stats/test_label_balance.py) measured 6/500 = 1.2%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

DEFAULT_LABEL_THRESHOLD = 0.001
DEFAULT_LABEL_MIN_DECIDED = 100


@dataclass(frozen=True, slots=True)
class LabelBalance:
    """The test's p-value and statistic, each arm's labelled share, and whether it warns."""

    p_value: float
    chi_square: float
    shares: tuple[float | None, ...]
    enough_data: bool
    flagged: bool
    threshold: float


def label_balance(
    labelled: Sequence[int],
    decided: Sequence[int],
    *,
    threshold: float = DEFAULT_LABEL_THRESHOLD,
    min_decided: int = DEFAULT_LABEL_MIN_DECIDED,
) -> LabelBalance:
    """Chi-square homogeneity of labelled shares across arms (``decided`` = labelled + missing).

    p = 1 when the table has no variation (no arm decided, or every prediction labelled, or
    none). Flags only when every arm has at least ``min_decided`` decided predictions.
    """
    if len(labelled) != len(decided) or len(labelled) < 2:
        raise ValueError("labelled and decided need one count per arm, at least two arms")
    for got, total in zip(labelled, decided, strict=True):
        if not 0 <= got <= total:
            raise ValueError(f"need 0 <= labelled <= decided, got {got} of {total}")
    shares = tuple(
        got / total if total else None for got, total in zip(labelled, decided, strict=True)
    )
    grand = sum(decided)
    grand_labelled = sum(labelled)
    statistic = 0.0
    if grand and 0 < grand_labelled < grand:
        rate = grand_labelled / grand
        for got, total in zip(labelled, decided, strict=True):
            if total == 0:
                continue
            expected_yes = total * rate
            expected_no = total - expected_yes
            statistic += (got - expected_yes) ** 2 / expected_yes
            statistic += ((total - got) - expected_no) ** 2 / expected_no
        arms_seen = sum(1 for total in decided if total)
        p_value = float(scipy_stats.chi2.sf(statistic, arms_seen - 1)) if arms_seen > 1 else 1.0
    else:
        p_value = 1.0
    enough = all(total >= min_decided for total in decided)
    return LabelBalance(
        p_value=p_value,
        chi_square=statistic,
        shares=shares,
        enough_data=enough,
        flagged=enough and p_value < threshold,
        threshold=threshold,
    )
