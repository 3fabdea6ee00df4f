"""Label health: do the arms get labels at the same rate and as fast? Warnings, never rollbacks.

Quality guardrails compare arms on labelled predictions only. If one arm's predictions are
labelled more often, or later (say the canary's answers make users leave before the outcome
is known), the labelled subsets are no longer comparable and the comparison may be biased.

The check is anytime-valid, like the sequential SRM test (``analysis.stats.health``), so it
can be re-run at every look. Each settled prediction (its label window closed) is a Bernoulli
outcome: labelled in its window or not (for the delay check: among labelled ones, labelled
within half the window or not). H0: every arm has the same rate p. The e-value

    E_n = prod_i B(a + x_i, a + n_i - x_i) / B(a, a)  /  sup_p p^X (1 - p)^(N - X)

(x_i of n_i outcomes in arm i, X and N summed over arms, a = 1/2) divides a Beta(a, a)
mixture likelihood of per-arm rates, the beta-binomial marginal likelihood, by the likelihood
of the best common rate: the running-MLE likelihood ratio of universal inference (Wasserman,
Ramdas & Balakrishnan 2020, "Universal inference", PNAS 117(29), its sequential form with a
mixture numerator and the running null MLE). Validity: for the
true common rate p*, the numerator over the likelihood at p* is a mixture of likelihood
ratios, a nonnegative martingale with mean 1 under H0 (the arm of each outcome is fixed by
the randomisation before its outcome); the denominator is at least the likelihood at p*, so
E_n never exceeds that martingale, and by Ville's inequality (Ville 1939) the chance that
E_n ever reaches 1/alpha is at most alpha. Warning when E_n >= 1/alpha is therefore safe over
any number of looks; p = min(1, 1/E_n). It assumes the common rate does not drift over the
experiment (as the fixed-sample chi-square did). A seeded A/A simulation over 20 looks
(tests/analysis/stats/test_label_balance.py) measured 0/500 false warnings at alpha = 0.01,
where Pearson's chi-square re-run at every look at the same threshold warned in 28/500 = 5.6%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import special

DEFAULT_LABEL_ALPHA = 0.01
DEFAULT_LABEL_MIN_DECIDED = 100
PRIOR = 0.5


@dataclass(frozen=True, slots=True)
class LabelBalance:
    """The e-value, its p-value, each arm's share, and whether it warns."""

    p_value: float
    log_e_value: float
    shares: tuple[float | None, ...]
    enough_data: bool
    flagged: bool
    threshold: float


def _log_mixture(hits: int, total: int) -> float:
    return float(special.betaln(PRIOR + hits, PRIOR + total - hits) - special.betaln(PRIOR, PRIOR))


def label_balance(
    labelled: Sequence[int],
    decided: Sequence[int],
    *,
    threshold: float = DEFAULT_LABEL_ALPHA,
    min_decided: int = DEFAULT_LABEL_MIN_DECIDED,
) -> LabelBalance:
    """Anytime-valid test that every arm has the same share ``labelled / decided``.

    ``threshold`` is alpha: warns when E >= 1/alpha and every arm has at least
    ``min_decided`` outcomes (the minimum only delays warnings, it is not needed for validity).
    """
    if len(labelled) != len(decided) or len(labelled) < 2:
        raise ValueError("labelled and decided need one count per arm, at least two arms")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    for got, total in zip(labelled, decided, strict=True):
        if not 0 <= got <= total:
            raise ValueError(f"need 0 <= labelled <= decided, got {got} of {total}")
    shares = tuple(
        got / total if total else None for got, total in zip(labelled, decided, strict=True)
    )
    hits = int(sum(labelled))
    total = int(sum(decided))
    log_e = sum(_log_mixture(int(x), int(n)) for x, n in zip(labelled, decided, strict=True))
    if total:
        rate = hits / total
        log_e -= float(special.xlogy(hits, rate) + special.xlogy(total - hits, 1.0 - rate))
    enough = all(total >= min_decided for total in decided)
    return LabelBalance(
        p_value=min(1.0, math.exp(-log_e)) if log_e > 0 else 1.0,
        log_e_value=log_e,
        shares=shares,
        enough_data=enough,
        flagged=enough and log_e >= -math.log(threshold),
        threshold=threshold,
    )
