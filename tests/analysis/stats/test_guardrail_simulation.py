"""Seeded A/A simulations: the guardrail's false-rollback rate stays at most alpha under peeking.

1,000 A/A canaries (90% control, 10% canary) are looked at after every batch of traffic. The
rollback rule is the one `evaluate_guardrails` applies (`analysis.stats.harm`, vectorised over
experiments and looks; `test_vectorised_rule_is_the_decision_function` checks the two agree).
Naive repeated fixed-horizon testing of the same data shows the inflation the sequential
boundary avoids.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

from analysis.stats.guardrails import (
    ExperimentSnapshot,
    GuardrailAction,
    GuardrailSettings,
    GuardrailSpec,
    evaluate_guardrails,
)
from analysis.stats.harm import harm_threshold, mean_harm_z, proportion_harm_z
from analysis.stats.moments import ProportionStats

EXPERIMENTS = 1000
ALPHA = 0.05
TREATMENT_SHARE = 0.1
# Monte-Carlo tolerance: 2.33 standard errors of a rate near alpha over 1,000 experiments
# (one-sided 1%), so a valid procedure fails this test by chance about once in a hundred seeds.
TOLERANCE = 2.33 * math.sqrt(ALPHA * (1 - ALPHA) / EXPERIMENTS)


def _rate_trajectories(seed: int, rate: float, batch: int, looks: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_b = rng.binomial(batch, TREATMENT_SHARE, size=(EXPERIMENTS, looks))
    n_a = batch - n_b
    return {
        "n_a": n_a.cumsum(axis=1),
        "n_b": n_b.cumsum(axis=1),
        "x_a": rng.binomial(n_a, rate).cumsum(axis=1),
        "x_b": rng.binomial(n_b, rate).cumsum(axis=1),
        "total": batch * np.arange(1, looks + 1),
    }


def _latency_trajectories(seed: int, batch: int, looks: int) -> dict[str, np.ndarray]:
    """Log-normal latencies (median 100 ms, heavy right tail), per-look cumulative moments."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(math.log(100), 0.6, size=(EXPERIMENTS, looks, batch))
    is_b = rng.random(size=values.shape) < TREATMENT_SHARE
    out: dict[str, np.ndarray] = {"total": batch * np.arange(1, looks + 1)}
    for arm, mask in (("a", ~is_b), ("b", is_b)):
        out[f"n_{arm}"] = mask.sum(axis=2).cumsum(axis=1)
        out[f"s_{arm}"] = np.where(mask, values, 0).sum(axis=2).cumsum(axis=1)
        out[f"q_{arm}"] = np.where(mask, values**2, 0).sum(axis=2).cumsum(axis=1)
    return out


def _first_alarm(fired: np.ndarray) -> np.ndarray:
    return np.asarray(fired.any(axis=1))


def _rate_statistics(data: dict[str, np.ndarray], settings: GuardrailSettings) -> np.ndarray:
    z = proportion_harm_z(
        data["x_a"], data["n_a"], data["x_b"], data["n_b"], ratio=1.0, lower_is_better=True
    )
    burned_in = (np.minimum(data["n_a"], data["n_b"]) >= settings.min_units_per_arm) & (
        np.minimum(data["x_a"], data["x_b"]) >= settings.min_events_per_arm
    )
    return np.where(burned_in, z, -np.inf)


def _mean_statistics(data: dict[str, np.ndarray], settings: GuardrailSettings) -> np.ndarray:
    moments = {}
    for arm in ("a", "b"):
        n, s, q = data[f"n_{arm}"], data[f"s_{arm}"], data[f"q_{arm}"]
        with np.errstate(divide="ignore", invalid="ignore"):
            moments[arm] = (s / n, (q - s * s / n) / (n - 1), n)
    z = mean_harm_z(*moments["a"], *moments["b"], ratio=1.0, lower_is_better=True)
    burned_in = np.minimum(data["n_a"], data["n_b"]) >= settings.min_units_per_arm
    return np.where(burned_in, z, -np.inf)


def _naive_fixed_horizon(z: np.ndarray, alpha: float) -> np.ndarray:
    """A one-sided z test at level alpha repeated at every look (invalid under peeking)."""
    return _first_alarm(z > scipy_stats.norm.isf(alpha))


def test_aa_false_rollback_rate_of_rate_and_mean_guardrails() -> None:
    settings = GuardrailSettings(alpha=ALPHA, n_star=20_000)
    rates = _rate_trajectories(seed=20240601, rate=0.01, batch=500, looks=100)
    latency = _latency_trajectories(seed=20240602, batch=100, looks=100)
    z_rate, z_mean = _rate_statistics(rates, settings), _mean_statistics(latency, settings)
    # Each guardrail alone, with the whole budget.
    rate_alone = _first_alarm(z_rate > harm_threshold(rates["total"], alpha=ALPHA, n_star=20_000))
    mean_alone = _first_alarm(z_mean > harm_threshold(latency["total"], alpha=ALPHA, n_star=20_000))
    assert rate_alone.mean() <= ALPHA + TOLERANCE
    assert mean_alone.mean() <= ALPHA + TOLERANCE
    # Both guardrails in one experiment: alpha split in two (Bonferroni); any alarm rolls back.
    half = ALPHA / 2
    both = _first_alarm(
        z_rate > harm_threshold(rates["total"], alpha=half, n_star=20_000)
    ) | _first_alarm(z_mean > harm_threshold(latency["total"], alpha=half, n_star=20_000))
    assert both.mean() <= ALPHA + TOLERANCE
    # The same data tested naively at every look: far above alpha.
    naive_rate = _naive_fixed_horizon(z_rate, ALPHA).mean()
    naive_mean = _naive_fixed_horizon(z_mean, ALPHA).mean()
    assert naive_rate > 3 * ALPHA and naive_mean > 3 * ALPHA
    assert naive_rate > 3 * rate_alone.mean() and naive_mean > 3 * mean_alone.mean()


def test_aa_false_rollback_rate_with_a_margin_is_below_alpha() -> None:
    # Under a true 5% harm and a 5% margin (the boundary of H0) the rule still fires at most
    # alpha of the time.
    settings = GuardrailSettings(alpha=ALPHA, n_star=20_000)
    rng = np.random.default_rng(7)
    batch, looks = 500, 100
    n_b = rng.binomial(batch, TREATMENT_SHARE, size=(EXPERIMENTS, looks))
    n_a = batch - n_b
    data = {
        "n_a": n_a.cumsum(axis=1),
        "n_b": n_b.cumsum(axis=1),
        "x_a": rng.binomial(n_a, 0.02).cumsum(axis=1),
        "x_b": rng.binomial(n_b, 0.021).cumsum(axis=1),
        "total": batch * np.arange(1, looks + 1),
    }
    z = proportion_harm_z(
        data["x_a"], data["n_a"], data["x_b"], data["n_b"], ratio=1.05, lower_is_better=True
    )
    burned_in = np.minimum(data["x_a"], data["x_b"]) >= settings.min_events_per_arm
    fired = _first_alarm(
        burned_in & (z > harm_threshold(data["total"], alpha=ALPHA, n_star=20_000))
    )
    assert fired.mean() <= ALPHA + TOLERANCE


def test_vectorised_rule_is_the_decision_function() -> None:
    settings = GuardrailSettings(alpha=ALPHA, n_star=20_000)
    rates = _rate_trajectories(seed=3, rate=0.01, batch=500, looks=40)
    # Make a few experiments truly harmful so that both outcomes occur.
    rng = np.random.default_rng(4)
    extra = rng.binomial(rates["n_b"][:6], 0.02)
    rates["x_b"][:6] = np.maximum.accumulate(rates["x_b"][:6] + extra, axis=1)
    z = _rate_statistics(rates, settings)
    fired = z > harm_threshold(rates["total"], alpha=ALPHA, n_star=20_000)
    spec = GuardrailSpec("error_rate", "proportion", "lower_is_better")
    checked = 0
    for experiment in range(12):
        for look in range(0, 40, 3):
            snapshot = ExperimentSnapshot(
                control="a",
                treatments=("b",),
                metrics={
                    "error_rate": {
                        "a": ProportionStats(
                            int(rates["n_a"][experiment, look]), int(rates["x_a"][experiment, look])
                        ),
                        "b": ProportionStats(
                            int(rates["n_b"][experiment, look]), int(rates["x_b"][experiment, look])
                        ),
                    }
                },
            )
            decision = evaluate_guardrails([spec], snapshot, settings=settings)
            assert (decision.action is GuardrailAction.ROLLBACK) == bool(fired[experiment, look])
            checked += int(fired[experiment, look])
    assert checked > 0


def test_mean_guardrail_catches_a_real_regression() -> None:
    # Power sanity check on the same machinery: a 15% slower canary is caught in most runs.
    settings = GuardrailSettings(alpha=ALPHA, n_star=20_000)
    latency = _latency_trajectories(seed=11, batch=100, looks=100)
    latency["s_b"] = latency["s_b"] * 1.15
    latency["q_b"] = latency["q_b"] * 1.15**2
    z = _mean_statistics(latency, settings)
    caught = _first_alarm(z > harm_threshold(latency["total"], alpha=ALPHA, n_star=20_000))
    assert caught.mean() > 0.8
