"""The label-balance check against scipy, and its false-warning rate in a seeded A/A simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from analysis.stats.label_balance import label_balance


@pytest.mark.parametrize(
    ("labelled", "decided"),
    [([70, 55], [100, 100]), ([700, 640, 690], [1000, 990, 1010]), ([3, 9], [150, 120])],
)
def test_matches_scipys_chi_square_without_continuity_correction(
    labelled: list[int], decided: list[int]
) -> None:
    table = [[got, total - got] for got, total in zip(labelled, decided, strict=True)]
    reference = chi2_contingency(table, correction=False)
    result = label_balance(labelled, decided)
    assert result.chi_square == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.shares == tuple(got / total for got, total in zip(labelled, decided, strict=True))


def test_degenerate_tables_do_not_warn() -> None:
    assert label_balance([0, 0], [0, 0]).p_value == 1.0
    assert label_balance([200, 300], [200, 300]).p_value == 1.0
    assert label_balance([0, 50], [0, 500]).p_value == 1.0
    small = label_balance([5, 60], [60, 60])
    assert small.p_value < 1e-6 and not small.enough_data and not small.flagged
    with pytest.raises(ValueError):
        label_balance([5], [10])
    with pytest.raises(ValueError):
        label_balance([11, 1], [10, 10])


def test_aa_false_warnings_are_rare_and_a_labelling_gap_is_flagged() -> None:
    rng = np.random.default_rng(20261204)

    def warns(rate_a: float, rate_b: float) -> bool:
        labelled_a = rng.random(4000) < rate_a
        labelled_b = rng.random(4000) < rate_b
        for n in range(200, 4001, 200):  # 20 looks
            if label_balance(
                [int(labelled_a[:n].sum()), int(labelled_b[:n].sum())], [n, n]
            ).flagged:
                return True
        return False

    false = sum(warns(0.7, 0.7) for _ in range(500))
    print(f"A/A label-balance warnings over 20 looks: {false}/500")
    # At most 20 looks x 0.001 by the union bound; 6/500 observed with this seed.
    assert false / 500 <= 0.02
    assert all(warns(0.7, 0.55) for _ in range(50))
