"""The prediction-drift bets and distances: references, admissibility, state round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import rel_entr
from scipy.stats import wasserstein_distance

from analysis.stats.prediction_drift import (
    BET_FRACTIONS,
    DriftBet,
    bet_log_factors,
    bin_index,
    fold_users,
    psi,
    quantile_edges,
    running_log_e,
    shares,
    total_variation,
    witness,
)


def test_psi_is_the_symmetrised_kullback_leibler_divergence_of_scipy() -> None:
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.4, 0.4, 0.2])
    # scipy.special.rel_entr(x, y) = x log(x / y): PSI = KL(p || q) + KL(q || p).
    assert psi(p, q) == pytest.approx(float(rel_entr(p, q).sum() + rel_entr(q, p).sum()), rel=1e-12)
    assert psi(p, p) == 0.0
    # An empty cell is floored, not infinite.
    assert math.isfinite(psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]))


def test_total_variation_is_half_the_l1_distance() -> None:
    p = np.array([0.7, 0.3])
    q = np.array([0.5, 0.5])
    assert total_variation(p, q) == pytest.approx(0.2)
    # On two adjacent categories of a line, TV equals the 1-Wasserstein distance (scipy).
    assert total_variation(p, q) == pytest.approx(
        wasserstein_distance([0, 1], [0, 1], u_weights=p, v_weights=q)
    )
    assert shares([0, 0]).tolist() == [0.0, 0.0]


def test_quantile_edges_make_equal_count_bins_fixed_afterwards() -> None:
    values = np.arange(1000, dtype=float)
    edges = quantile_edges(values, bins=10)
    assert len(edges) == 10
    counts = np.bincount(bin_index(values, edges), minlength=11)
    assert counts.tolist() == [100] * 10 + [0]
    # Ties merge edges; values beyond the calibration range fall in the end bins.
    assert quantile_edges([1.0] * 50 + [2.0] * 50, bins=10) == (1.0, 2.0, np.nextafter(2.0, 3.0))
    # A constant control: its value, and anything larger, in bins of their own.
    assert bin_index([0.1, 0.2, 0.7], quantile_edges([0.2] * 100, bins=10)).tolist() == [0, 1, 2]
    assert bin_index([-1e9, 1e9], edges).tolist() == [0, 10]
    assert quantile_edges([], bins=10) == ()


def test_every_bet_keeps_the_wealth_nonnegative_at_the_extremes() -> None:
    # A control user in the witness set at a 99% canary step is the worst case.
    for rho in (0.01, 0.5, 0.99):
        for tolerance in (0.0, 0.2, 0.49):
            factors = bet_log_factors(
                [0, 0, 1], [False, True, True], [rho] * 3, [1.0, 1.0, 0.0], tolerance=tolerance
            )
            assert np.all(np.isfinite(factors))


def test_the_payoff_has_mean_at_most_the_tolerance_at_the_null_s_boundary() -> None:
    # Exact expectation of lambda (phi - eps) over arm and category, with TV = eps exactly.
    p_a = np.array([0.5, 0.3, 0.2])
    p_b = np.array([0.55, 0.25, 0.2])
    eps = total_variation(p_a, p_b)
    g = np.array([1.0, 0.0, 0.0])
    rho = 0.1
    # E[phi] = sum_c g(c) (rho p_b(c) / rho - (1 - rho) p_a(c) / (1 - rho)) = P_B(S) - P_A(S).
    expected_phi = float((g * p_b).sum() - (g * p_a).sum())
    assert expected_phi == pytest.approx(eps)
    factors = np.expm1(
        bet_log_factors([0, 0], [True, False], [rho, rho], g, tolerance=eps)
    )  # lambda (phi - eps) for a canary and a control user in category 0
    mean = rho * p_b[0] * factors[0] + (1 - rho) * p_a[0] * factors[1]
    mean += (rho * (1 - p_b[0]) + (1 - rho) * (1 - p_a[0])) * np.expm1(
        bet_log_factors([1], [True], [rho], g, tolerance=eps)
    )[0]
    assert np.all(mean <= 1e-12)


def test_the_witness_points_at_the_categories_the_arm_has_more_of() -> None:
    assert witness([30, 10, 0], [10, 30, 0]).tolist() == [1.0, 0.0, 0.0]
    assert witness([0, 0], [0, 0]).tolist() == [0.0, 0.0]


def test_folding_in_pieces_equals_folding_at_once_and_round_trips() -> None:
    rng = np.random.default_rng(5)
    n = 400
    cats = rng.integers(0, 3, n)
    treated = rng.random(n) < 0.3
    share = np.full(n, 0.3)
    whole = fold_users(
        DriftBet(), categories=cats, treated=treated, share=share, tolerance=0.02, n_categories=3
    )
    pieces = DriftBet()
    for start in range(0, n, 100):
        part = slice(start, start + 100)
        pieces = DriftBet.from_json(
            fold_users(
                pieces,
                categories=cats[part],
                treated=treated[part],
                share=share[part],
                tolerance=0.02,
                n_categories=3,
            ).as_json()
        )
    assert pieces.log_wealth == pytest.approx(whole.log_wealth)
    assert pieces.treated_users == int(treated.sum())
    path = running_log_e(cats, treated, share, tolerance=0.02, n_categories=3)
    assert whole.log_e == pytest.approx(path[-1])
    assert whole.max_log_e == pytest.approx(max(0.0, path.max()))
    assert DriftBet.from_json({"wealth": [0.0]}) == DriftBet()
    assert len(DriftBet().log_wealth) == len(BET_FRACTIONS)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        fold_users(
            DriftBet(), categories=[0], treated=[True], share=[0.5], tolerance=0.5, n_categories=1
        )
    with pytest.raises(ValueError, match="share"):
        fold_users(
            DriftBet(), categories=[0], treated=[True], share=[1.0], tolerance=0.0, n_categories=1
        )
    with pytest.raises(ValueError, match="categories"):
        fold_users(
            DriftBet(), categories=[3], treated=[True], share=[0.5], tolerance=0.0, n_categories=2
        )


def test_a_dead_canary_answering_nothing_readable_is_caught_within_a_few_dozen_users() -> None:
    # Control answers classes 0-2; the canary's answers are all unreadable (category 3).
    rng = np.random.default_rng(2)
    n = 2000
    treated = rng.random(n) < 0.05
    cats = np.where(treated, 3, rng.integers(0, 3, n))
    path = running_log_e(cats, treated, np.full(n, 0.05), tolerance=0.02, n_categories=4)
    first = int(np.argmax(path >= math.log(20)))
    assert path[first] >= math.log(20)
    assert int(treated[: first + 1].sum()) <= 30
